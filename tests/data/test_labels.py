"""Tests for heatssl.data.labels: the class-balanced label subset of data.label_fraction."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, Subset

from heatssl.config import DataConfig, load_config
from heatssl.data.datamodule import build_datamodule
from heatssl.data.datasets import ArrayImageDataset, ImageFiles
from heatssl.data.labels import (
    LABEL_SUBSET_FILE,
    apply_label_fraction,
    dataset_labels,
    label_subset,
    read_label_subset,
    sample_ids,
    save_label_subset,
    take,
)
from heatssl.errors import ArgumentError, ConfigError

UNEVEN = [0] * 100 + [1] * 40 + [2] * 7 + [3] * 1  # in blocks: index ranges tell the class
UNEVEN = [UNEVEN[i] for i in np.random.default_rng(0).permutation(len(UNEVEN))]  # interleaved


def _counts(labels: list[int], indices: list[int]) -> dict[int, int]:
    return dict(sorted(Counter(labels[i] for i in indices).items()))


def test_balanced_counts_per_class_on_uneven_labels() -> None:
    picked = label_subset(UNEVEN, 0.1, seed=0)
    assert _counts(UNEVEN, picked) == {0: 10, 1: 4, 2: 1, 3: 1}  # round(0.7) = 1, 0.1 -> 1
    assert picked == sorted(set(picked))  # sorted, no repeats
    picked = label_subset(UNEVEN, 0.5, seed=0)
    assert _counts(UNEVEN, picked) == {0: 50, 1: 20, 2: 4, 3: 1}  # round(3.5) = 4


def test_at_least_one_per_class() -> None:
    picked = label_subset(UNEVEN, 0.01, seed=3)
    assert _counts(UNEVEN, picked) == {0: 1, 1: 1, 2: 1, 3: 1}


def test_deterministic_for_a_seed_and_different_for_another() -> None:
    first = label_subset(UNEVEN, 0.1, seed=0)
    assert label_subset(UNEVEN, 0.1, seed=0) == first
    assert label_subset(UNEVEN, 0.1, seed=1) != first


def test_independent_of_the_global_rng_and_the_run_seed() -> None:
    torch.manual_seed(1)
    a = label_subset(UNEVEN, 0.1, seed=5)
    torch.manual_seed(2)
    torch.rand(100)
    assert label_subset(UNEVEN, 0.1, seed=5) == a
    # the data module's seed (the run's) does not move the subset; split_seed does
    cfg = DataConfig(name="digits", batch_size=16, label_fraction=0.1)
    runs = [build_datamodule(cfg, seed=s, labelled=True).train_dataset for s in (0, 7)]
    assert np.array_equal(runs[0].images, runs[1].images)
    other = DataConfig(name="digits", batch_size=16, label_fraction=0.1, split_seed=1)
    assert not np.array_equal(
        runs[0].images, build_datamodule(other, labelled=True).train_dataset.images
    )


def test_fraction_one_keeps_everything(tmp_path: Path) -> None:
    assert label_subset(UNEVEN, 1.0, seed=0) == list(range(len(UNEVEN)))
    dataset = ArrayImageDataset(np.zeros((4, 8, 8), np.uint8), np.arange(4), 32)
    stale = tmp_path / LABEL_SUBSET_FILE
    stale.write_text("{}")  # left by an earlier run with a smaller fraction
    assert apply_label_fraction(dataset, DataConfig(), tmp_path) is dataset
    assert not stale.exists()


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_label_subset_refuses_fractions_outside_0_1(fraction: float) -> None:
    with pytest.raises(ArgumentError, match=rf"fraction={fraction!r} must be in \(0, 1\]"):
        label_subset(UNEVEN, fraction, seed=0)


@pytest.mark.parametrize(("value", "shown"), [("0", "0.0"), ("1.5", "1.5"), ("-0.1", "-0.1")])
def test_load_config_refuses_bad_label_fractions(value: str, shown: str) -> None:
    with pytest.raises(ConfigError, match=rf"^data\.label_fraction={shown} must be in \(0, 1\]"):
        load_config(None, [f"data.label_fraction={value}"])
    assert load_config(None, ["data.label_fraction=0.01"]).data.label_fraction == 0.01


def _files(root: Path) -> ImageFiles:
    samples = [
        (str(root / "train" / f"c{k % 3}" / f"{i}.jpg"), k % 3) for i, k in enumerate(range(30))
    ]
    return ImageFiles(samples, transform="train-tf", fill=True)


def test_saved_json_names_the_samples_and_a_redraw_matches(tmp_path: Path) -> None:
    root = tmp_path / "data"
    files = _files(root)
    cfg = DataConfig(name="imagefolder", root=str(root), label_fraction=0.2, split_seed=4)
    subset = apply_label_fraction(files, cfg, tmp_path / "run")
    saved = read_label_subset(tmp_path / "run" / LABEL_SUBSET_FILE)
    # a same-kind dataset: the loaders' attributes (transform, fill, samples) still work
    assert isinstance(subset, ImageFiles) and subset.transform == "train-tf" and subset.fill
    assert saved["fraction"] == 0.2 and saved["seed"] == 4 and saved["total"] == 6
    assert saved["per_class"] == {"0": 2, "1": 2, "2": 2} and saved["dataset_size"] == 30
    chosen = [Path(path).relative_to(root).as_posix() for path, _ in subset.samples]
    assert saved["samples"] == chosen and chosen[0].startswith("train/c")
    assert saved["indices"] == label_subset(dataset_labels(files), 0.2, seed=4)
    apply_label_fraction(files, cfg, tmp_path / "again")
    assert read_label_subset(tmp_path / "again" / LABEL_SUBSET_FILE) == saved
    assert not list((tmp_path / "run").glob("*.tmp"))  # written atomically: no leftover


def test_labels_and_ids_of_each_kind_without_decoding(tmp_path: Path) -> None:
    arrays = ArrayImageDataset(np.zeros((5, 8, 8), np.uint8), np.array([3, 1, 3, 0, 1]), 32)
    assert dataset_labels(arrays) == [3, 1, 3, 0, 1]
    assert sample_ids(arrays) == ["0", "1", "2", "3", "4"]
    wrapped = Subset(arrays, [4, 0])
    assert dataset_labels(wrapped) == [1, 3] and sample_ids(wrapped) == ["4", "0"]
    part = take(arrays, [1, 3])
    assert isinstance(part, ArrayImageDataset) and part.labels.tolist() == [1, 0]
    assert len(arrays) == 5  # the original is left whole
    files = _files(tmp_path)
    assert dataset_labels(files)[:4] == [0, 1, 2, 0]
    assert sample_ids(files, tmp_path)[1] == "train/c1/1.jpg"
    save_label_subset(tmp_path / "s.json", wrapped, [1], 0.5, 0)
    assert read_label_subset(tmp_path / "s.json")["samples"] == ["0"]


def test_unknown_dataset_and_unlabelled_images_are_refused() -> None:
    class Opaque(Dataset):
        def __len__(self) -> int:
            return 3

    with pytest.raises(ArgumentError, match=r"dataset=Opaque .*Allowed: ImageFiles"):
        dataset_labels(Opaque())
    with pytest.raises(ConfigError, match=r"data\.label_fraction needs labelled images.*2 of"):
        label_subset([0, -1, 1, -1], 0.5, seed=0)


def test_labelled_data_module_extracts_only_the_subset(tmp_path: Path) -> None:
    cfg = DataConfig(
        name="synthetic", synthetic_size=100, batch_size=8, num_workers=0, label_fraction=0.25
    )
    whole = build_datamodule(cfg)  # pretraining: labelled=False ignores the fraction
    data = build_datamodule(cfg, labelled=True, label_dir=tmp_path)
    assert len(whole.train_dataset) == 80 and len(data.train_dataset) == 20
    assert len(data.val_dataset) == len(whole.val_dataset) == 20  # val stays whole
    labels = torch.cat([y for _, y, _ in data.feature_dataloader("train")])
    assert torch.bincount(labels).tolist() == [2] * 10
    images = torch.cat([x for x, _, _ in data.feature_dataloader("train")])
    again = torch.cat([x for x, _, _ in data.feature_dataloader("train")])
    assert torch.equal(images, again)  # the eval transform, not the augmented one
    assert read_label_subset(tmp_path / LABEL_SUBSET_FILE)["total"] == 20
