"""FLOP budget of one QB-Heat step per shipped recipe, part by part, against a full-image step.

Exact counts from torch's ``FlopCounterMode`` (matrix products, convolutions and attention, forward
and backward; element-wise ops, norms and activations count 0 by its convention), so the figures hold
on any machine, a GPU included. Per recipe, at its own image size, per image:

* the parts of one QB-Heat step: ``encoder`` (the backbone on the kept quarter), ``projection``
  (``heat.dim``'s 1 x 1 projection of the encoder's grid, 0 without it), ``predictor`` (the
  extrapolation of the masked quadrants' features), ``heat_loss`` (the residual on the encoder's
  grid), ``commutator`` (``||AB - BA||^2``: once per step, so divided by the recipe's per-device
  batch), ``decoder`` and ``loss`` (the pixel loss: element-wise, so 0 here); with ``loss.target``
  ``teacher`` or ``both``, ``teacher`` (the EMA teacher's forward on the whole image, no backward),
  ``latent_head`` and ``global_head`` (the MLPs of ``loss.latent_head`` and ``loss.global_weight``,
  0 without them); with ``loss.pair_weight``, ``pair`` (the encoder and projection on a second
  quadrant, forward and backward, and the pair term's MLP). Each part is counted on its own with
  the inputs it gets in the step (requiring grad where the step back-propagates through them), and
  their sum is checked against a count of the whole step;
* ``full_standard``: the same backbone as timm builds it by default (no ``output_stride``
  dilation) on the whole image, forward and backward: what a full-image method pays per image;
* ``full_same``: the whole image through QB-Heat's own encoder construction (dilated where the recipe
  dilates), the baseline ``scripts/bench_speed.py`` times.

Usage::

    python scripts/bench_flops.py                      # every shipped recipe
    python scripts/bench_flops.py --recipes imagenet_resnet50 --override heat.dim=256
    python scripts/bench_flops.py --out results/flops.json

Writes the JSON (``--out``) and prints a markdown table (``--md`` also writes it to a file).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from benchlib import machine
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from heatssl.config import CONFIG_DIR, Config, load_config
from heatssl.model.backbone import Backbone
from heatssl.model.pixels import reconstruction_loss
from heatssl.model.qbheat import QBHeat
from heatssl.model.quadrants import crop_quadrant, quadrant_mask
from heatssl.runs.build import build_qbheat
from heatssl.runs.markdown import markdown_table

PARTS = (
    "encoder",
    "projection",
    "predictor",
    "heat_loss",
    "commutator",
    "decoder",
    "loss",
    "teacher",
    "latent_head",
    "global_head",
    "pair",
)
NO_BACKWARD = {"teacher"}  # the EMA teacher runs without gradient: forward only
BATCH = 2  # images per count (per-image figures divide by it; BatchNorm needs more than one)


def conv_backward_flops(
    grad_out_shape: list[int],
    x_shape: list[int],
    w_shape: list[int],
    _bias: Any,
    _stride: Any,
    _padding: Any,
    _dilation: Any,
    transposed: bool,
    _output_padding: Any,
    _groups: int,
    output_mask: list[bool],
    out_shape: Any = None,
    **kwargs: Any,
) -> int:
    """A convolution's backward: each gradient asked for (input, weight) costs its forward.

    Replaces torch's formula, which counts a grouped convolution's weight gradient as if it had one
    group (64x too much for a depthwise 3x3 on 64 channels: MobileNets' backward came out at 25x
    their forward). Equal to torch's for ungrouped convolutions (tested).
    """
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


FORMULAS = {torch.ops.aten.convolution_backward: conv_backward_flops}


def count(fn: Any) -> int:
    """FLOPs of ``fn()`` (forward, and backward if ``fn`` calls it)."""
    with FlopCounterMode(display=False, custom_mapping=FORMULAS) as counter:
        fn()
    return int(counter.get_total_flops())


def _backward(out: Tensor) -> None:
    out.backward(torch.randn_like(out))


def part_flops(model: QBHeat, images: Tensor, q: Tensor) -> dict[str, dict[str, int]]:
    """Forward and forward+backward FLOPs of each part, for the batch ``images`` (not per image)."""
    backbone, predictor, heat, decoder = (
        model.backbone,
        model.predictor,
        model.heat_loss,
        model.decoder,
    )
    quarter = crop_quadrant(images, q)
    with torch.no_grad():
        block = backbone(quarter, quadrant=q)
        z = model.project(block)
        grid = predictor(z, q, check=False)
        pred = decoder(grid)
    target = model.target(images)
    weight = quadrant_mask(q, *images.shape[-2:]) if model.region == "masked" else None

    def leaf(t: Tensor) -> Tensor:
        return t.detach().clone().requires_grad_(True)

    calls = {
        "encoder": lambda: backbone(quarter, quadrant=q),
        "projection": lambda: model.project(leaf(block)),
        "predictor": lambda: predictor(leaf(z), q, check=False),
        "decoder": lambda: decoder(leaf(grid)),
        "loss": lambda: reconstruction_loss(leaf(pred), target, weight),
    }
    if heat is not None and model.heat_weight > 0:
        calls["heat_loss"] = lambda: heat(leaf(z))
    if model.teacher is not None:
        calls["teacher"] = lambda: model.teacher_grid(images)
        calls["latent_head"] = lambda: model.latent_prediction(leaf(grid))
    if model.global_head is not None:
        calls["global_head"] = lambda: model.global_head(leaf(z).float().mean(dim=(-2, -1)))
    if model.pair_term is not None:  # which second quadrant does not change the count
        q2, term = (q + 1) % 4, model.pair_term
        second = crop_quadrant(images, q2)
        calls["pair"] = lambda: term(leaf(z), model.project(backbone(second, quadrant=q2)))
    if heat is not None and model.commute_weight > 0 and heat.operators.A.requires_grad:
        calls["commutator"] = lambda: heat.operators.commutator(model.commute_probes)
    out: dict[str, dict[str, int]] = {}
    for name in PARTS:
        call = calls.get(name)
        if call is None:
            out[name] = {"forward": 0, "forward_backward": 0}
            continue
        forward = count(call)
        both = forward if name in NO_BACKWARD else count(lambda call=call: _backward(call()))
        out[name] = {"forward": forward, "forward_backward": both}
    return out


def full_image_flops(backbone: Backbone, images: Tensor) -> dict[str, int]:
    """Forward and forward+backward FLOPs of ``backbone`` on the whole images."""
    return {
        "forward": count(lambda: backbone(images)),
        "forward_backward": count(lambda: _backward(backbone(images))),
    }


def budget(name: str, cfg: Config) -> dict[str, Any]:
    """Per-image FLOPs of one QB-Heat step of ``cfg`` and of the full-image baselines."""
    torch.manual_seed(0)
    size = cfg.data.image_size
    model = build_qbheat(cfg).train()
    images = torch.randn(BATCH, 3, size, size)
    q = torch.arange(BATCH) % 4
    parts = part_flops(model, images, q)
    per_step = {"commutator"}  # once per step, whatever the batch
    per_image = {
        part: {
            k: v / (cfg.data.batch_size if part in per_step else BATCH) for k, v in flops.items()
        }
        for part, flops in parts.items()
    }
    whole = {
        "forward": count(lambda: model(images, q)),
        "forward_backward": count(lambda: model(images, q).loss.backward()),
    }
    summed = {k: sum(p[k] for p in parts.values()) for k in ("forward", "forward_backward")}
    kwargs = dict(cfg.model.kwargs)
    standard = Backbone(cfg.model.backbone, image_size=size, check_size=False, **kwargs).train()
    full_standard = {k: v / BATCH for k, v in full_image_flops(standard, images).items()}
    full_same = {k: v / BATCH for k, v in full_image_flops(model.backbone, images).items()}
    total = {k: sum(p[k] for p in per_image.values()) for k in ("forward", "forward_backward")}
    return {
        "recipe": name,
        "backbone": cfg.model.backbone,
        "image_size": size,
        "output_stride": cfg.model.output_stride,
        "kwargs": dict(cfg.model.kwargs),
        "block_grid": list(model.backbone(images[:1, :, : size // 2, : size // 2]).shape[-2:]),
        "per_device_batch": cfg.data.batch_size,
        "parts": per_image,
        "qbheat": total,
        "full_standard": full_standard,
        "full_same": full_same,
        "ratio_standard": {k: total[k] / full_standard[k] for k in total},
        "ratio_same": {k: total[k] / full_same[k] for k in total},
        # the parts, counted one by one, add up to the whole step counted at once
        "check_sum_equals_step": {k: summed[k] == whole[k] for k in summed},
    }


HEADERS = {"heat_loss": "heat loss", "latent_head": "latent head", "global_head": "global head"}
HEADERS["pair"] = "second quadrant"


def label(r: dict[str, Any]) -> str:
    """A row's recipe as the docs name it: the name, and the backbone and stride when not a GPU
    recipe's (those are named for theirs)."""
    if r["recipe"].startswith("imagenet_"):
        return f"`{r['recipe']}`"
    stride = f", `output_stride: {r['output_stride']}`" if r["output_stride"] else ""
    patch = r.get("kwargs", {}).get("patch_size")
    return f"`{r['recipe']}` ({r['backbone']}{f', patch {patch}' if patch else ''}{stride})"


def table(rows: list[dict[str, Any]]) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """The docs' columns and rows (strings as printed): GFLOP per image, forward and backward, by
    part (the parts no row has are left out), the step, the full-image step, their ratio (bold for
    the GPU recipes)."""
    parts = [p for p in PARTS if any(r["parts"][p]["forward"] for r in rows)]
    keys = ["recipe", "size", "block_grid", *parts, "qbheat_step", "full_image_step", "ratio"]
    names = {"block_grid": "block grid", "qbheat_step": "QB-Heat step"}
    names |= {"full_image_step": "full-image step", **HEADERS}
    columns = [{"key": k, "header": names.get(k, k)} for k in keys]
    out = []
    for r in rows:
        row: dict[str, Any] = {
            "recipe": label(r),
            "size": str(r["image_size"]),
            "block_grid": "x".join(map(str, r["block_grid"])),
            **{
                p: f"{r['parts'][p]['forward_backward'] / 1e9:.3f}"
                if r["parts"][p]["forward"]
                else "-"
                for p in parts
            },
            "qbheat_step": f"{r['qbheat']['forward_backward'] / 1e9:.2f}",
            "full_image_step": f"{r['full_standard']['forward_backward'] / 1e9:.2f}",
            "ratio": f"{r['ratio_standard']['forward_backward']:.2f}x",
        }
        if r["recipe"].startswith("imagenet_"):
            row["bold"] = ["ratio"]
        out.append(row)
    return columns, out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    recipes = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--recipes",
        nargs="+",
        default=recipes,
        choices=recipes,
        help="shipped recipes, each at its own image size (default: all)",
    )
    p.add_argument(
        "--override", action="append", default=[], help="key=value for every recipe (repeatable)"
    )
    p.add_argument("--out", default="results/flops.json")
    p.add_argument("--md", default=None, help="also write the markdown table here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for name in args.recipes:
        cfg = load_config(name, args.override)
        rows.append(budget(name, cfg))
        r = rows[-1]
        print(
            f"{name}: QB-Heat {r['qbheat']['forward_backward'] / 1e9:.3f} GFLOP/img fwd+bwd, "
            f"{r['ratio_standard']['forward_backward']:.2f}x the standard full-image step",
            file=sys.stderr,
        )
    columns, shown = table(rows)
    text = markdown_table(
        [c["header"] for c in columns], [[r[c["key"]] for c in columns] for r in shown]
    )
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    provenance = {
        "command": "python " + shlex.join(["scripts/bench_flops.py", *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "heatssl_commit": f"{commit.strip()} (with the working tree's changes, if any)",
        "machine": machine(),
        "overrides": args.override,
        "batch": BATCH,
        "units": "GFLOP per image, forward and backward; ratio = QB-Heat step / full-image step",
    }
    report = {"provenance": provenance, "columns": columns, "rows": shown, "raw": rows}
    out.write_text(json.dumps(report, indent=2) + "\n")
    if args.md:
        Path(args.md).write_text(text + "\n")
    print(f"written {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
