"""CPU speed benchmark: one QB-Heat training step vs one full-image forward+backward, side by side.

What it measures, per model (resnet18 at 64 px with ``output_stride=16``; vit_tiny with patch 8 at
64 px; and, for context, resnet18 at 128 px where no dilation is needed), in one process and at the
same batch and image size:

* ``qbheat``: a real QB-Heat training step (``QBHeat`` defaults, ``heat_weight=0.1``, ``--step``;
  vit_tiny with the ``imagenette_vit`` recipe's decoder; ``--qbheat ARG=VALUE`` adds arguments):
  forward on the full images (the encoder sees one quarter block), ``loss.backward()``, AdamW
  ``step()``, ``zero_grad()``.
* ``qbheat_noheat``: the same step with ``heat_weight=0`` (no heat residual loss); the heat residual
  overhead is ``time(qbheat) / time(qbheat_noheat) - 1`` (target: at most 5 %).
* ``full_image``: the same backbone construction (same timm kwargs, same ``output_stride``) on the
  full image: forward to the same stage's feature grid, a trivial loss ``grid.pow(2).mean()``,
  backward and an AdamW step over the backbone's parameters; ``full_standard`` the same with the
  backbone as timm builds it by default (no dilation: what a full-image method would train). The
  speedup is ``img/s(qbheat) / img/s(full_image)`` (target: at least 2.5x; the encoder sees a quarter of the
  pixels, so the limit is near 4x).

The four variants are timed in interleaved rounds (a few steps of each, in a rotating order) so
that machine noise drifts over all of them alike; warm-up steps are excluded; every step is timed
with ``time.perf_counter`` and both the median-step and the mean img/s are reported. Ratios and
pass/fail use the median step time.

Finally it runs ``heatssl demo`` in a subprocess (in a temporary run folder) and records its wall
time (target: under 3 minutes) and its peak resident memory (``ru_maxrss`` of the demo process, from
``os.wait4``).

Usage::

    python scripts/bench_speed.py            # defaults: batch 32, 60 timed steps, 2 threads
    python scripts/bench_speed.py --out results/speed.json --batch 32 --steps 60 \\
        --warmup 3 --threads 2 [--round 3] [--step euler] [--skip-demo] [--unfused-adamw]

It prints a table and writes the JSON (machine info, settings, per-step times, img/s, ratios,
pass/fail) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from benchlib import CpuLoad, machine, wait_with_rusage
from steplib import count_params, full_image_step_fn, qbheat_step_fn, summarize

from heatssl.model.backbone import Backbone
from heatssl.model.qbheat import QBHeat

SPEEDUP_TARGET = 2.5
HEAT_OVERHEAD_TARGET = 0.05
DEMO_SECONDS_TARGET = 180.0
VARIANTS = ("qbheat", "qbheat_noheat", "full_image", "full_standard")


@dataclass
class ModelSpec:
    """One backbone setting to benchmark."""

    key: str
    label: str
    name: str
    image_size: int
    output_stride: int | None = None
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    qbheat_kwargs: dict[str, Any] = field(default_factory=dict)  # the recipe's decoder and heat

    def build(self, standard: bool = False) -> Backbone:
        """A fresh :class:`Backbone` of this setting (same construction for every variant);
        ``standard``: as timm builds it by default (no ``output_stride`` dilation)."""
        return Backbone(
            self.name,
            image_size=self.image_size,
            output_stride=None if standard else self.output_stride,
            check_size=not standard,
            **self.timm_kwargs,
        )


MODELS: tuple[ModelSpec, ...] = (
    # At the default stride 32 a 64 px image gives a 32 px block -> 1x1 grid, which QB-Heat refuses.
    ModelSpec("resnet18", "resnet18@64 (os16)", "resnet18", 64, output_stride=16),
    ModelSpec(  # as the imagenette_vit recipe: a 64-wide decoder without upsampling block
        "vit_tiny",
        "vit_tiny/8@64",
        "vit_tiny_patch16_224",
        64,
        timm_kwargs={"patch_size": 8},
        qbheat_kwargs={"decoder_width": 64, "decoder_upsample_blocks": 0},
    ),
    # Context: the same CNN where no dilation is needed (128 px -> 64 px block -> 2x2 at stride 32).
    ModelSpec("resnet18_128", "resnet18@128 (os32)", "resnet18", 128),
)


def bench_model(spec: ModelSpec, args: argparse.Namespace) -> dict[str, Any]:
    """Time the four variants of one model in interleaved rounds."""
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, spec.image_size, spec.image_size)
    backbones = {v: spec.build(standard=v == "full_standard") for v in VARIANTS}
    extra = {**spec.qbheat_kwargs, **args.qbheat_kwargs}
    base = {"step": args.step, "heat_weight": 0.1, **extra}
    qb_heat = QBHeat(backbones["qbheat"], **base).train()
    qb_noheat = QBHeat(backbones["qbheat_noheat"], **{**base, "heat_weight": 0.0}).train()
    full = backbones["full_image"].train()
    steps: dict[str, Callable[[], float]] = {
        "qbheat": qbheat_step_fn(qb_heat, images, args.fused_adamw),
        "qbheat_noheat": qbheat_step_fn(qb_noheat, images, args.fused_adamw),
        "full_image": full_image_step_fn(full, images, args.fused_adamw),
        "full_standard": full_image_step_fn(
            backbones["full_standard"].train(), images, args.fused_adamw
        ),
    }
    with torch.no_grad():
        half = spec.image_size // 2
        block_grid = tuple(full(images[:1, :, :half, :half]).shape[1:])
        full_grid = tuple(full(images[:1]).shape[1:])

    print(f"\n[{spec.label}] block grid {block_grid}, full grid {full_grid}, batch {args.batch}")
    for name, fn in steps.items():
        start = time.perf_counter()
        for _ in range(args.warmup):
            fn()
        print(f"  warm-up {name:<14} {args.warmup} steps in {time.perf_counter() - start:6.1f} s")

    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    rounds = -(-args.steps // args.round)
    foreign: list[float | None] = []
    for r in range(rounds):
        load = CpuLoad()
        turn = r % len(VARIANTS)
        order = VARIANTS[turn:] + VARIANTS[:turn]  # rotate who goes first
        n = min(args.round, args.steps - r * args.round)
        for name in order:
            for _ in range(n):
                start = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - start)
        foreign.append(load.foreign_fraction())
        done = ", ".join(f"{v} {statistics.median(times[v]) * 1e3:.0f} ms" for v in VARIANTS)
        other = "n/a" if foreign[-1] is None else f"{foreign[-1]:.0%}"
        print(f"  round {r + 1}/{rounds}: median so far: {done}; other processes' CPU {other}")

    results = {v: summarize(times[v], args.batch) for v in VARIANTS}
    speedup = results["qbheat"]["img_per_s_median"] / results["full_image"]["img_per_s_median"]
    standard = results["qbheat"]["img_per_s_median"] / results["full_standard"]["img_per_s_median"]
    speedup_mean = results["qbheat"]["img_per_s_mean"] / results["full_image"]["img_per_s_mean"]
    overhead = results["qbheat"]["median_s"] / results["qbheat_noheat"]["median_s"] - 1.0
    overhead_mean = results["qbheat"]["mean_s"] / results["qbheat_noheat"]["mean_s"] - 1.0
    return {
        "settings": {
            "label": spec.label,
            "name": spec.name,
            "timm_kwargs": dict(backbones["full_image"].create_kwargs),
            "image_size": spec.image_size,
            "output_stride": spec.output_stride,
            "batch": args.batch,
            "optimizer": "AdamW(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05"
            + (", fused=True)" if args.fused_adamw else ") torch default implementation"),
            "reduction": backbones["full_image"].reduction,
            "block_grid": list(block_grid),
            "full_grid": list(full_grid),
            "qbheat_kwargs": f"QBHeat defaults except step={args.step}, heat_weight 0.1 / 0.0"
            + (f", {extra}" if extra else ""),
            "params": {
                "backbone": count_params(full),
                "qbheat_total": count_params(qb_heat),
                "decoder": count_params(qb_heat.decoder),
                "predictor": count_params(qb_heat.predictor),
            },
            "note": (
                "full_image uses the same Backbone construction (same timm kwargs and "
                "output_stride) as QB-Heat's encoder, on the whole image, to the same stage grid; "
                "full_standard the backbone as timm builds it by default (no dilation); "
                "loss = grid.float().pow(2).mean(); AdamW over the backbone parameters."
            ),
        },
        "variants": results,
        "foreign_cpu_fraction_per_round": foreign,
        "step_times_s": times,
        "speedup_median": speedup,
        "speedup_vs_standard_median": standard,
        "speedup_mean": speedup_mean,
        "speedup_pass": speedup >= SPEEDUP_TARGET,
        "heat_overhead_median": overhead,
        "heat_overhead_mean": overhead_mean,
        "heat_overhead_pass": overhead <= HEAT_OVERHEAD_TARGET,
    }


def run_demo(timeout: float) -> dict[str, Any]:
    """Run ``heatssl demo`` in a subprocess; return wall time, peak RSS and pass/fail."""
    load = CpuLoad()
    with tempfile.TemporaryDirectory(prefix="heatssl_bench_demo_") as tmp:
        cmd = [sys.executable, "-m", "heatssl.cli", "demo", f"run_dir={Path(tmp) / 'demo'}"]
        print(f"\n[demo] {' '.join(cmd)}  (output captured)")
        log_path = Path(tmp) / "demo.log"
        start = time.perf_counter()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            rc, usage, timed_out = wait_with_rusage(proc, timeout)
        seconds = time.perf_counter() - start
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
    if rc != 0:
        print("[demo] FAILED, last lines:\n  " + "\n  ".join(tail))
    return {
        "command": cmd,
        "returncode": rc,
        "timed_out": timed_out,
        "wall_s": seconds,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mib": usage.ru_maxrss / 1024.0,
        "peak_rss_note": (
            "ru_maxrss (KiB on Linux) of the demo process from os.wait4: the demo's own peak "
            "resident set (or its largest waited child's, if larger)"
        ),
        "foreign_cpu_fraction": load.foreign_fraction(),
        "timeout_s": timeout,
        "target_s": DEMO_SECONDS_TARGET,
        "pass": rc == 0 and not timed_out and seconds < DEMO_SECONDS_TARGET,
        "output_tail": tail,
    }


def print_table(models: list[dict[str, Any]]) -> None:
    """The readable side-by-side table."""
    head = f"{'model':<20} {'variant':<14} {'ms/step':>8} {'img/s med':>10} {'img/s mean':>10}"
    print("\n" + head + "\n" + "-" * len(head))
    for m in models:
        for v in VARIANTS:
            r = m["variants"][v]
            print(
                f"{m['settings']['label']:<20} {v:<14} {r['median_s'] * 1e3:8.1f} "
                f"{r['img_per_s_median']:10.1f} {r['img_per_s_mean']:10.1f}"
            )
    print()
    for m in models:
        label = m["settings"]["label"]
        ok = "PASS" if m["speedup_pass"] else "FAIL"
        print(
            f"{label:<20} speedup QB-Heat / full image: {m['speedup_median']:.2f}x "
            f"(mean {m['speedup_mean']:.2f}x)  target >= {SPEEDUP_TARGET}x  {ok}; "
            f"against the undilated standard backbone: {m['speedup_vs_standard_median']:.2f}x"
        )
        ok = "PASS" if m["heat_overhead_pass"] else "FAIL"
        print(
            f"{'':<20} heat residual overhead:       {m['heat_overhead_median'] * 100:+.1f}% "
            f"(mean {m['heat_overhead_mean'] * 100:+.1f}%)  target <= "
            f"{HEAT_OVERHEAD_TARGET * 100:.0f}%  {ok}"
        )
        fractions = [f for f in m["foreign_cpu_fraction_per_round"] if f is not None]
        if fractions:
            noisy = "  (NOISY: others used the CPU)" if max(fractions) > 0.1 else ""
            print(
                f"{'':<20} other processes' CPU share per round: max {max(fractions):.0%}, "
                f"mean {statistics.fmean(fractions):.0%}{noisy}"
            )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results/speed.json", help="JSON output path")
    p.add_argument("--batch", type=int, default=32, help="images per step")
    p.add_argument("--steps", type=int, default=60, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per variant")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--round", type=int, default=3, help="steps per variant per round")
    p.add_argument(
        "--models",
        nargs="+",
        choices=[m.key for m in MODELS],
        default=[m.key for m in MODELS],
        help="which models to time",
    )
    p.add_argument(
        "--qbheat",
        action="append",
        default=[],
        metavar="ARG=VALUE",
        help="a QBHeat argument for both QB-Heat variants, e.g. heat_dim=64 (repeatable)",
    )
    p.add_argument(
        "--unfused-adamw",
        dest="fused_adamw",
        action="store_false",
        help="torch's default AdamW instead of fused=True (heatssl.train.pretrain_module uses fused)",
    )
    p.add_argument(
        "--step",
        choices=["normalized", "euler"],
        default="normalized",
        help="heat step rule of the QB-Heat variants (default: the package default)",
    )
    p.add_argument("--skip-demo", action="store_true", help="do not run `heatssl demo`")
    p.add_argument("--demo-timeout", type=float, default=600.0, help="kill the demo after this")
    args = p.parse_args(argv)
    if min(args.batch, args.steps, args.threads, args.round) < 1 or args.warmup < 0:
        p.error("--batch, --steps, --threads and --round must be >= 1, --warmup >= 0")
    args.qbheat_kwargs = {}
    for text in args.qbheat:
        key, sep, value = text.partition("=")
        if not sep or not key:
            p.error(f"--qbheat {text!r}: expected ARG=VALUE, e.g. heat_dim=64")
        args.qbheat_kwargs[key] = yaml.safe_load(value)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine(requested_threads=args.threads)
    print(
        f"torch {info['torch']}, timm {info['timm']}, {info['torch_threads']} threads, "
        f"{info['cpu_count']} CPUs ({info['cpu_model']}), load {info['loadavg_start']}"
    )
    start = time.perf_counter()
    models = [bench_model(spec, args) for spec in MODELS if spec.key in args.models]
    bench_seconds = time.perf_counter() - start
    info["loadavg_after_models"] = list(os.getloadavg())
    demo = None if args.skip_demo else run_demo(args.demo_timeout)
    print_table(models)
    if demo is not None:
        ok = "PASS" if demo["pass"] else "FAIL"
        print(
            f"demo: {demo['wall_s']:.1f} s (target < {DEMO_SECONDS_TARGET:.0f} s) {ok}, "
            f"rc {demo['returncode']}, peak RSS {demo['peak_rss_mib']:.0f} MiB, other processes' "
            f"CPU share {demo['foreign_cpu_fraction'] or 0:.0%}"
        )
    report = {
        "machine": info,
        "args": vars(args),
        "targets": {
            "speedup_min": SPEEDUP_TARGET,
            "heat_overhead_max": HEAT_OVERHEAD_TARGET,
            "demo_seconds_max": DEMO_SECONDS_TARGET,
        },
        "method": (
            "Interleaved rounds of --round steps per variant in rotating order; warm-up excluded; "
            "per-step time.perf_counter; ratios and pass/fail from median step times."
        ),
        "bench_seconds": bench_seconds,
        "models": models,
        "demo": demo,
        "all_pass": all(m["speedup_pass"] and m["heat_overhead_pass"] for m in models)
        and (demo is None or demo["pass"]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
