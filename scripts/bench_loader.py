"""Loader images/s per process on real 224 px JPEGs: PIL before and after this change, and DALI on the CPU.

Each figure comes from a fresh child process that builds the training loader of a recipe-like config
(``data.name=imagefolder`` on ``--data``, the recipe's image size, ``--workers`` worker processes or
DALI threads) and times ``--batches`` batches after ``--warmup`` (:func:`heatssl.data.throughput.
loader_throughput`), ``--repeats`` times (median). Variants:

* ``pil_before``: the package at ``--before`` (a git revision, checked out into a temporary worktree):
  workers decode the full JPEG and send normalised float32 images.
* ``pil_after``: this tree: reduced JPEG decoding where the crop allows, uint8 images, one collate
  copy into shared memory. ``pil_after_normalised`` adds the float conversion and normalisation the
  training process then does (on the CPU here; on a GPU it runs there after the transfer).
* ``dali_cpu``: ``data.backend=dali`` with CPU operators (``data.dali_device=cpu``).

Plus the single-thread decode cost per megapixel of PIL (full and 1/2-scale decoding) and DALI's CPU
decoder on the same files. Run it alone on the machine: two benchmarks on two cores measure nothing.

Usage::

    python scripts/bench_loader.py                    # writes results/loader.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import CpuLoad, machine, run_child

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
import torch
from heatssl.config import load_config
try:
    from heatssl.data.datamodule import build_datamodule
except ImportError:  # the 'before' revision's name for the module
    from heatssl.data.module import build_datamodule
from heatssl.data.throughput import loader_throughput
args = json.loads(sys.argv[1])
cfg = load_config("demo", args["overrides"])
loader = build_datamodule(cfg.data, seed=0).train_dataloader()
out = loader_throughput(loader, batches=args["batches"], warmup=args["warmup"], progress=False)
if args["normalise"]:
    from heatssl.data.transforms import to_model_input
    images, start = 0, None
    for i, batch in enumerate(loader):
        if i == args["warmup"]:
            start = time.perf_counter()
        if i >= args["warmup"]:
            to_model_input(batch[0])
            images += batch[0].shape[0]
        if i >= args["warmup"] + args["batches"] - 1:
            break
    out["images_per_second"] = images / (time.perf_counter() - start)
print("RESULT " + json.dumps(out))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="../shared/data/imagenette-224", help="ImageFolder root")
    p.add_argument("--before", default="4cd58dc", help="git revision of the 'before' loader")
    p.add_argument("--sizes", default="224,256,64", help="output sizes (recipes: 224, 256, 64)")
    p.add_argument("--workers", type=int, default=2, help="loader workers / DALI threads")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=40, help="timed batches per repeat")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode-files", type=int, default=300, help="files for the decode cost")
    p.add_argument("--skip-dali", action="store_true", help="without the DALI variant")
    p.add_argument("--out", default="results/loader.json")
    return p.parse_args(argv)


def loader_child(
    src: Path, overrides: list[str], args: argparse.Namespace, normalise: bool
) -> dict:
    """One loader measurement in a fresh process importing heatssl from ``src``."""
    spec = {
        "overrides": overrides,
        "batches": args.batches,
        "warmup": args.warmup,
        "normalise": normalise,
    }
    return run_child(CHILD, spec, src)


def measure(src: Path, overrides: list[str], args: argparse.Namespace, normalise=False) -> dict:
    """Median images/s over ``--repeats`` fresh loaders."""
    runs = [loader_child(src, overrides, args, normalise) for _ in range(args.repeats)]
    rates = [r["images_per_second"] for r in runs]
    return {"images_per_second": statistics.median(rates), "repeats": rates}


def decode_cost(files: list[Path]) -> dict[str, float]:
    """Single-thread decode milliseconds per megapixel: PIL full, PIL at 1/2 scale, DALI CPU."""
    from PIL import Image

    pixels = 0
    for path in files:
        with Image.open(path) as im:
            pixels += im.size[0] * im.size[1]
    mp = pixels / 1e6
    out: dict[str, float] = {"files": len(files), "megapixels": mp}
    for name, scale in (("pil_full", None), ("pil_half", 2)):
        start = time.perf_counter()
        for path in files:
            with Image.open(path) as im:
                if scale:
                    im.draft(im.mode, (im.size[0] // scale, im.size[1] // scale))
                im.convert("RGB").load()
        out[f"{name}_ms_per_mp"] = 1000 * (time.perf_counter() - start) / mp
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError:
        return out
    data = [np.fromfile(p, dtype=np.uint8) for p in files]

    @pipeline_def(batch_size=len(data), num_threads=1, device_id=None)
    def decode():
        raw = fn.external_source(source=lambda: data, batch=True, dtype=types.UINT8)
        return fn.decoders.image(raw, device="cpu", output_type=types.RGB)

    pipe = decode()
    pipe.build()
    pipe.run()  # warm-up
    start = time.perf_counter()
    pipe.run()
    out["dali_cpu_ms_per_mp"] = 1000 * (time.perf_counter() - start) / mp
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure every variant one after another and write the JSON."""
    args = parse_args(argv)
    data = Path(args.data).resolve()
    if not (data / "train").is_dir():
        raise SystemExit(f"--data {data}: no train/ folder (expected an ImageFolder root).")
    load = CpuLoad()
    report: dict[str, Any] = {"machine": machine(), "args": vars(args), "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(before), args.before],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        try:
            for size in [int(s) for s in args.sizes.split(",")]:
                base = [
                    "data.name=imagefolder",
                    f"data.root={data}",
                    f"data.image_size={size}",
                    f"data.batch_size={args.batch}",
                    f"data.num_workers={args.workers}",
                ]
                row = {
                    "pil_before": measure(before, base, args),
                    "pil_after": measure(ROOT, base, args),
                    "pil_after_normalised": measure(ROOT, base, args, normalise=True),
                }
                if not args.skip_dali:
                    dali = [*base, "data.backend=dali", "data.dali_device=cpu"]
                    row["dali_cpu"] = measure(ROOT, dali, args)
                ref = row["pil_before"]["images_per_second"]
                row["speedup_vs_before"] = {
                    k: v["images_per_second"] / ref for k, v in row.items() if k != "pil_before"
                }
                report["sizes"][str(size)] = row
                print(size, json.dumps({k: v for k, v in row.items()}, indent=1), flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT)
    files = sorted((data / "train").rglob("*.JPEG"))[: args.decode_files]
    files = files or sorted((data / "train").rglob("*.jpg"))[: args.decode_files]
    report["decode"] = decode_cost(files)
    report["foreign_cpu_fraction"] = load.foreign_fraction()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["decode"], indent=1))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
