"""Shared by the speed benchmarks: one training step as a callable, and step times summarised.

The steps are what pretraining does (forward, backward, AdamW with the project's betas and weight
decay, fused as :mod:`heatssl.train.pretrain_module` builds it unless asked otherwise), without
Lightning around them, so a step's own cost is timed.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
from torch import Tensor, nn

from heatssl.model.backbone import Backbone
from heatssl.model.qbheat import QBHeat


def make_optimizer(module: nn.Module, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (betas and weight decay as the project's defaults).

    ``fused=True`` is what :mod:`heatssl.train.pretrain_module` builds (``--unfused-adamw``: torch's default).
    """
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True if fused else None
    )


def qbheat_step_fn(model: QBHeat, images: Tensor, fused: bool) -> Callable[[], float]:
    """One QB-Heat training step: forward, backward, AdamW step, zero_grad; returns the loss."""
    optimizer = make_optimizer(model, fused)

    def step() -> float:
        out = model(images)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    return step


def full_image_step_fn(backbone: Backbone, images: Tensor, fused: bool) -> Callable[[], float]:
    """One full-image step: backbone forward to the grid, trivial loss, backward, AdamW step."""
    optimizer = make_optimizer(backbone, fused)

    def step() -> float:
        grid = backbone(images)
        loss = grid.float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def count_params(module: nn.Module) -> int:
    """Trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def summarize(times: list[float], batch: int) -> dict[str, float]:
    """Median / mean step time and the img/s they give."""
    median, mean = statistics.median(times), statistics.fmean(times)
    return {
        "steps": len(times),
        "median_s": median,
        "mean_s": mean,
        "stdev_s": statistics.stdev(times) if len(times) > 1 else 0.0,
        "min_s": min(times),
        "max_s": max(times),
        "img_per_s_median": batch / median,
        "img_per_s_mean": batch / mean,
    }
