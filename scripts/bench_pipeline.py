"""Input pipeline vs training step, and 2-process DDP vs one process, on this machine.

Four figures for each recipe of ``--configs`` (default: ``imagenette``, resnet18 at 64 px, and
``imagenette_vit``, vit_tiny/8 at 64 px, on ``../shared/data/imagenette-128``):

* ``loader``: images/s of the training loader alone (JPEG decode, random resized crop, flip,
  normalise, collate) with ``--workers`` worker processes, no model (``heatssl pretrain
  --benchmark-loader`` measures the same).
* ``train_step``: images/s of the QB-Heat training step alone (forward, backward, fused AdamW) on
  one batch already in memory.
* ``pretrain_1proc``: images/s of real ``heatssl pretrain`` runs (loader and step together, one
  process, ``--workers`` loader workers).
* ``pretrain_ddp2``: the same run as 2 DDP processes on the CPU (gloo), per-process batch halved so
  the global batch is the same, one loader worker and one thread per process.

The pretraining throughputs come from two runs of different length (``--short`` and ``--long``
batches); the difference cancels start-up (imports, process spawn, worker start). The pipeline is not
the bottleneck when ``loader`` is well above ``train_step``, and ``pretrain_1proc`` is then close to
``train_step``.

Usage::

    python scripts/bench_pipeline.py                      # writes results/pipeline.json

The JSON holds a table for ``scripts/tables.py`` (docs/benchmarks.md) and the raw figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from benchlib import CpuLoad, machine

from heatssl.config import load_config
from heatssl.data.datamodule import build_datamodule
from heatssl.data.transforms import to_model_input
from heatssl.train import pretrain as run
from heatssl.train.pretrain_module import HeatPretrainModule


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=["imagenette", "imagenette_vit"])
    p.add_argument("--data", default="../shared/data/imagenette-128", help="ImageFolder root")
    p.add_argument("--workers", type=int, default=2, help="loader workers (one process)")
    p.add_argument("--loader-batches", type=int, default=40)
    p.add_argument("--steps", type=int, default=20, help="timed in-memory training steps")
    p.add_argument("--short", type=int, default=20, help="batches of the short pretraining run")
    p.add_argument("--long", type=int, default=100, help="batches of the long pretraining run")
    p.add_argument("--out", default="results/pipeline.json")
    return p.parse_args(argv)


def _config(args: argparse.Namespace, extra: list[str] | None = None) -> Any:
    return load_config(
        args.config,
        [f"data.root={args.data}", f"data.num_workers={args.workers}", *(extra or [])],
    )


def train_step_throughput(args: argparse.Namespace) -> dict[str, float]:
    """QB-Heat training steps on one in-memory batch of real images (median step)."""
    cfg = _config(args)
    datamodule = build_datamodule(cfg.data, seed=cfg.seed)
    datamodule.setup("fit")
    images = to_model_input(next(iter(datamodule.train_dataloader()))[0])
    module = HeatPretrainModule(cfg).train()
    opt = torch.optim.AdamW(module.qbheat.parameters(), lr=1e-4, fused=True)
    times = []
    for i in range(args.steps + 3):
        start = time.perf_counter()
        loss = module.qbheat(images).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 3:  # warm-up steps excluded
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    return {"images_per_second": images.shape[0] / step, "median_step_s": step}


def _pretrain_seconds(args: argparse.Namespace, batches: int, ddp: bool, folder: Path) -> float:
    cfg = _config(args)
    batch = cfg.data.batch_size // 2 if ddp else cfg.data.batch_size
    overrides = [
        f"data.root={args.data}",
        f"run_dir={folder}",
        f"data.batch_size={batch}",
        f"data.num_workers={1 if ddp else args.workers}",
        "trainer.max_epochs=1",
        f"trainer.limit_train_batches={batches}",
        "trainer.progress_bar=false",
        "trainer.picture_every_n_epochs=0",
        "trainer.logger=none",
        "trainer.accelerator=cpu",
        f"trainer.devices={2 if ddp else 1}",
        f"trainer.strategy={'ddp' if ddp else 'auto'}",
    ]
    env = dict(os.environ)
    if ddp:
        env["OMP_NUM_THREADS"] = "1"  # two processes on two cores
    cmd = [sys.executable, "-m", "heatssl.cli", "pretrain", "-c", args.config, *overrides]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    found = re.search(r"done in ([0-9.]+) s", out.stdout)
    if found is None:
        raise RuntimeError(f"no 'done in' line in the output of {' '.join(cmd)}")
    return float(found.group(1))


def pretrain_throughput(args: argparse.Namespace, ddp: bool) -> dict[str, float]:
    """Images/s of real pretraining runs, start-up cancelled by differencing two lengths."""
    global_batch = _config(args).data.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        short = _pretrain_seconds(args, args.short, ddp, Path(tmp) / "short")
        long = _pretrain_seconds(args, args.long, ddp, Path(tmp) / "long")
    images = (args.long - args.short) * global_batch
    return {
        "images_per_second": images / max(long - short, 1e-9),
        "short_run_s": short,
        "long_run_s": long,
        "global_batch": global_batch,
        "processes": 2 if ddp else 1,
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """The four throughputs of the recipe ``args.config``, and their ratios."""
    report: dict[str, Any] = {}
    report["loader"] = run.benchmark_loader(_config(args), args.loader_batches)
    report["train_step"] = train_step_throughput(args)
    report["pretrain_1proc"] = pretrain_throughput(args, ddp=False)
    report["pretrain_ddp2"] = pretrain_throughput(args, ddp=True)
    for key in ("loader", "train_step", "pretrain_1proc", "pretrain_ddp2"):
        print(f"{args.config} {key:>15}: {report[key]['images_per_second']:7.1f} images/s")
    step = report["train_step"]["images_per_second"]
    report["loader_over_step"] = report["loader"]["images_per_second"] / step
    report["pretrain_1proc_over_step"] = report["pretrain_1proc"]["images_per_second"] / step
    one = report["pretrain_1proc"]["images_per_second"]
    report["ddp2_over_1proc"] = report["pretrain_ddp2"]["images_per_second"] / one
    return report


def _row(config: str, r: dict[str, Any]) -> dict[str, str]:
    def rate(key: str) -> str:
        return f"{r[key]['images_per_second']:.0f}"

    return {
        "config": f"`{config}`",
        "loader": f"{rate('loader')} ({r['loader_over_step']:.1f}x the step)",
        "step": rate("train_step"),
        "pretrain": f"{rate('pretrain_1proc')} ({r['pretrain_1proc_over_step']:.2f}x the step)",
        "ddp2": f"{rate('pretrain_ddp2')} ({r['ddp2_over_1proc']:.2f}x)",
    }


def main(argv: list[str] | None = None) -> int:
    """Measure every recipe, print the figures and save the JSON (table and raw figures)."""
    args = parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    load = CpuLoad()
    raw = {}
    for config in args.configs:
        args.config = config
        raw[config] = measure(args)
    del args.config
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    provenance = {
        "command": "python " + shlex.join(["scripts/bench_pipeline.py", *(argv or sys.argv[1:])]),
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "heatssl_commit": f"{commit.strip()} (with the working tree's changes, if any)",
        "machine": machine(),
        "others_cpu_share": load.foreign_fraction(),
        "args": vars(args),
        "units": "images/s; the loader and the step each alone, pretraining end to end",
    }
    columns = [
        {"key": "config", "header": "recipe (`-c`)"},
        {"key": "loader", "header": f"loader alone, {args.workers} workers"},
        {"key": "step", "header": "training step alone"},
        {"key": "pretrain", "header": "`heatssl pretrain`, 1 process"},
        {"key": "ddp2", "header": "2 DDP processes (vs 1)"},
    ]
    rows = [_row(config, r) for config, r in raw.items()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = {"provenance": provenance, "columns": columns, "rows": rows, "raw": raw}
    out.write_text(json.dumps(table, indent=2) + "\n")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
