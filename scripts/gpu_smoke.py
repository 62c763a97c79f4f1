"""The first GPU run of heatssl, as one command: pretrain, probe and heat maps of the GPU recipes.

For each recipe (default: ``imagenet_resnet50`` and ``imagenet_vit_small``), on one device: a few
hundred pretraining steps with the recipe's own model and loss, bf16, channels_last and
``torch.compile`` (the launch scripts' GPU settings), on an ImageFolder (default: the Imagenette
subset at 224 px) or on synthetic images; then the linear and kNN probes of the checkpoint and CAM /
Grad-CAM heat maps from its linear head. It prints and saves images/s of the steps after warm-up
and the peak GPU memory, and exits non-zero if any stage of any recipe fails.

``--device cpu`` runs the same chain with tiny settings and no compile: a check of the plumbing on
a machine without a GPU (the test suite runs it), not a measurement.

Usage::

    python scripts/gpu_smoke.py                                   # on a GPU machine
    python scripts/gpu_smoke.py --data synthetic --steps 200      # without the Imagenette copy
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import lightning as L
import torch
from benchlib import machine

from heatssl.config import Config, load_config
from heatssl.explain import maps as explaining
from heatssl.probing import probe as probing
from heatssl.train import pretrain as pretraining


class StepTimer(L.Callback):
    """Images per second of the training steps after ``warmup`` steps (compile, autotuning)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.images, self.start, self.end = warmup, 0, None, None
        self.seen = 0  # batches across epochs

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.seen == self.warmup:
            self._sync()
            self.start = time.perf_counter()
        if self.seen >= self.warmup:
            self.images += batch[0].shape[0]
        self.seen += 1

    def on_train_end(self, trainer, pl_module) -> None:
        self._sync()
        self.end = time.perf_counter()

    def images_per_second(self) -> float | None:
        if self.start is None or self.end is None or self.end <= self.start:
            return None
        return self.images / (self.end - self.start)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipes", nargs="+", default=["imagenet_resnet50", "imagenet_vit_small"])
    p.add_argument(
        "--data", default="../shared/data/imagenette-224", help="ImageFolder or 'synthetic'"
    )
    p.add_argument("--steps", type=int, default=300, help="pretraining steps per recipe")
    p.add_argument("--warmup", type=int, default=30, help="steps left out of images/s")
    p.add_argument("--batch", type=int, default=128, help="per-device batch")
    p.add_argument("--workers", default="auto", help="loader workers (dali: threads) or auto")
    p.add_argument(
        "--backend",
        choices=["pil", "torchvision", "dali"],
        default="pil",
        help="torchvision, dali: decode JPEGs on the GPU",
    )
    p.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    p.add_argument("--runs", default="bench_results/runs_gpu_smoke")
    p.add_argument("--out", default="results/gpu_smoke.json")
    args = p.parse_args(argv)
    if args.steps <= args.warmup or args.warmup < 0:
        p.error("--steps must be larger than --warmup (>= 0)")
    if args.backend != "pil" and args.data == "synthetic":
        p.error(f"--backend {args.backend} decodes image files: give --data an ImageFolder")
    return args


def recipe_config(args: argparse.Namespace, recipe: str) -> Config:
    """The recipe on one device with the GPU launch settings (tiny and plain with --device cpu)."""
    gpu = args.device == "gpu"
    base = load_config(recipe)
    if args.data == "synthetic":
        images = max(args.batch * (args.steps + 2), 250)
        data = ["data.name=synthetic", f"data.synthetic_size={images}"]
        train_images = int(images * (1 - base.data.val_fraction))
    else:
        data = ["data.name=imagefolder", f"data.root={args.data}"]
        train_images = sum(1 for p in (Path(args.data) / "train").rglob("*") if p.is_file())
    per_epoch = max(1, train_images // args.batch)
    epochs = -(-args.steps // per_epoch)  # as many epochs as --steps needs
    overrides = [
        f"run_dir={Path(args.runs) / recipe}",
        *data,
        f"data.batch_size={args.batch}",
        f"data.num_workers={args.workers}",
        f"data.backend={args.backend}",
        f"trainer.accelerator={args.device}",
        "trainer.devices=1",
        "trainer.strategy=auto",
        f"trainer.precision={'bf16-mixed' if gpu else '32-true'}",
        f"trainer.channels_last={str(gpu).lower()}",
        f"trainer.compile={str(gpu).lower()}",
        f"trainer.max_epochs={epochs}",
        f"trainer.limit_train_batches={min(args.steps, per_epoch)}",
        f"trainer.log_every_n_steps={min(50, args.steps)}",
        "trainer.checkpoint_every_n_minutes=0",
        "trainer.progress_bar=false",
        "probe.kinds=[linear, knn]",
        "probe.epochs=20",
    ]
    if not gpu:  # the smallest size the recipe's backbone splits: a plumbing check
        overrides += ["data.image_size=64", "decoder.width=32", "decoder.depth=1"]
        if "vit" not in base.model.backbone:
            overrides.append("model.output_stride=16")
    return load_config(recipe, overrides)


def smoke(args: argparse.Namespace, recipe: str) -> dict[str, Any]:
    """Pretrain, probe and draw heat maps for one recipe; figures, or the stage that failed."""
    result: dict[str, Any] = {"recipe": recipe, "ok": False}
    stage = "config"
    try:
        cfg = recipe_config(args, recipe)
        result["image_size"], result["batch"] = cfg.data.image_size, cfg.data.batch_size
        stage = "pretrain"
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        timer = StepTimer(args.warmup)
        done = pretraining.pretrain(cfg, callbacks=[timer])
        result["steps"] = done.global_step
        result["images_per_second"] = timer.images_per_second()
        result["pretrain_seconds"] = done.seconds
        if torch.cuda.is_available():
            result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        stage = "probe"
        probed = probing.probe(str(done.last_checkpoint), cfg)
        result["probes"] = {k: v["top1"] for k, v in probed.metrics["probes"].items()}
        stage = "heatmaps"
        maps = explaining.run_heatmaps(
            str(done.last_checkpoint),
            probed.out_dir / "linear_head.safetensors",
            cfg,
            Path(cfg.run_dir) / "heatmaps",
            ["cam", "gradcam"],
            num=8,
        )
        result["heatmap_sheets"] = {k: str(v) for k, v in maps.sheets.items()}
        result["ok"] = True
    except Exception as err:
        result["failed_stage"] = stage
        result["error"] = f"{type(err).__name__}: {err}"
        result["traceback"] = traceback.format_exc()[-4000:]
    return result


def main(argv: list[str] | None = None) -> int:
    """Run every recipe, print a line each, write the JSON; exit 1 if any failed."""
    args = parse_args(argv)
    if args.device == "gpu" and not torch.cuda.is_available():
        print(
            "gpu_smoke: no GPU here (torch.cuda.is_available() is False); --device cpu checks the"
            " chain on the CPU instead.",
            file=sys.stderr,
        )
        return 2
    results = [smoke(args, recipe) for recipe in args.recipes]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"machine": machine(), "args": vars(args), "results": results}, indent=2)
    )
    for r in results:
        if r["ok"]:
            ips = r["images_per_second"]
            mem = r.get("peak_gpu_memory_gib")
            print(
                f"{r['recipe']}: ok, {r['steps']} steps, "
                f"{f'{ips:.0f} images/s' if ips else 'images/s n/a'}"
                f"{f', peak GPU memory {mem:.1f} GiB' if mem is not None else ''}, probes {r['probes']}"
            )
        else:
            print(f"{r['recipe']}: FAILED in {r['failed_stage']}: {r['error']}", file=sys.stderr)
    print(f"written {out}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
