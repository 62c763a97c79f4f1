"""scripts/gpu_smoke.sh: the GPU chain's plumbing on the CPU, and a clear refusal without a GPU."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import SCRIPTS


def _smoke(tmp_path, *args):
    env = {**os.environ, "PYTHON": sys.executable}
    out = tmp_path / "smoke.json"
    proc = subprocess.run(
        ["bash", str(SCRIPTS / "gpu_smoke.sh"), *args, f"--out={out}", f"--runs={tmp_path}/runs"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc, out


def test_the_chain_runs_for_both_recipes_on_the_cpu(tmp_path):
    args = ["--device", "cpu", "--data", "synthetic", "--steps", "3", "--warmup", "1"]
    proc, out = _smoke(tmp_path, *args, "--batch", "4", "--workers", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert [r["recipe"] for r in results] == ["imagenet_resnet50", "imagenet_vit_small"]
    for r in results:
        assert r["ok"] and r["steps"] == 3 and r["images_per_second"] > 0
        assert set(r["probes"]) == {"linear", "knn"}
        assert all(os.path.getsize(p) > 1000 for p in r["heatmap_sheets"].values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_and_fails(tmp_path):
    proc, out = _smoke(tmp_path)
    assert proc.returncode == 2 and "no GPU here" in proc.stderr and not out.exists()
