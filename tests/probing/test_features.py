"""Tests for heatssl.probing.features: one backbone pass per image, the cache layout, label checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from heatssl.errors import ConfigError
from heatssl.model.backbone import Backbone
from heatssl.probing.features import FeatureCache, FeatureSet, build_cache, check_labels, extract
from heatssl.probing.grid_store import GridStore

CPU = torch.device("cpu")


class Counting(nn.Module):
    """Wraps a backbone; counts the images it sees and records its mode during each call."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.images = 0
        self.calls = 0
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += x.shape[0]
        self.calls += 1
        self.modes.append(self.inner.training)
        return self.inner(x)


@pytest.fixture(scope="module")
def resnet() -> Backbone:
    torch.manual_seed(0)
    return Backbone("test_resnet", image_size=64, check_size=False)


def _loader(n: int, batch_size: int, seed: int = 0, labels: torch.Tensor | None = None):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 64, 64, generator=gen)
    if labels is None:
        labels = torch.arange(n) % 3
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=False), images


def _set(labels: list[int], d: int = 4) -> FeatureSet:
    return FeatureSet.from_grids(torch.zeros(len(labels), d, 2, 2), torch.tensor(labels))


# ------------------------------------------------------------------------------------------ extract


@pytest.mark.parametrize("start_training", [True, False])
def test_extract_one_pass_pooled_float16_in_order(resnet, start_training, tmp_path):
    wrapped = Counting(resnet)
    wrapped.train(start_training)
    labels = torch.tensor([2, 0, 1, 1, 0, 2, 2])
    loader, images = _loader(7, batch_size=3, labels=labels)  # batches of 3, 3, 1

    feats = extract(wrapped, loader, CPU)

    assert wrapped.images == 7 and wrapped.calls == 3
    assert wrapped.modes == [False, False, False]  # eval mode while extracting
    assert wrapped.training is start_training and resnet.training is start_training
    d = resnet.num_features
    assert feats.grids is None and feats.grid_shape == (d, 2, 2)  # no grids unless asked
    assert feats.pooled.shape == (7, d) and feats.pooled.dtype == torch.float16
    assert feats.labels.dtype == torch.long
    assert torch.equal(feats.labels, labels)
    assert len(feats) == 7
    # Pooled features are the eval-mode backbone outputs' spatial means, in loader order.
    resnet.eval()
    with torch.no_grad():
        ref = resnet(images)
    resnet.train(start_training)
    torch.testing.assert_close(feats.pooled.float(), ref.mean((2, 3)), atol=2e-3, rtol=2e-3)

    # With a file for the grids, they are written there in loader order, float16.
    stored = extract(resnet, loader, CPU, grids_to=tmp_path / "g.f16")
    assert isinstance(stored.grids, GridStore) and stored.grids.shape == (7, d, 2, 2)
    assert (tmp_path / "g.f16").stat().st_size == 7 * d * 4 * 2
    torch.testing.assert_close(stored.grids[:], ref.half(), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(stored.pooled, feats.pooled)
    stored.grids.delete()
    assert not (tmp_path / "g.f16").exists()


def test_extract_no_grad():
    seen = []

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 4, stride=4)

        def forward(self, x):
            seen.append(torch.is_grad_enabled())
            return self.conv(x)

    loader, _ = _loader(4, batch_size=2)
    feats = extract(Probe(), loader, CPU)
    assert seen == [False, False]
    assert feats.grid_shape == (5, 16, 16) and not feats.pooled.requires_grad


def test_extract_empty_loader_raises():
    empty = DataLoader(TensorDataset(torch.zeros(0, 3, 8, 8), torch.zeros(0, dtype=torch.long)))
    model = Counting(nn.Conv2d(3, 2, 4, stride=4))
    model.train()
    with pytest.raises(ConfigError, match="empty"):
        extract(model, empty, CPU, desc="val features")
    assert model.images == 0
    assert model.training  # restored even though nothing was extracted


# -------------------------------------------------------------------------------------- build_cache


def test_build_cache_counts_and_layout(resnet, tmp_path):
    wrapped = Counting(resnet)
    wrapped.train()
    train_loader, train_images = _loader(10, batch_size=4, seed=1)
    val_loader, val_images = _loader(5, batch_size=2, seed=2)
    names = ["cat", "dog", "eel"]

    cache = build_cache(wrapped, train_loader, val_loader, names, CPU, grid_dir=tmp_path)

    assert isinstance(cache, FeatureCache)
    assert wrapped.images == 15 and wrapped.calls == 3 + 3
    assert not any(wrapped.modes)
    assert wrapped.training and resnet.training
    d = resnet.num_features
    assert cache.train.grids.shape == (10, d, 2, 2) and cache.val.grids.shape == (5, d, 2, 2)
    assert cache.train.pooled.shape == (10, d) and cache.val.pooled.shape == (5, d)
    assert torch.equal(cache.train.labels, torch.arange(10) % 3)
    assert torch.equal(cache.val.labels, torch.arange(5) % 3)
    assert cache.class_names == names and cache.class_names is not names
    assert cache.num_classes == 3
    assert cache.seconds > 0
    resnet.eval()
    with torch.no_grad():
        train_ref = resnet(train_images).half()
        val_ref = resnet(val_images).half()
    resnet.train()
    torch.testing.assert_close(cache.train.grids[:], train_ref, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(cache.val.grids[:], val_ref, atol=2e-3, rtol=2e-3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_grids.f16", "val_grids.f16"]
    cache.delete_grids()
    assert not list(tmp_path.iterdir()) and cache.train.grids is None


def test_build_cache_checks_labels():
    train_loader, _ = _loader(6, batch_size=3, labels=torch.tensor([0, 1, 0, 1, 0, 1]))
    val_loader, _ = _loader(3, batch_size=3, labels=torch.tensor([0, 2, 1]))
    with pytest.raises(ConfigError, match="zebra"):
        build_cache(
            nn.Conv2d(3, 2, 8, stride=8), train_loader, val_loader, ["a", "b", "zebra"], CPU
        )


# ---------------------------------------------------------------------------------------- FeatureSet


def test_pooled_is_the_spatial_mean_in_float16():
    grids = torch.randn(6, 5, 3, 4).half()
    fs = FeatureSet.from_grids(grids, torch.zeros(6, dtype=torch.long))
    assert fs.pooled.dtype == torch.float16 and fs.pooled.shape == (6, 5)
    assert torch.equal(fs.pooled, grids.float().mean((2, 3)).half())
    assert fs.grid_shape == (5, 3, 4) and fs.grids is grids


# ------------------------------------------------------------------------------------- check_labels


def test_check_labels_accepts_valid():
    check_labels(_set([0, 1, 2, 1]), _set([2, 0]), ["a", "b", "c"])


@pytest.mark.parametrize("where", ["train", "val"])
def test_check_labels_unlabelled(where):
    bad = [0, -1, 1]
    train = _set(bad if where == "train" else [0, 1, 1])
    val = _set(bad if where == "val" else [0, 1])
    with pytest.raises(ConfigError, match=rf"{where}.*label") as err:
        check_labels(train, val, ["a", "b"])
    assert "-1" in str(err.value)


def test_check_labels_single_train_class():
    with pytest.raises(ConfigError, match="at least two"):
        check_labels(_set([1, 1, 1]), _set([1]), ["a", "b"])


def test_check_labels_val_class_unseen_in_train():
    names = ["apple", "banana", "cherry", "durian"]
    with pytest.raises(ConfigError, match="cherry") as err:
        check_labels(_set([0, 1, 0, 3]), _set([0, 2, 3]), names)
    msg = str(err.value)
    assert "apple" not in msg and "durian" not in msg


def test_check_labels_refuses_labels_without_class_names():
    grids = torch.zeros(4, 2, 1, 1, dtype=torch.float16)
    train = FeatureSet.from_grids(grids, torch.tensor([0, 1, 2, 0]))
    val = FeatureSet.from_grids(grids, torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ConfigError, match="Label 2 has no class name"):
        check_labels(train, val, ["a", "b"])


# ----------------------------------------------------------------- scale: subsets, buffers, syncs


def test_only_the_subsets_train_grids_are_written_and_tran1_gets_their_labels(resnet, tmp_path):
    """tran-1 on a subset: the grids of the other rows never reach the disk (on ImageNet they
    are most of 350 GB)."""
    train_loader, _ = _loader(10, 4)
    val_loader, _ = _loader(4, 4, seed=1)
    rows = torch.tensor([1, 4, 5, 9])
    cache = build_cache(resnet, train_loader, val_loader, ["a", "b", "c"], CPU, tmp_path, rows)
    try:
        assert cache.train.grids.rows == 4 and cache.val.grids.rows == 4
        assert torch.equal(cache.train.grid_rows, rows)
        full = build_cache(resnet, train_loader, val_loader, ["a", "b", "c"], CPU, tmp_path / "all")
        torch.testing.assert_close(cache.train.grids[torch.arange(4)], full.train.grids[rows])
        full.delete_grids()
    finally:
        cache.delete_grids()


def test_a_loader_without_a_dataset_gets_buffers_sized_from_its_sampler():
    """A DALI loader has no dataset: its feature cache was sized 1,024 rows and grew by doubling
    (copies of the whole cache); its sampler says how many rows come."""
    from heatssl.data.sampler import EpochSampler
    from heatssl.probing.features import planned_rows

    loader = type("DaliLike", (), {"sampler": EpochSampler(3000, shuffle=False)})()
    assert planned_rows(loader) == 3000
    assert planned_rows(type("Unsized", (), {})()) == 1024


def test_extraction_and_the_linear_heads_loop_read_nothing_on_the_host_per_step(
    resnet, monkeypatch
):
    """On a GPU each of these reads makes the host wait for the device: the extraction copies
    into host buffers asynchronously and the probe head's loss is read once, after training."""
    from heatssl.probing.probes import train_head

    reads: list[str] = []
    for name in ("item", "tolist", "cpu", "__bool__", "__float__", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(t, *a, _n=name, _f=original, **k):
            reads.append(_n)
            return _f(t, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    extract(resnet, _loader(4, 4)[0], CPU)
    once = len(reads)  # the DataLoader's own seed draw, per pass
    reads.clear()
    extract(resnet, _loader(24, 4)[0], CPU)
    assert len(reads) == once  # six batches: nothing more per batch
    reads.clear()
    head = nn.Linear(8, 3)
    losses = train_head(head, torch.randn(64, 8), torch.arange(64) % 3, 3, 8, "sgd", 0.1)
    assert len(losses) == 3 and reads == ["tolist"]  # 24 steps, one read at the end
