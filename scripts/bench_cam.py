"""Heat-map faithfulness (deletion metric) and speed on Imagenette val images.

Needs a pretrained checkpoint and its linear probe head, e.g. from ``scripts/bench_probe.py`` (the
defaults point there) and the workspace's ``../shared/data/imagenette-128`` (the checkpoint's config
names the data). Deletion metric: for each image, pixels are removed (set to the dataset mean) from the
most salient down, in ``--steps`` equal steps, and the probability of the explained class is tracked;
the score is the area under that curve (lower is better: a faithful map finds the evidence first).
``cam`` and ``gradcam`` are compared with two controls: a random map and a centred Gaussian blob.
It also times every method (seconds per image on this CPU).

Usage::

    python scripts/bench_cam.py --num 200 --out results/cam.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from benchlib import machine

from heatssl.explain.cam import METHODS, ProbedBackbone, heatmaps
from heatssl.explain.inputs import dataset_images
from heatssl.runs.head_files import load_linear_head
from heatssl.runs.sources import backbone_from_checkpoint, checkpoint_config

RUN = "bench_results/runs/default"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=f"{RUN}/checkpoints/last.ckpt")
    p.add_argument("--head", default=f"{RUN}/probe/linear_head.safetensors")
    p.add_argument("--num", type=int, default=200, help="val images for the deletion metric")
    p.add_argument("--steps", type=int, default=16, help="deletion steps")
    p.add_argument("--timing-images", type=int, default=16, help="images timed per method")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/cam.json")
    return p.parse_args(argv)


def control_maps(kind: str, n: int, h: int, w: int, gen: torch.Generator) -> np.ndarray:
    """``random`` (uniform noise) or ``blob`` (centred Gaussian, sigma a quarter of the side)."""
    if kind == "random":
        return torch.rand(n, h, w, generator=gen).numpy()
    ys = torch.arange(h).float().view(-1, 1) - (h - 1) / 2
    xs = torch.arange(w).float().view(1, -1) - (w - 1) / 2
    blob = torch.exp(-(ys**2 / (2 * (h / 4) ** 2) + xs**2 / (2 * (w / 4) ** 2)))
    return blob.expand(n, h, w).numpy().copy()


@torch.no_grad()
def deletion_auc(
    model: ProbedBackbone, images: torch.Tensor, maps: np.ndarray, targets: torch.Tensor, steps: int
) -> np.ndarray:
    """Per-image area under the target-probability curve as the most salient pixels are removed."""
    n, _, h, w = images.shape
    order = torch.from_numpy(maps.reshape(n, -1)).argsort(dim=1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(h * w).expand(n, -1))
    rank = rank.view(n, 1, h, w)
    probs = []
    for s in range(steps + 1):
        keep = (rank >= round(s * h * w / steps)).float()  # 0 on the removed (most salient) pixels
        p = model(images * keep).softmax(dim=1)
        probs.append(p[torch.arange(n), targets])
    curve = torch.stack(probs, dim=1)  # (n, steps + 1)
    return torch.trapezoid(curve, dx=1.0 / steps, dim=1).numpy()


def main(argv: list[str] | None = None) -> int:
    """Run the deletion metric and the timing; print and save JSON."""
    args = parse_args(argv)
    cfg = checkpoint_config(args.checkpoint)
    backbone = backbone_from_checkpoint(args.checkpoint).eval()
    head, _ = load_linear_head(args.head)
    loaded, _, _ = dataset_images(cfg, "val", args.num)
    model = ProbedBackbone(backbone, head).eval()
    gen = torch.Generator().manual_seed(args.seed)
    n, _, h, w = loaded.inputs.shape
    scores: dict[str, list[float]] = {k: [] for k in ("cam", "gradcam", "random", "blob")}
    for start in range(0, n, args.batch):
        x = loaded.inputs[start : start + args.batch]
        with torch.no_grad():
            targets = model(x).argmax(dim=1)
        maps = {m: heatmaps(backbone, head, x, m).maps for m in ("cam", "gradcam")}
        maps["random"] = control_maps("random", len(x), h, w, gen)
        maps["blob"] = control_maps("blob", len(x), h, w, gen)
        for kind, m in maps.items():
            scores[kind] += deletion_auc(model, x, m, targets, args.steps).tolist()
        print(
            f"{start + len(x)}/{n} images: "
            + ", ".join(f"{k} {np.mean(v):.4f}" for k, v in scores.items())
        )
    timing: dict[str, float] = {}
    x = loaded.inputs[: args.timing_images]
    for method in METHODS:
        heatmaps(backbone, head, x[:2], method)  # warm-up
        t0 = time.perf_counter()
        heatmaps(backbone, head, x, method)
        timing[method] = (time.perf_counter() - t0) / len(x)
    auc = {k: float(np.mean(v)) for k, v in scores.items()}
    report: dict[str, Any] = {
        "checkpoint": args.checkpoint,
        "head": args.head,
        "images": n,
        "image_size": cfg.data.image_size,
        "steps": args.steps,
        "deletion_auc_mean": auc,
        "deletion_auc_sem": {k: float(np.std(v) / np.sqrt(len(v))) for k, v in scores.items()},
        "beats_controls": {m: auc[m] < min(auc["random"], auc["blob"]) for m in ("cam", "gradcam")},
        "seconds_per_image": timing,
        "machine": machine(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(
        json.dumps(
            {k: report[k] for k in ("deletion_auc_mean", "beats_controls", "seconds_per_image")},
            indent=2,
        )
    )
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
