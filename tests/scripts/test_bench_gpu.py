"""scripts/bench_gpu.py: every section on the CPU (tiny settings), realistic JPEGs, no GPU refused."""

import json
import sys

import pytest
import torch
from PIL import Image

from tests.helpers import SCRIPTS

sys.path.insert(0, str(SCRIPTS))
import bench_gpu
import loaderlib


def test_the_generated_jpegs_weigh_what_photographs_do(tmp_path):
    stats = loaderlib.generate_images(tmp_path, 3, full=True)
    files = sorted((tmp_path / "train").rglob("*.jpg"))
    assert len(files) == 3 and stats["images"] == 3
    (w_lo, w_hi), (h_lo, h_hi) = loaderlib.FULL_SIZE
    for path in files:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert w_lo <= image.width <= w_hi and h_lo <= image.height <= h_hi
        assert 40_000 <= path.stat().st_size <= 200_000, path.stat().st_size
    assert 40 <= stats["mean_kb"] <= 200 and 0.12 <= stats["mean_megapixels"] <= 0.2


def _measured(figures):
    return "error" not in figures and "skipped" not in figures


def test_every_section_runs_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    assert bench_gpu.main(["--cpu", "--out", str(out), "--work", str(tmp_path)]) == 0
    report = json.loads(out.read_text())
    assert report["mode"] == "cpu" and report["errors"] == [] and "--cpu" in report["command"]
    env = report["environment"]
    for key in ("device", "torch", "cuda", "cudnn", "timm", "lightning", "cpu_cores"):
        assert key in env
    assert env["cpu_cores"] >= 1 and env["workers_per_process"] >= 1
    assert report["data"]["images"] >= 32 and report["data"]["mean_kb"] > 0
    assert report["data"]["mean_megapixels"] > 0
    assert not list(tmp_path.glob("heatssl_bench_gpu_*"))  # the generated data is removed

    recipes = ["imagenet_resnet50", "imagenet_vit_small"]
    assert list(report["steps"]) == recipes
    for recipe in recipes:
        steps = report["steps"][recipe]
        size = steps["image_size"]
        assert set(steps["configs"]) == {
            "qbheat_eager",
            "qbheat_compiled",
            f"full_image_{report['ref_size']}",
            f"full_image_{size}",
        }
        assert "skipped" in steps["configs"].pop("qbheat_compiled")  # not cheap on the CPU
        for figures in steps["configs"].values():
            assert _measured(figures), figures
            assert figures["images_per_second"] > 0 and figures["timed_steps"] >= 1
            reads = figures["host_reads_per_step"]
            assert reads and all(isinstance(n, int) for n in reads)
            assert all(isinstance(n, int) for n in figures["compile_after_warmup"].values())
            assert figures["compile_after_warmup"]["frames_compiled"] == 0
        assert steps["ratio"] > 0 and steps["target"] is None and steps["meets_target"] is None

        loaders = report["loader"][recipe]
        assert "pil" in loaders
        for backend, row in loaders.items():
            if "skipped" in row:
                assert backend != "pil"
                continue
            for share in ("per_process", "whole_machine"):
                assert _measured(row[share]), row[share]
                assert row[share]["images_per_second"] > 0 and row[share]["workers"] >= 1

        ends = report["end_to_end"][recipe]
        assert _measured(ends["pil"]), ends["pil"]
        for e in ends.values():
            if "skipped" in e:
                continue
            assert e["images_per_second"] > 0 and 0 < e["busy_fraction"] <= 1.0 + 1e-6
            assert e["timed_steps"] == report["settings"]["e2e_steps"]
            assert all(isinstance(n, int) for n in e["host_reads_per_plain_step"])
            assert e["host_reads_per_plain_step"] and max(e["host_reads_per_plain_step"]) == 0


def test_cpu_figures_stay_out_of_results(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_gpu.main(["--cpu", "--out", str(bench_gpu.ROOT / "results" / "gpu_cpu.json")])
    assert "outside results/" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_2(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert bench_gpu.main(["--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert "no GPU" in captured.err and not out.exists()
