"""Loader images/s per data source on the same photos: image folder, tar shards, Parquet, streamed.

The 224 px Imagenette subset (``--data``, an image folder) is written once more in each other form
heatssl reads, into a temporary folder: WebDataset tar shards by ``heatssl convert`` (timed), and
Parquet files of ``datasets.Image`` rows (``--per-shard`` rows a file, as the Hub lays them out).
Each source's training loader (``data.name=imagefolder``, ``webdataset``, ``hf``, ``hf`` with
``data.streaming=true``; 224 px, the recipe's crops, ``--workers`` loader processes, batch
``--batch``) then runs in a fresh child process: the seconds from building the data module to its
first batch (listing, index, shard dealing, worker start), then images/s over ``--batches`` batches
after ``--warmup``; ``--repeats`` children per source, median. Run it alone on the machine: two
benchmarks on two cores measure nothing.

It writes ``--out`` (default ``results/sources.json``) as a table for ``scripts/tables.py``, with the
raw figures beside it.

Usage::

    python scripts/bench_sources.py                   # writes results/sources.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import CpuLoad, machine, run_child

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
from heatssl.config import load_config
from heatssl.data.datamodule import build_datamodule
args = json.loads(sys.argv[1])
cfg = load_config("demo", args["overrides"])
start = time.perf_counter()
loader = build_datamodule(cfg.data, seed=0).train_dataloader()
images, first, timed_from = 0, None, None
for i, batch in enumerate(loader):
    if i == 0:
        first = time.perf_counter() - start
    if i == args["warmup"]:
        timed_from = time.perf_counter()
    if i >= args["warmup"]:
        images += batch[0].shape[0]
    if i + 1 >= args["warmup"] + args["batches"]:
        break
seconds = time.perf_counter() - timed_from
print("RESULT " + json.dumps({"first_batch_s": first, "images_per_second": images / seconds,
                              "images": images}))
"""

SOURCES = {
    "imagefolder": ("image folder (`imagefolder`)", []),
    "webdataset": ("tar shards (`webdataset`)", []),
    "hf": ("Parquet, map-style (`hf`)", []),
    "hf_streaming": ("Parquet, streamed (`hf`, `data.streaming=true`)", ["data.streaming=true"]),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="../shared/data/imagenette-224", help="ImageFolder root")
    p.add_argument("--workers", type=int, default=2, help="loader worker processes")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=40, help="timed batches per child")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--per-shard", type=int, default=500, help="images per tar shard / Parquet file")
    p.add_argument("--out", default="results/sources.json")
    return p.parse_args(argv)


def write_parquet(data: Path, out: Path, per_file: int) -> float:
    """The image folder's train and val splits as ``train-*.parquet`` / ``validation-*.parquet``
    (encoded bytes kept, labels as a ClassLabel); the seconds it took."""
    import datasets

    datasets.disable_progress_bars()
    start = time.perf_counter()
    classes = sorted(p.name for p in (data / "train").iterdir() if p.is_dir())
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)}
    )
    out.mkdir(parents=True)
    for split, name in (("train", "train"), ("val", "validation")):
        files = sorted((data / split).glob("*/*.*"))
        rows = {
            "image": [{"bytes": f.read_bytes(), "path": None} for f in files],
            "label": [classes.index(f.parent.name) for f in files],
        }
        table = datasets.Dataset.from_dict(rows, features=features)
        parts = max(1, -(-len(files) // per_file))
        for k in range(parts):
            part = table.shard(parts, k, contiguous=True)
            part.to_parquet(str(out / f"{name}-{k:05d}-of-{parts:05d}.parquet"))
    return time.perf_counter() - start


def table(raw: dict[str, Any], prep: dict[str, float], provenance: dict[str, Any]) -> dict:
    """The results JSON: provenance, the docs' columns and rows (strings as printed), raw figures."""
    rows = []
    for key, (label, _) in SOURCES.items():
        r = raw[key]
        base = raw["imagefolder"]["images_per_second"]
        rows.append(
            {
                "source": label,
                "images_per_s": f"{r['images_per_second']:.0f} ({r['images_per_second'] / base:.2f}x)",
                "first_batch": f"{r['first_batch_s']:.1f} s",
                "files": str(r["files"]),
                "prepare": prep.get(key, "none"),
            }
        )
    columns = [
        {"key": "source", "header": "source (`data.name`)"},
        {"key": "images_per_s", "header": "images/s (vs folder)"},
        {"key": "first_batch", "header": "to the first batch"},
        {"key": "files", "header": "train files opened"},
        {"key": "prepare", "header": "written once by"},
    ]
    return {"provenance": provenance, "columns": columns, "rows": rows, "raw": raw}


def main(argv: list[str] | None = None) -> int:
    """Write the other forms, time every source's loader, save the JSON."""
    args = parse_args(argv)
    data = Path(args.data).resolve()
    if not (data / "train").is_dir():
        print(f"bench_sources: {data}/train is not a folder: give --data an image folder root")
        return 2
    load, started = CpuLoad(), datetime.datetime.now(datetime.timezone.utc)
    raw: dict[str, Any] = {}
    prep: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        shards, parquet = Path(tmp) / "shards", Path(tmp) / "parquet"
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "heatssl.cli", "convert", "-c", "demo", "data.name=imagefolder",
             f"data.root={data}", "-o", str(shards), "--per-shard", str(args.per_shard)],
            cwd=ROOT, check=True, capture_output=True,
        )  # fmt: skip
        prep["webdataset"] = f"`heatssl convert` ({time.perf_counter() - start:.0f} s)"
        seconds = write_parquet(data, parquet, args.per_shard)
        prep["hf"] = prep["hf_streaming"] = f"`datasets` `to_parquet` ({seconds:.0f} s)"
        roots = {"imagefolder": data, "webdataset": shards, "hf": parquet, "hf_streaming": parquet}
        files = {
            "imagefolder": len(list((data / "train").glob("*/*.*"))),
            "webdataset": len(list((shards / "train").glob("*.tar"))),
            "hf": len(list(parquet.glob("train-*.parquet"))),
        }
        files["hf_streaming"] = files["hf"]
        for key, (_, extra) in SOURCES.items():
            name = "hf" if key.startswith("hf") else key
            overrides = [
                f"data.name={name}",
                f"data.root={roots[key]}",
                "data.image_size=224",
                f"data.batch_size={args.batch}",
                f"data.num_workers={args.workers}",
                *extra,
            ]
            spec = {"overrides": overrides, "batches": args.batches, "warmup": args.warmup}
            runs = [run_child(CHILD, spec, ROOT) for _ in range(args.repeats)]
            raw[key] = {
                "images_per_second": statistics.median(r["images_per_second"] for r in runs),
                "first_batch_s": statistics.median(r["first_batch_s"] for r in runs),
                "repeats": runs,
                "files": files[key],
                "overrides": overrides,
            }
            print(f"{key}: {raw[key]['images_per_second']:.0f} images/s", flush=True)
    foreign = load.foreign_fraction()
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    provenance = {
        "command": "python " + shlex.join(["scripts/bench_sources.py", *(argv or sys.argv[1:])]),
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "heatssl_commit": f"{commit} (with the working tree's changes, if any)",
        "machine": machine(),
        "others_cpu_share": foreign,
        "setting": (
            f"{data.name}: train split, 224 px RandomResizedCrop, batch {args.batch}, "
            f"{args.workers} loader workers, median of {args.repeats} fresh loaders, "
            f"{args.batches} batches each after {args.warmup} of warm-up; "
            f"{args.per_shard} images a tar shard or Parquet file"
        ),
        "units": "images/s of one process's training loader; in brackets, the ratio to the folder",
    }
    out = ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table(raw, prep, provenance), indent=2) + "\n")
    print(f"bench_sources: wrote {out} (other processes used {foreign or 0:.1%} of the CPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
