"""Peak memory of ``heatssl probe`` when the feature grids alone would not fit in host memory.

Runs ``heatssl probe`` (linear, tran-1 and kNN) in a child process on the synthetic dataset, sized so
that the backbone's feature grids of all train and val images (float16) take ``--grid-gib`` GiB, and
reads the child's peak resident memory from ``wait4``. The default backbone, resnet10t dilated to
output stride 8 at 64 px (an 8 x 8 grid of 512 channels, 64 KiB per image), writes grids fast on a
CPU. ``--as-limit-gib`` caps the child's address space, so a run that would exhaust the machine stops
with an allocation error (recorded) instead of meeting the kernel's OOM killer.

Usage::

    python scripts/bench_probe_memory.py --label after           # 8 GiB of grids, JSON under --out
    python scripts/bench_probe_memory.py --grid-gib 0.05 --label smoke

Each run is merged into the JSON under its ``--label``; extra ``key=value`` overrides go to the
probe (e.g. ``probe.tran1_max_images=20000`` to keep tran-1's training time short on a CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from benchlib import machine, wait_with_rusage

from heatssl.config import load_config
from heatssl.runs.build import build_backbone

TARGET_GIB = 2.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--grid-gib", type=float, default=8.0, help="size of all feature grids, GiB")
    p.add_argument("--backbone", default="resnet10t")
    p.add_argument("--output-stride", type=int, default=8)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--kinds", nargs="+", default=["linear", "tran1", "knn"])
    p.add_argument(
        "--as-limit-gib", type=float, default=22.0, help="address-space cap of the probe"
    )
    p.add_argument(
        "--timeout", type=float, default=7200.0, help="seconds before the probe is killed"
    )
    p.add_argument("--label", default="run", help="the entry of this run in --out")
    p.add_argument("--out", default="results/probe_memory.json")
    p.add_argument("overrides", nargs="*", help="more key=value overrides for the probe")
    args = p.parse_args(argv)
    if args.grid_gib <= 0 or args.as_limit_gib <= 0:
        p.error("--grid-gib and --as-limit-gib must be > 0")
    return args


def _overrides(args: argparse.Namespace, images: int, out_dir: Path) -> list[str]:
    return [
        f"model.backbone={args.backbone}",
        f"model.output_stride={args.output_stride}",
        "data.name=synthetic",
        f"data.synthetic_size={images}",
        f"data.image_size={args.image_size}",
        "data.batch_size=256",
        "data.num_workers=0",
        f"probe.kinds=[{', '.join(args.kinds)}]",
        "probe.epochs=2",
        "probe.tran1_epochs=1",
        f"probe.out_dir={out_dir}",
        "trainer.progress_bar=false",
        *args.overrides,
    ]


def grid_bytes_per_image(args: argparse.Namespace) -> int:
    """float16 bytes of one image's grid for the chosen backbone and size."""
    cfg = load_config(None, _overrides(args, 10, Path("unused")))
    backbone = build_backbone(cfg.model, cfg.data.image_size, check_size=False).eval()
    with torch.no_grad():
        grid = backbone(torch.zeros(1, 3, args.image_size, args.image_size))
    return grid[0].numel() * 2


def _cap_address_space(gib: float) -> None:
    limit = int(gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One probe run in a child process: its peak RSS, exit code, wall time and output tail."""
    per_image = grid_bytes_per_image(args)
    images = math.ceil(args.grid_gib * 2**30 / per_image)
    with tempfile.TemporaryDirectory(prefix="heatssl_probe_memory_") as tmp:
        out_dir = Path(tmp) / "probe"
        cmd = [sys.executable, "-m", "heatssl.cli", "probe", args.backbone, "-c", "demo"]
        cmd += _overrides(args, images, out_dir)
        print(
            f"[{args.label}] {images} images x {per_image / 1024:.0f} KiB of grid: {' '.join(cmd)}"
        )
        log_path = Path(tmp) / "probe.log"
        start = time.perf_counter()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "TQDM_DISABLE": "1"},
                preexec_fn=lambda: _cap_address_space(args.as_limit_gib),
            )
            rc, usage, timed_out = wait_with_rusage(proc, args.timeout)
        seconds = time.perf_counter() - start
        tail = log_path.read_text(errors="replace").splitlines()[-12:]
        metrics_file = out_dir / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
    peak = usage.ru_maxrss / 2**20  # KiB -> GiB
    return {
        "images": images,
        "grid_bytes_per_image": per_image,
        "grid_gib": images * per_image / 2**30,
        "command": cmd,
        "returncode": rc,
        "timed_out": timed_out,
        "wall_s": seconds,
        "peak_rss_gib": peak,
        "as_limit_gib": args.as_limit_gib,
        "target_gib": TARGET_GIB,
        "pass": rc == 0 and peak < TARGET_GIB,
        "probes": metrics["probes"] if metrics else None,
        "output_tail": tail,
    }


def main(argv: list[str] | None = None) -> int:
    """Run, print and merge the result into the JSON."""
    args = parse_args(argv)
    result = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = json.loads(out.read_text()) if out.is_file() else {"runs": {}}
    report["runs"][args.label] = {**result, "machine": machine(), "args": vars(args)}
    out.write_text(json.dumps(report, indent=2))
    state = "ok" if result["returncode"] == 0 else f"failed (exit {result['returncode']})"
    print(
        f"[{args.label}] {result['grid_gib']:.2f} GiB of grids: {state}, peak RSS "
        f"{result['peak_rss_gib']:.2f} GiB (target < {TARGET_GIB:g}), {result['wall_s']:.0f} s"
    )
    if result["returncode"]:
        print("  " + "\n  ".join(result["output_tail"]))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
