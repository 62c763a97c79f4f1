"""scripts/compare.py end to end on a tiny image folder (heatssl and random init: no LightlySSL)."""

import json
import subprocess
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.helpers import SCRIPTS

SCRIPT = SCRIPTS / "compare.py"


def _folder(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            folder = tmp_path / "data" / split / cls
            folder.mkdir(parents=True)
            for i in range(40 if split == "train" else 8):
                pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def _compare(tmp_path, *args):
    """compare.py on a tiny folder, heatssl and random init, 0.02 minutes; its report and output."""
    _folder(tmp_path)
    out = tmp_path / "compare.json"
    common = [f"--data={tmp_path / 'data'}", "--methods", "heatssl", "random", "--minutes", "0.02"]
    common += ["--workers", "0", f"--out={out}", f"--runs={tmp_path / 'runs'}"]
    run = subprocess.run(
        [sys.executable, str(SCRIPT), *common, *args], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(out.read_text()), run, out


def test_compare_trains_exports_probes_and_plots(tmp_path):
    kinds = ["--kinds", "linear", "--final-kinds", "linear", "knn"]
    report, _, out = _compare(tmp_path, "--points", "0.5", "1.0", *kinds)
    heat, rand = report["results"]["heatssl"], report["results"]["random"]
    assert [e["minutes"] for e in heat["exports"]] == [0.01, 0.02]  # a backbone at each point
    assert set(heat["exports"][0]["probes"]) == {"linear"}
    assert set(heat["exports"][-1]["probes"]) == {"linear", "knn"}
    assert heat["images_seen"] == heat["steps"] * heat["batch_size"] > 0
    assert heat["images_per_second"] > 0 and 0 < heat["peak_rss_gib"] < 24
    assert heat["train_seconds"] >= 0.02 * 60
    assert rand["exports"][0]["images_seen"] == 0 and "linear" in rand["exports"][0]["probes"]
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_a_teacher_objective_is_updated_and_both_encoders_are_exported_and_probed(tmp_path):
    teacher = ["--set", "loss.target=both", "loss.teacher_momentum=0.5"]
    report, run, _ = _compare(tmp_path, "--final-kinds", "linear", *teacher)
    assert report["args"]["overrides"] == ["loss.target=both", "loss.teacher_momentum=0.5"]
    final = report["results"]["heatssl"]["exports"][-1]
    assert set(final["probes"]) == set(final["teacher_probes"]) == {"linear"}
    student, teacher = (load_file(final[k]) for k in ("path", "teacher_path"))
    start = load_file(report["results"]["random"]["exports"][0]["path"])  # same seed: same init
    weights = [k for k in student if "running" not in k and "num_batches" not in k]
    assert any(not torch.equal(teacher[k], start[k]) for k in weights), "the teacher never moved"
    assert any(not torch.equal(teacher[k], student[k]) for k in weights), (
        "no EMA: teacher = student"
    )
    assert "(EMA teacher)" in run.stdout
