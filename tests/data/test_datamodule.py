"""Tests for heatssl.data.datamodule: batches, splits, seeded order and loaders of the data module."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from heatssl.config import DataConfig
from heatssl.data.datamodule import HeatDataModule, build_datamodule
from heatssl.data.machine import auto_workers
from heatssl.errors import ConfigError
from tests.data.checks import check_batch


@pytest.fixture(scope="module")
def digits() -> HeatDataModule:
    dm = build_datamodule(DataConfig(name="digits", image_size=32, batch_size=16), seed=0)
    dm.setup()
    return dm


def test_digits_batches_and_split(digits: HeatDataModule) -> None:
    assert digits.num_classes == 10
    assert digits.class_names == [str(k) for k in range(10)]
    n_train, n_val = len(digits.train_dataset), len(digits.val_dataset)
    assert n_train + n_val == 1797
    assert abs(n_val - 0.2 * 1797) <= 10
    # stratified: every class is in val in roughly its share
    val_counts = np.bincount(digits.val_dataset.labels, minlength=10)
    assert val_counts.min() >= 30
    check_batch(next(iter(digits.train_dataloader())), 16, 32)
    check_batch(next(iter(digits.val_dataloader())), 16, 32)
    loader = digits.train_dataloader()
    assert loader.drop_last and not digits.val_dataloader().drop_last
    assert loader.num_workers == auto_workers() and loader.persistent_workers  # "auto"


def test_digits_split_disjoint_and_tied_to_the_data_not_the_run_seed(digits) -> None:
    """Probing with another seed than pretraining must not put pretraining images in val."""
    other_run = build_datamodule(DataConfig(name="digits", batch_size=16), seed=1)
    a = digits.train_dataset.images
    assert np.array_equal(a, other_run.train_dataset.images)
    other_split = build_datamodule(DataConfig(name="digits", batch_size=16, split_seed=1))
    assert not np.array_equal(a, other_split.train_dataset.images)
    # train and val do not share images of the source set
    train = {im.tobytes() for im in digits.train_dataset.images}
    assert not any(im.tobytes() in train for im in digits.val_dataset.images[:50])


def test_shuffle_order_follows_seed() -> None:
    cfg = DataConfig(name="synthetic", synthetic_size=200, batch_size=32, image_size=16)

    def first_labels(seed: int) -> torch.Tensor:
        dm = HeatDataModule(cfg, seed=seed)
        return torch.cat([labels for _, labels, _ in dm.train_dataloader()])

    assert torch.equal(first_labels(0), first_labels(0))
    assert not torch.equal(first_labels(0), first_labels(1))


def test_val_loader_deterministic_and_unshuffled(digits: HeatDataModule) -> None:
    x1, y1, _ = next(iter(digits.val_dataloader()))
    x2, y2, _ = next(iter(digits.val_dataloader()))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(y1, torch.as_tensor(digits.val_dataset.labels[:16]))


def test_train_transform_augments(digits: HeatDataModule) -> None:
    torch.manual_seed(0)
    views = torch.stack([digits.train_dataset[0][0] for _ in range(4)])
    assert not torch.allclose(views[0], views[1])
    none_cfg = DataConfig(name="digits", augment="none", batch_size=16)
    plain = build_datamodule(none_cfg).train_dataset
    assert torch.equal(plain[0][0], plain[0][0])


def _collect(loader) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(loader)
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def test_synthetic_batches_and_learnable() -> None:
    cfg = DataConfig(name="synthetic", synthetic_size=200, batch_size=8, image_size=24)
    dm = build_datamodule(cfg, seed=0)
    assert len(dm.train_dataset) == 160 and len(dm.val_dataset) == 40
    check_batch(next(iter(dm.train_dataloader())), 8, 24)
    # classes differ in content: nearest class mean on eval views beats chance by far
    train_eval = HeatDataModule(dataclasses.replace(cfg, augment="none"), seed=0)
    xs, ys = _collect(train_eval.train_dataloader())
    means = torch.stack([xs[ys == k].flatten(1).float().mean(0) for k in range(10)])
    xv, yv = _collect(dm.val_dataloader())
    pred = torch.cdist(xv.flatten(1).float(), means).argmin(1)
    assert (pred == yv).float().mean() > 0.6


def test_setup_twice_does_not_rebuild(monkeypatch: pytest.MonkeyPatch) -> None:
    from heatssl.data import datasets

    calls = []
    real = datasets.make_synthetic
    monkeypatch.setattr(
        datasets, "make_synthetic", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    dm = HeatDataModule(DataConfig(name="synthetic", synthetic_size=20))
    dm.setup("fit")
    train, val = dm.train_dataset, dm.val_dataset
    dm.setup("fit")
    dm.setup("validate")
    assert dm.train_dataset is train and dm.val_dataset is val
    assert calls == [1]


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"val_fraction": 1.0}, "data.val_fraction"),
        ({"crop_scale_min": 0.0}, "data.crop_scale_min"),
        ({"image_size": 0}, "data.image_size"),
        ({"name": "imagefolder"}, "data.root"),
    ],
)
def test_a_data_module_refuses_a_bad_section_built_in_python(changes: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        HeatDataModule(DataConfig(**changes))


def test_a_worker_s_batch_is_written_into_shared_memory_once(monkeypatch) -> None:
    from heatssl.data import datasets

    items = [(torch.full((3, 4, 4), i, dtype=torch.uint8), i) for i in range(3)]
    plain = datasets.collate_batch(items)[0]
    assert not plain.is_shared()
    monkeypatch.setattr(datasets, "get_worker_info", lambda: object())  # as in a loader worker
    images, labels, _ = datasets.collate_batch(items)
    assert images.is_shared() and images.dtype == torch.uint8
    assert torch.equal(images, plain) and labels.tolist() == [0, 1, 2]


def test_dali_backend_needs_a_folder_of_image_files() -> None:
    with pytest.raises(ConfigError, match=r"data\.backend=pil"):
        DataConfig(name="digits", backend="dali").validate()
