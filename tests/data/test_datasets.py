"""Tests for heatssl.data.datasets: ImageFolder layouts and conversion, torchvision sets, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from heatssl.config import DataConfig
from heatssl.data.datamodule import build_datamodule
from heatssl.errors import ConfigError
from tests.data.checks import check_batch


def _write_images(folder: Path, names: list[str]) -> None:
    """Tiny images in several modes and shapes, to check conversion to 3 x S x S."""
    rng = np.random.default_rng(0)
    kinds = {
        "rgb.png": Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)),
        "grey.png": Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L"),
        "rgba.png": Image.fromarray(rng.integers(0, 256, (10, 10, 4), dtype=np.uint8), "RGBA"),
        "photo.jpg": Image.fromarray(rng.integers(0, 256, (30, 18, 3), dtype=np.uint8)),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        kinds[name].save(folder / name)


def _imagefolder_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(name="imagefolder", root=str(root), image_size=16, batch_size=4, **kw)


def test_imagefolder_split_and_conversion(tmp_path: Path) -> None:
    all_kinds = ["rgb.png", "grey.png", "rgba.png", "photo.jpg"]
    _write_images(tmp_path / "train" / "cat", all_kinds)
    _write_images(tmp_path / "train" / "dog", all_kinds)
    dm = build_datamodule(_imagefolder_cfg(tmp_path, val_fraction=0.5))
    assert dm.class_names == ["cat", "dog"] and dm.num_classes == 2
    assert len(dm.train_dataset) == 4 and len(dm.val_dataset) == 4
    check_batch(next(iter(dm.train_dataloader())), 4, 16, num_classes=2)
    check_batch(next(iter(dm.val_dataloader())), 4, 16, num_classes=2)
    # each source image, whatever its mode and shape, comes out 3 x 16 x 16
    for i in range(4):
        assert dm.val_dataset[i][0].shape == (3, 16, 16)
        assert dm.train_dataset[i][0].shape == (3, 16, 16)


def test_imagefolder_val_folder_keeps_train_labels(tmp_path: Path) -> None:
    _write_images(tmp_path / "train" / "cat", ["rgb.png", "grey.png"])
    _write_images(tmp_path / "train" / "dog", ["rgba.png", "photo.jpg"])
    _write_images(tmp_path / "val" / "dog", ["grey.png", "rgba.png", "photo.jpg"])
    dm = build_datamodule(_imagefolder_cfg(tmp_path))
    assert len(dm.train_dataset) == 4 and len(dm.val_dataset) == 3
    images, labels, _ = next(iter(dm.val_dataloader()))
    assert images.shape == (3, 3, 16, 16)
    assert labels.tolist() == [1, 1, 1]  # "dog" is class 1 in train, not 0


def test_imagefolder_missing_root(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError) as err:
        build_datamodule(_imagefolder_cfg(missing)).setup()
    msg = str(err.value)
    assert str(missing) in msg and "train/<class>" in msg and "data.root=" in msg


def test_imagefolder_missing_train_folder(tmp_path: Path) -> None:
    _write_images(tmp_path / "cat", ["rgb.png"])
    with pytest.raises(ConfigError) as err:
        build_datamodule(_imagefolder_cfg(tmp_path)).setup()
    msg = str(err.value)
    assert "'train'" in msg and str(tmp_path) in msg and "train/<class>" in msg


def test_imagefolder_val_only_class(tmp_path: Path) -> None:
    _write_images(tmp_path / "train" / "cat", ["rgb.png"])
    _write_images(tmp_path / "val" / "cat", ["rgb.png"])
    _write_images(tmp_path / "val" / "zebra", ["rgb.png"])
    with pytest.raises(ConfigError) as err:
        build_datamodule(_imagefolder_cfg(tmp_path)).setup()
    assert "zebra" in str(err.value) and "train" in str(err.value)


@pytest.mark.parametrize("name", ["cifar10", "stl10"])
def test_torchvision_missing_files_without_download(tmp_path: Path, name: str) -> None:
    dm = build_datamodule(DataConfig(name=name, root=str(tmp_path), download=False))
    with pytest.raises(ConfigError) as err:
        dm.setup()
    assert "data.download=true" in str(err.value) and str(tmp_path) in str(err.value)
