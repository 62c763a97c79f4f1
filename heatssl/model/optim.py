"""Optimisation rules shared by pretraining, the probes and the benchmark scripts (pure torch + timm).

- :func:`weight_decay_groups`: AdamW parameter groups by timm's rule (no decay on biases, norms and
  the names a module's ``no_weight_decay()`` lists, such as the heat operators A and B).
- :func:`scaled_lr`: MAE's linear scaling rule, ``base_lr x batch / 256``.
- :func:`warmup_cosine`: linear warm-up, then cosine decay, as an lr multiplier per step;
  :func:`epoch_warmup_cosine` the same for a run counted in epochs (a ``LambdaLR`` lambda).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from timm.optim import param_groups_weight_decay
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine down to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def epoch_warmup_cosine(
    total_steps: int, epochs: int, warmup_epochs: float, min_ratio: float = 0.0
) -> Callable[[int], float]:
    """:func:`warmup_cosine` per optimiser step of a run of ``total_steps`` steps over ``epochs``
    epochs, warming up for ``warmup_epochs`` of them (the lambda of a step-wise ``LambdaLR``)."""
    total = max(1, total_steps)
    warmup = int(warmup_epochs * max(1, total // max(1, epochs)))

    def factor(step: int) -> float:
        return warmup_cosine(step, warmup, total, min_ratio)

    return factor


def clock_warmup_cosine(
    elapsed: Callable[[], float], budget_s: float, warmup: float = 0.1, min_ratio: float = 0.0
) -> Callable[[int], float]:
    """:func:`warmup_cosine` over a time budget instead of a step count: the factor follows
    ``elapsed()`` seconds out of ``budget_s`` (warm-up over the first ``warmup`` of it), so a run cut
    by ``trainer.max_time`` ends its cosine with the budget whatever its step speed. The step
    argument of the returned lambda is ignored; the clock decides."""
    if budget_s <= 0:
        raise ValueError(f"budget_s={budget_s!r}: a time budget must be positive seconds")
    resolution = 10_000

    def factor(_step: int) -> float:
        done = min(1.0, max(0.0, elapsed() / budget_s))
        return warmup_cosine(
            int(done * resolution), int(warmup * resolution), resolution, min_ratio
        )

    return factor


def step_schedule(optimizer: Optimizer, factor: Callable[[int], float]) -> dict[str, Any]:
    """``optimizer`` with a ``LambdaLR`` of ``factor`` stepped every optimiser step, in the form
    Lightning's ``configure_optimizers`` returns."""
    scheduler = LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """MAE's linear scaling rule: ``base_lr x batch / 256``."""
    return base_lr * batch_size / 256


def can_fuse(params: Any, precision: str) -> bool:
    """Fused AdamW (one kernel for all tensors, no per-tensor step counter read on the host) where
    every parameter allows it.

    Not with float16 mixed precision: its gradient scaler unscales inside a fused step, so
    gradients cannot be clipped before it.
    """
    if str(precision).startswith("16"):
        return False
    return all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)


def weight_decay_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups of ``module``'s trainable parameters: decayed weights, then the rest.

    timm's ``param_groups_weight_decay`` decides (1-D tensors, biases and the names
    ``module.no_weight_decay()`` returns get none); the decayed group comes first and both groups
    are always there, so an optimiser's state keeps one layout whatever the weights.
    """
    skip = module.no_weight_decay() if hasattr(module, "no_weight_decay") else ()
    groups = param_groups_weight_decay(module, 1.0, no_weight_decay_list=tuple(skip))
    by_decay = {g["weight_decay"] > 0: g["params"] for g in groups}
    return [
        {"params": by_decay.get(True, []), "weight_decay": weight_decay},
        {"params": by_decay.get(False, []), "weight_decay": 0.0},
    ]
