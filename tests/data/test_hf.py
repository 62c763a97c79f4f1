"""Hugging Face datasets (data.name=hf): Parquet files read as image files are, map-style or streamed."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from heatssl.cli import main
from heatssl.config import load_config
from heatssl.data import hf
from heatssl.data.datamodule import HeatDataModule
from heatssl.errors import ConfigError
from tests.data.checks import check_sigterm_then_resume
from tests.helpers import tiny_settings

datasets = pytest.importorskip("datasets")


def _jpeg(rng) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (36, 44, 3), dtype=np.uint8)).save(out, format="JPEG")
    return out.getvalue()


@pytest.fixture(scope="module")
def parquet(tmp_path_factory):
    """train-*.parquet (24 rows, 2 files) and validation-*.parquet (6 rows), 3 ClassLabel classes;
    train row 5 holds broken bytes."""
    root = tmp_path_factory.mktemp("hf") / "set"
    root.mkdir()
    rng = np.random.default_rng(0)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])}
    )
    for split, count, files in (("train", 24, 2), ("validation", 6, 1)):
        images = [{"bytes": _jpeg(rng), "path": None} for _ in range(count)]
        if split == "train":
            images[5] = {"bytes": b"broken bytes", "path": None}
        table = datasets.Dataset.from_dict(
            {"image": images, "label": [i % 3 for i in range(count)]}, features=features
        )
        for f in range(files):
            part = table.shard(files, f, contiguous=True)
            part.to_parquet(str(root / f"{split}-{f:05d}-of-{files:05d}.parquet"))
    return root


def _settings(tmp_path, root, *extra):
    return [*tiny_settings(tmp_path / "run"), "data.name=hf", f"data.root={root}", *extra]


def test_rows_are_images_with_their_labels_and_a_broken_row_is_named(parquet, tmp_path):
    cfg = load_config("demo", _settings(tmp_path, parquet))
    data = HeatDataModule(cfg.data)
    assert len(data.train_dataset) == 24 and len(data.val_dataset) == 6
    assert data.class_names == ["a", "b", "c"]
    images, labels, skipped = next(iter(data.feature_dataloader("train", 8)))
    assert images.shape == (7, 3, 32, 32) and labels.tolist() == [0, 1, 2, 0, 1, 0, 1]
    assert len(skipped) == 1 and "[train] row 5" in skipped[0]


def test_pretraining_probing_and_fine_tuning_read_the_rows(parquet, tmp_path):
    settings = _settings(tmp_path, parquet, "data.batch_size=4")
    assert main(["pretrain", "-c", "demo", *settings]) == 0
    ckpt = str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    probe = ["probe.kinds=[linear]", "probe.epochs=2", "data.label_fraction=0.5"]
    assert main(["probe", ckpt, *probe, "-o", str(tmp_path / "probe")]) == 0
    metrics = json.loads((tmp_path / "probe" / "metrics.json").read_text())
    assert metrics["labelled_images"] == 12 and metrics["val_images"] == 6
    fine = [*settings, "finetune.epochs=1", f"finetune.out_dir={tmp_path / 'ft'}"]
    assert main(["finetune", "test_resnet", "-c", "demo", *fine]) == 0


def test_streaming_reads_the_parquet_files_as_shards(parquet, tmp_path):
    settings = _settings(tmp_path, parquet, "data.streaming=true", "data.batch_size=4")
    data = HeatDataModule(load_config("demo", settings).data)
    assert data.train_dataset.images == 24 and [s.count for s in data.train_dataset.shards] == [
        12,
        12,
    ]
    assert main(["pretrain", "-c", "demo", *settings]) == 0


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("data.image_column=picture", "no image column 'picture'"),
        ("data.label_column=kind", "no label column 'kind'"),
        ("data.split=training", "data.split='training' is not a split"),
    ],
)
def test_a_missing_column_or_split_is_one_line(parquet, tmp_path, capsys, override, says):
    assert main(["pretrain", "-c", "demo", *_settings(tmp_path, parquet, override)]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_hub_id_not_in_the_local_cache_is_one_line_without_the_network(tmp_path, capsys):
    settings = _settings(tmp_path, "someone/not-a-cached-dataset")
    assert main(["pretrain", "-c", "demo", *settings]) == 2
    err = capsys.readouterr().err
    assert "local cache" in err and "never downloads" in err


def test_without_the_package_the_error_names_the_extra(parquet, monkeypatch):
    monkeypatch.setattr(hf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[hf\]"'):
        HeatDataModule(load_config("demo", ["data.name=hf", f"data.root={parquet}"]).data).setup()


@pytest.mark.parametrize(
    ("form", "batches"),
    [([], 6), (["data.streaming=true"], 5)],  # streamed: 2 workers, floor(24 / 4) - 1 batches
    ids=["map", "streaming"],
)
def test_sigterm_mid_epoch_then_resume_reads_the_rest_of_the_epoch_in_order(
    parquet, tmp_path, form, batches
):
    settings = _settings(tmp_path, parquet, "data.num_workers=2", "data.batch_size=4", *form)
    check_sigterm_then_resume(tmp_path, settings, batches_per_epoch=batches)
