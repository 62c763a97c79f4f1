"""QB-Heat's GPU throughput in one command: the step alone, the loader alone, and both together.

The CPU benchmarks (bench_speed.py, bench_loader.py, bench_host_syncs.py) give ratios and counts on
two cores; whether QB-Heat keeps its advantage on a GPU, whether one GPU's share of a node's cores
feeds it and whether a step makes the host wait show only on a GPU. On one, for each recipe
(``imagenet_resnet50``, ``imagenet_vit_small``; their per-GPU batch unless ``--batch``):

1. **Data**: ImageNet-like JPEGs (400-500 x 300-400 px, about 100 kB at quality 90, textured) as
   ``train/<class>/*.jpg`` in a temporary folder (under ``--work``; removed unless ``--keep``).
2. **The step alone** on a batch already on the GPU, timed with CUDA events after warm-up (median
   step -> images/s): QB-Heat eager and compiled (``HeatPretrainModule.configure_model``), and the
   full-image backbone (eager) at 224 px and at the recipe's size; all with bf16 autocast,
   channels_last, fused AdamW and gradient clipping, as the recipes train. The ratio QB-Heat /
   full image at 224 px, eager against eager, is held against the target (resnet50 2.2x, vit_small
   3x: the FLOP ratios in docs/benchmarks.md); the compiled one is shown beside it.
3. **The loader alone**, for every ``data.backend`` heatssl offers (``dali`` where ``nvidia.dali``
   imports), at one process's share of the cores (``--gpus-per-node``; ``data.num_workers=auto``
   as the Trainer sets it) and at the whole machine's.
4. **Loader + step end to end**: a short ``heatssl pretrain`` (compiled, one process's workers);
   the time the GPU spends in steps as a share of the wall time.
5. Per configuration: CUDA syncs per step (``torch.cuda.set_sync_debug_mode("warn")``) and host
   reads of tensors, recompiles and graph breaks after warm-up, peak GPU memory.

It writes one JSON (versions, cores, every figure, the command) and prints a summary. Without a
GPU it says so and exits with 2. ``--cpu`` runs the same code on tiny settings (timm's test models,
32 px, fp32, nothing compiled): a check that the script runs, not a measurement, kept out of results/.

Usage::

    python scripts/bench_gpu.py                      # one GPU, sized for 8 minutes: results/gpu.json
    python scripts/bench_gpu.py --batch 128 --gpus-per-node 4 --out /tmp/gpu.json --keep
    python scripts/bench_gpu.py --cpu --out /tmp/gpu_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from gpulib import (
    Runner,
    StepWatch,
    SyncCounter,
    auto_workers,
    environment,
    measure_step,
    peak_memory_gib,
    reset_memory,
    train_step,
)
from loaderlib import backends, generate_images, loader_figures

from heatssl.config import Config, load_config
from heatssl.runs.build import build_backbone
from heatssl.train import pretrain as pretraining
from heatssl.train.pretrain_module import HeatPretrainModule

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"imagenet_resnet50": 2.2, "imagenet_vit_small": 3.0}
"""QB-Heat / full image at 224 px, images/s (the FLOP ratios of docs/benchmarks.md, rounded down)."""
GPU_DEFAULTS = dict(images=4096, files=32768, warmup=5, steps=20, sync_steps=5, budget=400)
GPU_DEFAULTS |= dict(loader_seconds=5.0, e2e_warmup=4, e2e_steps=12, log_every=10, ref_size=224)
CPU_DEFAULTS = dict(images=32, files=32, warmup=1, steps=2, sync_steps=1, budget=300, batch=8)
CPU_DEFAULTS |= dict(loader_seconds=0.2, e2e_warmup=1, e2e_steps=3, log_every=4, ref_size=28)
SECTIONS = ("steps", "loader", "end_to_end")
TINY_CNN = ["model.backbone=test_resnet", "model.output_stride=8"]
TINY_VIT = ["model.backbone=test_vit", "model.kwargs.patch_size=4"]
TINY = ["data.image_size=32", "decoder.width=16", "trainer.precision=32-true"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; unset ones take the GPU or the ``--cpu`` defaults."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="tiny settings on the CPU: a plumbing check")
    p.add_argument("--out", help="JSON path (default results/gpu.json; --cpu: a temporary file)")
    p.add_argument("--work", help="folder for the temporary data and runs (default: system temp)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    p.add_argument("--recipes", nargs="+", default=list(TARGETS))
    p.add_argument("--batch", type=int, help="per-GPU batch (default: the recipe's)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="processes sharing the cores")
    p.add_argument("--images", type=int, help="distinct JPEGs to write")
    p.add_argument("--files", type=int, help="files listed, by hard links (for long epochs)")
    p.add_argument("--warmup", type=int, help="untimed steps first (compile, autotuning)")
    p.add_argument("--steps", type=int, help="timed steps per configuration")
    p.add_argument("--sync-steps", type=int, help="steps counted for syncs, after the timed ones")
    p.add_argument("--loader-seconds", type=float, help="timed seconds per loader measurement")
    p.add_argument("--e2e-warmup", type=int, help="untimed batches of the end-to-end run")
    p.add_argument("--e2e-steps", type=int, help="timed batches of the end-to-end run")
    p.add_argument("--log-every", type=int, help="trainer.log_every_n_steps end to end")
    p.add_argument("--ref-size", type=int, help="the full-image reference size (224)")
    p.add_argument("--skip", nargs="*", choices=SECTIONS, default=[], help="sections to leave out")
    p.add_argument("--budget", type=float, help="seconds after which no configuration starts")
    args = p.parse_args(argv)
    for key, value in (CPU_DEFAULTS if args.cpu else GPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.steps, args.gpus_per_node, args.images) < 1 or args.warmup < 0:
        p.error("--steps, --gpus-per-node and --images must be >= 1, --warmup >= 0")
    if args.e2e_steps < 2:
        p.error("--e2e-steps must be >= 2 (the time from the first step's end to the last's)")
    if args.out is None:
        default = Path(tempfile.gettempdir()) / "heatssl_bench_gpu_cpu.json"
        args.out = str(default if args.cpu else "results/gpu.json")
    if args.cpu and Path(args.out).resolve().is_relative_to((ROOT / "results").resolve()):
        p.error("--cpu gives no measurement: write its JSON outside results/ (--out /tmp/...)")
    return args


def recipe_config(recipe: str, args: argparse.Namespace, root: Path, extra=()) -> Config:
    """The recipe on one device, on the generated images, channels_last (tiny with ``--cpu``)."""
    base = load_config(recipe)
    over = [
        f"run_dir={Path(args.work_dir) / 'runs' / recipe}",
        *("data.name=imagefolder", f"data.root={root}", "data.val_fraction=0"),
        *("trainer.devices=1", "trainer.strategy=auto", "trainer.channels_last=true"),
        *("trainer.compile=false", "trainer.progress_bar=false"),
    ]
    over += [f"data.batch_size={args.batch}"] if args.batch else []
    tiny = [*(TINY_VIT if "vit" in base.model.backbone else TINY_CNN), *TINY]
    over += [*tiny, "trainer.accelerator=cpu"] if args.cpu else ["trainer.accelerator=gpu"]
    return load_config(recipe, [*over, *extra])


def qbheat_figures(cfg: Config, compiled: bool, args: argparse.Namespace, device) -> dict:
    """QB-Heat's step as the LightningModule builds and compiles it."""
    cfg = copy.deepcopy(cfg)
    cfg.trainer.compile = compiled
    module = HeatPretrainModule(cfg).to(device)  # channels_last as the recipe's module
    module.configure_model()
    size, batch = cfg.data.image_size, cfg.data.batch_size
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    step = train_step(module.qbheat, lambda x: module.qbheat(x).loss, images, cfg)
    return measure_step(step, batch, device, args.warmup, args.steps, args.sync_steps)


def full_image_figures(cfg: Config, size: int, args: argparse.Namespace, device) -> dict:
    """The recipe's backbone on the whole image at ``size`` px, loss ``grid.pow(2).mean()``."""
    backbone = build_backbone(cfg.model, size, check_size=False).to(device)
    if cfg.trainer.channels_last:
        backbone.to(memory_format=torch.channels_last)
    batch = cfg.data.batch_size
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    step = train_step(backbone, lambda x: backbone(x).float().pow(2).mean(), images, cfg)
    return measure_step(step, batch, device, args.warmup, args.steps, args.sync_steps)


def bench_steps(recipe: str, cfg: Config, args, run: Runner) -> dict[str, Any]:
    """Section 2: QB-Heat eager and compiled against the full image at 224 px and recipe size."""
    modes, sizes = ("eager", "compiled"), sorted({args.ref_size, cfg.data.image_size})
    configs = {}
    for mode in modes:
        what, compiled = f"{recipe} qbheat_{mode}", mode == "compiled"
        configs[f"qbheat_{mode}"] = (
            {"skipped": "--cpu: compiling would take longer than the whole check"}
            if compiled and args.cpu
            else run(what, qbheat_figures, cfg, compiled, args, run.device)
        )
    for size in sizes:
        what = f"{recipe} full_image_{size}"
        configs[f"full_image_{size}"] = run(what, full_image_figures, cfg, size, args, run.device)
    rate = {k: v.get("images_per_second") for k, v in configs.items()}

    def share(a: str, b: str) -> float | None:
        return rate[a] / rate[b] if rate[a] and rate[b] else None

    ratios = {
        f"vs_full_image_{s}": {m: share(f"qbheat_{m}", f"full_image_{s}") for m in modes}
        for s in sizes
    }
    ratio = ratios[f"vs_full_image_{args.ref_size}"]["eager"]
    target = None if args.cpu else TARGETS.get(recipe)  # tiny CPU models measure nothing
    return {
        "image_size": cfg.data.image_size,
        "batch": cfg.data.batch_size,
        "configs": configs,
        "ratios": ratios,
        "ratio": ratio,
        "ratio_note": f"eager QB-Heat / eager full image at {args.ref_size} px, images/s",
        "target": target,
        "meets_target": None if ratio is None or target is None else ratio >= target,
    }


def bench_loaders(cfgs: dict[str, Config], args, run: Runner) -> dict[str, Any]:
    """Section 3: images/s per backend at one process's share of the cores and at all of them."""
    shares = {"per_process": args.gpus_per_node, "whole_machine": 1}
    done: dict[tuple, dict[str, Any]] = {}  # the same loader settings are measured once
    out: dict[str, Any] = {}
    for recipe, cfg in cfgs.items():
        for backend, reason in backends().items():
            row = out.setdefault(recipe, {})[backend] = {}
            if reason:
                row["skipped"] = reason
                continue
            for share, processes in shares.items():
                key = (backend, cfg.data.image_size, cfg.data.batch_size, auto_workers(processes))
                if key not in done:
                    what = f"loader {recipe} {backend} {share}"
                    figures = (cfg.data, backend, processes, args.loader_seconds, cfg.seed)
                    done[key] = run(what, loader_figures, *figures)
                row[share] = {**done[key], "processes_per_node": processes}
    return out


def end_to_end(recipe: str, backend: str, args, device, root: Path) -> dict[str, Any]:
    """Section 4: a short ``heatssl pretrain`` on the generated images, one process's workers."""
    workers = auto_workers(args.gpus_per_node)
    over = [
        f"run_dir={Path(args.work_dir) / 'runs' / f'{recipe}_{backend}'}",
        *(f"data.backend={backend}", f"data.num_workers={workers}", "trainer.max_epochs=1"),
        f"trainer.limit_train_batches={args.e2e_warmup + args.e2e_steps}",
        f"trainer.log_every_n_steps={args.log_every}",
        *("trainer.checkpoint_every_n_minutes=0", "trainer.keep_checkpoints=0"),
        *("trainer.picture_every_n_epochs=0", f"trainer.compile={str(not args.cpu).lower()}"),
    ]
    cfg = recipe_config(recipe, args, root, over)
    reset_memory(device)
    counter = SyncCounter(device)
    watch = StepWatch(args.e2e_warmup, counter, device)
    try:
        done = pretraining.pretrain(cfg, callbacks=[watch], force=True)
    finally:
        watch.close()
    return {
        "workers": workers,
        "batch": cfg.data.batch_size,
        "image_size": cfg.data.image_size,
        "compiled": cfg.trainer.compile,
        "global_steps": done.global_step,
        **watch.figures(),
        "peak_memory_gib": peak_memory_gib(device),
        "other_warnings": counter.others,
    }


def bench_end_to_end(args: argparse.Namespace, run: Runner, root: Path) -> dict[str, Any]:
    """Section 4 for every recipe and every backend that imports."""
    out: dict[str, Any] = {}
    for recipe in args.recipes:
        for backend, reason in backends().items():
            what = f"end to end {recipe} {backend}"
            out.setdefault(recipe, {})[backend] = (
                {"skipped": reason}
                if reason
                else run(what, end_to_end, recipe, backend, args, run.device, root)
            )
    return out


def _f(value: Any, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def print_summary(report: dict[str, Any]) -> None:
    """The readable side: a table per recipe, then the loaders and end to end."""
    env, data, ref = report["environment"], report.get("data", {}), report["ref_size"]
    print(
        f"\n{env['device']} | torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, "
        f"timm {env['timm']}, lightning {env['lightning']} | {env['cpu_cores']} CPU cores, "
        f"{env['cores_per_process']} per process of {env['gpus_per_node']} "
        f"({env['workers_per_process']} loader workers)"
    )
    if report["mode"] == "cpu":
        print("--cpu: tiny models and images; a check that the script runs, no measurement")
    if data:
        print(
            f"data: {data['images']} JPEGs ({data['files']} files), mean {data['mean_kb']:.0f} kB, "
            f"{data['mean_megapixels']:.3f} MP ({data['seconds']:.0f} s to write)"
        )
    for recipe, s in report.get("steps", {}).items():
        print(f"\n{recipe}: {s['image_size']} px, batch {s['batch']}")
        reads = "syncs" if report["mode"] == "gpu" else "reads"  # CUDA syncs, host reads
        print(
            f"  {'step':<16} {'img/s':>8} {'ms':>7} {'GiB':>6} {reads:>6} {'breaks':>6} recompiles"
        )
        for name, c in s["configs"].items():
            if "images_per_second" not in c:
                print(f"  {name:<16} {str(c.get('error') or c.get('skipped'))[:70]}")
                continue
            syncs = c["cuda_syncs_per_step"] or c["host_reads_per_step"]
            print(
                f"  {name:<16} {c['images_per_second']:8.1f} {c['step_ms_median']:7.1f} "
                f"{_f(c['peak_memory_gib'], '6.1f'):>6} {max(syncs, default=0):6d} "
                f"{c['compile_during_warmup']['graph_breaks']:6d} "
                f"{c['compile_after_warmup']['frames_compiled']:10d}"
            )
        for key, r in s["ratios"].items():
            aim = f" (target >= {s['target']}x)" if s["target"] and key.endswith(f"_{ref}") else ""
            eager, compiled = _f(r["eager"], ".2f"), _f(r["compiled"], ".2f")
            print(f"  QB-Heat / {key[3:]}: eager {eager}x, compiled {compiled}x{aim}")
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[s["meets_target"]]
        print(f"  target, eager against eager at {ref} px: {verdict}")
    print()
    for recipe, row in report.get("loader", {}).items():
        for backend, r in row.items():
            shares = [
                f"{k} {_f(v.get('images_per_second'))} img/s ({v.get('workers')} workers)"
                for k, v in r.items()
                if isinstance(v, dict)
            ]
            print(f"loader alone, {recipe} {backend}: " + (", ".join(shares) or r["skipped"]))
    for recipe, row in report.get("end_to_end", {}).items():
        for backend, e in row.items():
            if "images_per_second" not in e:
                print(f"end to end, {recipe} {backend}: {e.get('skipped') or e.get('error')}")
                continue
            syncs = e["cuda_syncs_per_plain_step"] or e["host_reads_per_plain_step"]
            print(
                f"end to end, {recipe} {backend}: {e['images_per_second']:.0f} img/s with "
                f"{e['workers']} workers, device busy {e['busy_fraction']:.0%}, syncs per step "
                f"between logging steps: max {max(syncs, default=0)}"
            )


def main(argv: list[str] | None = None) -> int:
    """Measure every section, write the JSON, print the summary; 1 if anything failed."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        why = "no GPU here (torch.cuda.is_available() is False)"
        print(f"bench_gpu: {why}; --cpu checks the script on tiny settings.", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu else "cuda")
    if device.type == "cuda":  # as the Trainer sets them for GPU runs
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    run, start = Runner(device, args.budget), time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="heatssl_bench_gpu_", dir=args.work))
    args.work_dir, root = str(work), work / "data"
    cfgs = {r: recipe_config(r, args, root) for r in args.recipes}
    batch = max(c.data.batch_size for c in cfgs.values())
    files = max(args.files, (args.e2e_warmup + args.e2e_steps) * batch)  # end to end: one epoch
    copies = -(-files // args.images)
    report: dict[str, Any] = {
        "mode": "cpu" if args.cpu else "gpu",
        "command": "python scripts/bench_gpu.py " + shlex.join(argv),
        "environment": {},  # after the JPEGs: their writers fork before CUDA starts
        "settings": vars(args),
        "ref_size": args.ref_size,
        "targets": {r: TARGETS.get(r) for r in args.recipes},
        "seconds": {},
    }
    sections: dict[str, Callable[[], dict[str, Any]]] = {
        "steps": lambda: {r: bench_steps(r, cfg, args, run) for r, cfg in cfgs.items()},
        "loader": lambda: bench_loaders(cfgs, args, run),
        "end_to_end": lambda: bench_end_to_end(args, run, root),
    }
    try:
        print(f"writing {args.images} JPEGs x {copies} under {work} ...", flush=True)
        report["data"] = generate_images(root, args.images, not args.cpu, copies=copies)
        report["data"]["note"] = "just written: read from the page cache, not from a disk"
        report["environment"] = environment(args.gpus_per_node, device)
        report["seconds"]["data"] = time.perf_counter() - start
        for name, section in sections.items():
            if name not in args.skip:
                print(f"{name.replace('_', ' ')}:", flush=True)
                began = time.perf_counter()
                report[name] = section()
                report["seconds"][name] = time.perf_counter() - began
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report["seconds"]["total"] = time.perf_counter() - start
    report |= {"errors": run.errors, "skipped_for_time": run.skipped}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print_summary(report)
    took = f"{report['seconds']['total']:.0f} s"
    print(
        f"\nwritten {out} ({took}; {len(run.errors)} failed, {len(run.skipped)} skipped for time)"
    )
    if args.keep:
        print(f"kept the images and runs in {work}")
    return 1 if run.errors else 0


if __name__ == "__main__":
    sys.exit(main())
