"""The fine-tuning recipes: one table per backbone family, the rule that picks the family, the batch
each recipe was tuned at and the learning-rate ceiling that follows from it.

ViT: MAE's fine-tuning recipe (ViT-B's layer decay 0.65 raised to 0.75 for the shallower ViT-S /
ViT-T, as DeiT-style small-model recipes do). CNN: a ResNet-strikes-back A3-like recipe with AdamW
and a gentle layer decay over the stages. Both were set for an effective batch of
:data:`RECIPE_BATCH` (MAE fine-tunes at 1024); the lr scales with the batch (``base_lr x batch /
256``), and far above the recipe's batch that rule gives rates the recipe was never tried at: a run
above :func:`lr_ceiling` is warned about at its start.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from heatssl.config import FinetuneConfig
from heatssl.errors import HeatSSLWarning
from heatssl.model.backbone import Backbone
from heatssl.model.optim import scaled_lr

FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "vit": {
        "epochs": 100,
        "base_lr": 5e-4,
        "weight_decay": 0.05,
        "layer_decay": 0.75,
        "drop_path": 0.1,
        "warmup_epochs": 5.0,
        "smoothing": 0.1,
        "mixup": 0.8,
        "cutmix": 1.0,
        "auto_augment": "rand-m9-mstd0.5-inc1",
        "re_prob": 0.25,
    },
    "cnn": {
        "epochs": 100,
        "base_lr": 1e-3,
        "weight_decay": 0.05,
        "layer_decay": 0.8,
        "drop_path": 0.05,
        "warmup_epochs": 5.0,
        "smoothing": 0.1,
        "mixup": 0.1,
        "cutmix": 1.0,
        "auto_augment": "rand-m6-mstd0.5-inc1",
        "re_prob": 0.0,
    },
}
"""Every ``finetune.*`` value a family's recipe sets (a key set in the config overrides it)."""

RECIPE_BATCH = 1024
"""The effective batch both recipes were set for (MAE's fine-tuning batch)."""


def family(backbone: Backbone) -> str:
    """``vit`` for transformer backbones (timm models with ``blocks`` of attention), else ``cnn``."""
    blocks = getattr(backbone.model, "blocks", None)
    if blocks is not None and any(hasattr(b, "attn") for b in blocks):
        return "vit"
    return "cnn"


def resolve(finetune: FinetuneConfig, backbone: Backbone) -> FinetuneConfig:
    """``finetune`` with its family chosen (``recipe: auto`` -> :func:`family`) and every ``null``
    replaced by that family's default."""
    name = family(backbone) if finetune.recipe == "auto" else finetune.recipe
    defaults = FAMILY_DEFAULTS[name]
    values = {k: v if (v := getattr(finetune, k)) is not None else defaults[k] for k in defaults}
    return dataclasses.replace(finetune, recipe=name, **values)


def lr_ceiling(name: str) -> float:
    """The highest lr family ``name``'s recipe was set for: its base_lr at :data:`RECIPE_BATCH`."""
    return scaled_lr(FAMILY_DEFAULTS[name]["base_lr"], RECIPE_BATCH)


def check_scale(recipe: FinetuneConfig, batch: int) -> float:
    """The lr of ``recipe`` at effective ``batch``; a :class:`HeatSSLWarning` when it is above the
    family's :func:`lr_ceiling`, naming the base_lr that would stay at the ceiling."""
    lr = scaled_lr(recipe.base_lr, batch)
    ceiling = lr_ceiling(recipe.recipe)
    if lr > ceiling * (1 + 1e-9):
        warnings.warn(
            f"fine-tuning lr {lr:.3g} (finetune.base_lr {recipe.base_lr:g} x effective batch "
            f"{batch} / 256) is above {ceiling:.3g}, the highest the {recipe.recipe} recipe was "
            f"set for (its base_lr at batch {RECIPE_BATCH}); such rates often diverge. Set "
            f"finetune.base_lr={ceiling * 256 / batch:.3g} to stay at {ceiling:.3g}, or fine-tune "
            f"with a smaller effective batch.",
            HeatSSLWarning,
            stacklevel=2,
        )
    return lr
