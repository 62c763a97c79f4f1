"""scripts/compare.py end to end on a tiny image folder (heatssl and random init: no LightlySSL)."""

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from tests.helpers import SCRIPTS

SCRIPT = SCRIPTS / "compare.py"


def test_compare_trains_exports_probes_and_plots(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            folder = tmp_path / "data" / split / cls
            folder.mkdir(parents=True)
            for i in range(40 if split == "train" else 8):
                pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    out = tmp_path / "compare.json"
    args = [
        f"--data={tmp_path / 'data'}",
        "--methods", "heatssl", "random",
        "--minutes", "0.02",
        "--points", "0.5", "1.0",
        "--kinds", "linear",
        "--final-kinds", "linear", "knn",
        "--workers", "0",
        f"--out={out}",
        f"--runs={tmp_path / 'runs'}",
    ]  # fmt: skip
    subprocess.run([sys.executable, str(SCRIPT), *args], check=True, capture_output=True)
    report = json.loads(out.read_text())
    heat, rand = report["results"]["heatssl"], report["results"]["random"]
    assert [e["minutes"] for e in heat["exports"]] == [0.01, 0.02]  # a backbone at each point
    assert set(heat["exports"][0]["probes"]) == {"linear"}
    assert set(heat["exports"][-1]["probes"]) == {"linear", "knn"}
    assert heat["images_seen"] == heat["steps"] * heat["batch_size"] > 0
    assert heat["images_per_second"] > 0 and 0 < heat["peak_rss_gib"] < 24
    assert heat["train_seconds"] >= 0.02 * 60
    assert rand["exports"][0]["images_seen"] == 0 and "linear" in rand["exports"][0]["probes"]
    assert out.with_suffix(".png").stat().st_size > 10_000
