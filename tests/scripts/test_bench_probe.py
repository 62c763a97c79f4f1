"""scripts/bench_probe.py on the tiny synthetic config: pretrain, probe, and probe-only overrides."""

import json
import sys
from pathlib import Path

import pytest
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


def test_reuse_probes_the_existing_checkpoint_and_refuses_another_config(tmp_path):
    common = [o for o in tiny_settings(tmp_path) if not o.startswith("run_dir=")]
    runs = tmp_path / "runs"
    base = ["--epochs", "1", "--variants", "default", "--no-random", f"--runs={runs}"]
    first = tmp_path / "first.json"
    assert bench_probe.main([*base, "--kinds", "linear", f"--out={first}", "--", *common]) == 0
    ckpt = runs / "default" / "checkpoints" / "last.ckpt"
    stamp = ckpt.stat().st_mtime_ns

    again = tmp_path / "again.json"
    args = [*base, "--reuse", "--kinds", "linear", "knn", f"--out={again}", "--", *common]
    assert bench_probe.main(args) == 0
    assert ckpt.stat().st_mtime_ns == stamp  # not pretrained again
    entry = json.loads(again.read_text())["results"]["default"]
    assert entry["reused"] == str(ckpt)
    assert set(entry["probes"]) == {"linear", "knn"}
    # The same checkpoint probed the same way gives the same linear figure.
    before = json.loads(first.read_text())["results"]["default"]["probes"]["linear"]["top1"]
    assert entry["probes"]["linear"]["top1"] == pytest.approx(before, abs=1e-6)

    other = [*base, "--reuse", f"--out={tmp_path / 'other.json'}", "--", *common, "seed=7"]
    with pytest.raises(SystemExit, match=r"seed: ran 0, wanted 7"):
        bench_probe.main(other)
