"""Probes under a low-label protocol: data.label_fraction trains them on a class-balanced subset."""

import json

import torch

from heatssl.config import load_config
from heatssl.data.labels import LABEL_SUBSET_FILE, read_label_subset
from heatssl.probing import probe as probing

FAST_PROBE = ["probe.epochs=3", "probe.tran1_epochs=1", "probe.batch_size=16"]


def test_probes_train_on_the_label_subset_and_save_it(tiny_overrides, tmp_path):
    # 100 images, 10 per class; val holds 2 per class, train 8, a quarter of which is 2 per class
    settings = [*tiny_overrides, *FAST_PROBE, "data.synthetic_size=100"]
    kinds = "probe.kinds=[linear, tran1, knn]"
    cfg = load_config("demo", [*settings, kinds, "data.label_fraction=0.25"])
    out = tmp_path / "out"
    result = probing.probe("test_resnet", cfg, out)
    report = json.loads((out / "metrics.json").read_text())
    saved = read_label_subset(out / LABEL_SUBSET_FILE)
    assert saved["dataset_size"] == 80 and saved["total"] == 20
    assert saved["per_class"] == {str(k): 2 for k in range(10)}
    assert report["label_fraction"] == 0.25
    assert report["labelled_images"] == report["train_images"] == saved["total"]
    assert report["val_images"] == 20  # val stays whole
    assert list(report["probes"]) == ["linear", "tran1", "knn"]
    assert torch.bincount(result.cache.train.labels).tolist() == [2] * 10  # only the subset
    assert "data.label_fraction=0.25 (20 labelled images)" in (out / "metrics.md").read_text()

    # every label again in the same folder: all train images, and no stale subset file
    full = load_config("demo", [*settings, "probe.kinds=[knn]"])
    report = probing.probe("test_resnet", full, out).metrics
    assert report["label_fraction"] == 1.0 and report["labelled_images"] == 80
    assert report["train_images"] == 80 and not (out / LABEL_SUBSET_FILE).exists()
