"""Tests for heatssl.data: shapes, splits, determinism, ImageFolder handling and error messages."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from heatssl.config import ConfigError, DataConfig
from heatssl.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    HeatDataModule,
    build_datamodule,
    build_transform,
    denormalize,
)

LOW = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)) - 1e-4
HIGH = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)) + 1e-4


def _check_batch(batch, batch_size: int, image_size: int, num_classes: int = 10) -> None:
    images, labels, skipped = batch
    assert skipped == []
    assert images.shape == (batch_size, 3, image_size, image_size)
    assert images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.shape == (batch_size,)
    assert images.min() >= LOW and images.max() <= HIGH
    assert images.std() > 0.1  # not a constant image
    assert labels.min() >= 0 and labels.max() < num_classes


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
    _check_batch(next(iter(digits.train_dataloader())), 16, 32)
    _check_batch(next(iter(digits.val_dataloader())), 16, 32)
    loader = digits.train_dataloader()
    assert loader.drop_last and loader.num_workers == 0 and not loader.persistent_workers
    assert not digits.val_dataloader().drop_last


def test_digits_split_disjoint_and_seeded(digits: HeatDataModule) -> None:
    same = build_datamodule(DataConfig(name="digits", batch_size=16), seed=0)
    other = build_datamodule(DataConfig(name="digits", batch_size=16), seed=1)
    a, b = digits.train_dataset.images, same.train_dataset.images
    assert np.array_equal(a, b)
    assert not np.array_equal(a, other.train_dataset.images)
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
    _check_batch(next(iter(dm.train_dataloader())), 8, 24)
    # classes differ in content: nearest class mean on eval views beats chance by far
    train_eval = HeatDataModule(dataclasses.replace(cfg, augment="none"), seed=0)
    xs, ys = _collect(train_eval.train_dataloader())
    means = torch.stack([xs[ys == k].flatten(1).mean(0) for k in range(10)])
    xv, yv = _collect(dm.val_dataloader())
    pred = torch.cdist(xv.flatten(1), means).argmin(1)
    assert (pred == yv).float().mean() > 0.6


def test_setup_twice_does_not_rebuild(monkeypatch: pytest.MonkeyPatch) -> None:
    from heatssl import data

    calls = []
    real = data.make_synthetic
    monkeypatch.setattr(data, "make_synthetic", lambda *a, **k: calls.append(1) or real(*a, **k))
    dm = HeatDataModule(DataConfig(name="synthetic", synthetic_size=20))
    dm.setup("fit")
    train, val = dm.train_dataset, dm.val_dataset
    dm.setup("fit")
    dm.setup("validate")
    assert dm.train_dataset is train and dm.val_dataset is val
    assert calls == [1]


def test_denormalize_inverts_normalisation() -> None:
    tf = build_transform(8, train=False)
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    x = tf(Image.fromarray(pixels))
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    back = denormalize(x.unsqueeze(0))[0]
    expected = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    assert torch.allclose(back, expected, atol=1e-5)
    assert denormalize(torch.full((2, 3, 4, 4), 100.0)).max() == 1.0


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
    _check_batch(next(iter(dm.train_dataloader())), 4, 16, num_classes=2)
    _check_batch(next(iter(dm.val_dataloader())), 4, 16, num_classes=2)
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


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"val_fraction": 1.0}, "data.val_fraction"),
        ({"crop_scale_min": 0.0}, "data.crop_scale_min"),
        ({"image_size": 0}, "data.image_size"),
    ],
)
def test_bad_values_refused(changes: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        HeatDataModule(DataConfig(**changes))


def test_build_transform_shapes() -> None:
    image = Image.fromarray(np.zeros((40, 25), dtype=np.uint8), mode="L")
    for train, augment in [(True, "ssl"), (True, "none"), (False, "ssl")]:
        out = build_transform(24, train=train, augment=augment)(image)
        assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    with pytest.raises(ConfigError, match="augment"):
        build_transform(24, train=True, augment="heavy")
