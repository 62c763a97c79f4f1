"""scripts/bench_probe.py on the tiny synthetic config: pretrain, probe, and probe-only overrides."""

import json
import sys
from pathlib import Path

import yaml

from tests.helpers import SCRIPTS, tiny_settings

sys.path.insert(0, str(SCRIPTS))
import bench_probe


def test_probe_override_probes_at_another_size_than_pretraining(tmp_path):
    common = [o for o in tiny_settings(tmp_path) if not o.startswith("run_dir=")]
    out = tmp_path / "quality.json"
    args = [
        "--epochs", "1",
        "--variants", "default",
        "--kinds", "linear", "knn",
        "--probe-override", "data.image_size=64",
        f"--out={out}",
        f"--runs={tmp_path / 'runs'}",
        "--", *common,
    ]  # fmt: skip
    assert bench_probe.main(args) == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"random_init", "default"}
    pretrained = yaml.safe_load((tmp_path / "runs" / "default" / "config.yaml").read_text())
    assert pretrained["data"]["image_size"] == 32  # pretraining kept its own size
    for entry in report["results"].values():
        metrics = json.loads((Path(entry["out_dir"]) / "metrics.json").read_text())
        assert metrics["image_size"] == 64
        assert metrics["feature_grid"][1:] == [8, 8]  # 64 px at output stride 8
        assert 0 <= entry["probes"]["linear"]["top1"] <= 100
