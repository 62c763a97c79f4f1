"""The t-SNE map of the val features: clusters stay apart, subsampling, refusals and the probe run."""

import json

import numpy as np
import pytest
import torch
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from heatssl.config import load_config
from heatssl.errors import ArgumentError, ConfigError
from heatssl.probing import probe as probing
from heatssl.probing.embedding import balanced_subsample, write_embedding
from tests.probing.synthetic import clusters

NAMES = ["tench", "springer", "cassette", "chainsaw"]


@pytest.fixture(scope="module")
def blobs_map(tmp_path_factory):
    """4 well separated Gaussian blobs, 50 points each in 64-d (float16, as the cache keeps them)."""
    x, y = clusters(50, 4, 64, seed=0)
    path = tmp_path_factory.mktemp("emb") / "embedding.png"
    return write_embedding(x.half(), y, NAMES, path, seed=0, backbone="test_resnet"), y


def test_separated_clusters_stay_apart_in_the_map(blobs_map):
    drawn, y = blobs_map
    assert drawn.path is not None and drawn.path.is_file() and drawn.skipped is None
    assert drawn.path.stat().st_size > 10_000
    assert drawn.path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert drawn.coords.shape == (200, 2) and np.isfinite(drawn.coords).all()
    assert np.array_equal(drawn.labels, y.numpy())
    knn = KNeighborsClassifier(n_neighbors=5)
    acc = cross_val_score(knn, drawn.coords, drawn.labels, cv=5).mean()
    assert acc > 0.9  # a map that lost the clusters (or random points) scores about 0.25
    shuffled = np.random.default_rng(0).permutation(drawn.labels)
    assert cross_val_score(knn, drawn.coords, shuffled, cv=5).mean() < 0.5


def test_balanced_subsample_respects_max_points_and_is_seeded():
    labels = torch.tensor([0] * 100 + [1] * 50 + [2] * 5)
    rows = balanced_subsample(labels, 60, seed=3)
    counts = np.bincount(labels.numpy()[rows], minlength=3)
    assert len(rows) == 60 and len(set(rows.tolist())) == 60
    assert counts[2] == 5 and abs(int(counts[0]) - int(counts[1])) <= 1  # the small class gives all
    assert np.array_equal(rows, np.sort(rows))
    assert np.array_equal(rows, balanced_subsample(labels, 60, seed=3))
    assert not np.array_equal(rows, balanced_subsample(labels, 60, seed=4))
    assert np.array_equal(balanced_subsample(labels, 500), np.arange(155))  # all fit: all kept
    with pytest.raises(ArgumentError, match="max_points=0"):
        balanced_subsample(labels, 0)


def test_max_points_caps_the_map(tmp_path):
    x, y = clusters(20, 4, 16, seed=1)
    drawn = write_embedding(x, y, NAMES, tmp_path / "e.png", max_points=24)
    assert drawn.coords.shape == (24, 2)
    assert np.bincount(drawn.labels).tolist() == [6, 6, 6, 6]


def test_non_finite_features_are_refused(tmp_path):
    x, y = clusters(5, 2, 8, seed=0)
    x[3, 2] = float("nan")
    with pytest.raises(ArgumentError, match=r"1 of 10 feature vectors hold NaN.*probe.embedding"):
        write_embedding(x, y, NAMES, tmp_path / "e.png")
    assert not (tmp_path / "e.png").exists()


@pytest.mark.parametrize(("n", "classes", "why"), [(4, 2, "only 4 val point"), (12, 1, "1 class")])
def test_too_few_points_or_one_class_skip_the_map(tmp_path, n, classes, why):
    x, y = torch.randn(n, 8), torch.arange(n) % classes
    drawn = write_embedding(x, y, NAMES, tmp_path / "e.png")
    assert drawn.path is None and why in drawn.skipped and "\n" not in drawn.skipped
    assert not (tmp_path / "e.png").exists()


def test_max_points_must_be_positive(tiny_overrides):
    with pytest.raises(ConfigError, match=r"probe\.embedding_max_points=0"):
        load_config("demo", [*tiny_overrides, "probe.embedding_max_points=0"])


FAST = ["probe.epochs=2", "probe.batch_size=16", "probe.kinds=[linear]"]


def test_probe_writes_the_map_and_names_it(tiny_overrides, tmp_path):
    cfg = load_config("demo", [*tiny_overrides, *FAST])
    assert cfg.probe.embedding  # the demo recipe keeps it on
    probing.probe("test_resnet", cfg, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["embedding"] == "embedding.png" and report["embedding_seconds"] > 0
    assert (tmp_path / "out" / "embedding.png").stat().st_size > 1000


def test_probe_without_the_map(tiny_overrides, tmp_path):
    cfg = load_config("demo", [*tiny_overrides, *FAST, "probe.embedding=false"])
    probing.probe("test_resnet", cfg, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["embedding"] is None
    assert not (tmp_path / "out" / "embedding.png").exists()


def test_probe_skips_a_map_of_too_few_val_images(tiny_overrides, tmp_path):
    small = ["data.synthetic_size=14", "data.val_fraction=0.3"]  # val: 1 image of classes 0-3
    cfg = load_config("demo", [*tiny_overrides, *FAST, *small])
    with pytest.warns(UserWarning, match="no embedding.png: only 4 val point"):
        probing.probe("test_resnet", cfg, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["embedding"] is None and "only 4" in report["embedding_skipped"]
    assert (tmp_path / "out" / "metrics.md").is_file()
