"""The sections of a run config on how a run trains and is evaluated: trainer, probe, fine-tuning.

Each dataclass is one YAML section and checks its own values, with the rules of
:mod:`heatssl.config_sections`; :mod:`heatssl.config` assembles them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

from heatssl.config_sections import check_stride, must, not_negative, positive

PRECISIONS = (
    *("32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16", "16-true", "bf16-true"),
    *("64-true", "64", "transformer-engine", "transformer-engine-float16"),
)
"""Lightning's precision settings."""


def _check_devices(devices: int | str) -> None:
    """``auto``, ``-1`` (all), a positive count, or Lightning's list of device ids (``"0,1"``)."""
    text = str(devices).strip()
    ok = (
        devices == "auto"
        or (isinstance(devices, int) and (devices == -1 or devices > 0))
        or (isinstance(devices, str) and re.fullmatch(r"(-1|[1-9]\d*|\d+(,\s*\d+)*,?)", text))
    )
    must(
        bool(ok),
        "trainer.devices",
        devices,
        "auto, -1 (every device), a positive count, or device ids such as '0,1'",
    )


@dataclass
class TrainerConfig:
    """Lightning Trainer settings and run-folder behaviour."""

    max_epochs: int = 10
    # a time budget instead of epochs: minutes (15) or "HH:MM:SS"; the lr schedule follows the clock
    max_time: float | str | None = None
    accelerator: str = "auto"
    devices: int | str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    accumulate_grad_batches: int = 1
    sync_batchnorm: bool = False  # BatchNorm statistics over all devices (DDP)
    channels_last: bool = False  # NHWC memory layout: faster convolutions on GPU tensor cores
    compile: bool = False  # torch.compile the backbone and the decoder (not the LightningModule)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    gradient_clip_val: float | None = 1.0
    limit_train_batches: int | float = 1.0  # an int: batches per epoch; a float in (0, 1]: a share
    log_every_n_steps: int = 10
    picture_every_n_epochs: int = 1
    checkpoint_every_n_epochs: int = 1
    keep_checkpoints: int = 2  # epoch checkpoints kept besides last.ckpt (the newest); -1: all
    checkpoint_every_n_steps: int = 0  # also refresh last.ckpt every N steps, mid-epoch (0: off)
    checkpoint_every_n_minutes: float = 30.0  # and every N minutes of training (0: off)
    progress_bar: bool = True
    logger: Literal["csv", "tensorboard", "wandb", "none"] = "csv"
    wandb_project: str | None = None  # trainer.logger=wandb: null -> $WANDB_PROJECT, else heatssl

    def max_time_seconds(self) -> float | None:
        """``max_time`` in seconds (``None``: no budget); minutes or ``[DD:]HH:MM:SS``."""
        value = self.max_time
        if value is None:
            return None
        seconds: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value) * 60
        elif isinstance(value, str):
            parts = value.strip().split(":")
            try:
                numbers = [float(x) for x in parts]
            except ValueError:
                numbers = []
            if len(parts) == 1 and numbers:
                seconds = numbers[0] * 60
            elif len(parts) in (3, 4) and numbers:
                scales = [86400, 3600, 60, 1][-len(parts) :]
                seconds = sum(n * k for n, k in zip(numbers, scales, strict=True))
        must(
            seconds is not None and 0 < seconds < float("inf"),
            "trainer.max_time",
            value,
            "minutes (e.g. 15) or a time 'HH:MM:SS' / 'DD:HH:MM:SS' (e.g. '00:15:00'), above 0 "
            "and finite",
        )
        return seconds

    def validate(self) -> None:
        """Counts are positive; the mid-epoch checkpoint triggers are >= 0 (0 turns one off)."""
        positive("trainer", self, "max_epochs", "num_nodes", "accumulate_grad_batches")
        not_negative("trainer", self, "checkpoint_every_n_steps", "checkpoint_every_n_minutes")
        must(
            math.isfinite(self.checkpoint_every_n_minutes),
            "trainer.checkpoint_every_n_minutes",
            self.checkpoint_every_n_minutes,
            "a finite number of minutes (0: off)",
        )
        limit = self.limit_train_batches
        must(
            limit >= 1 if isinstance(limit, int) else 0.0 < limit <= 1.0,
            "trainer.limit_train_batches",
            limit,
            "a whole number of batches >= 1, or a share of the epoch in (0, 1]",
        )
        must(
            self.precision in PRECISIONS,
            "trainer.precision",
            self.precision,
            f"one of {', '.join(PRECISIONS)}",
        )
        _check_devices(self.devices)
        self.max_time_seconds()  # a budget that cannot be read stops here
        must(
            self.keep_checkpoints >= -1,
            "trainer.keep_checkpoints",
            self.keep_checkpoints,
            ">= 0 (how many epoch checkpoints to keep besides last.ckpt) or -1 (all)",
        )
        if self.wandb_project is not None:  # W&B refuses these characters in project names
            must(
                bool(self.wandb_project.strip()) and not set("/\\#?%:") & set(self.wandb_project),
                "trainer.wandb_project",
                self.wandb_project,
                "a W&B project name (not empty, none of / \\ # ? % :) or null",
            )


@dataclass
class ProbeConfig:
    """Frozen-backbone evaluation (docs/method.md): which probes and how they train."""

    kinds: list[Literal["linear", "tran1", "knn"]] = field(
        default_factory=lambda: ["linear", "tran1", "knn"]
    )
    out_dir: str | None = None  # default: <run_dir>/probe
    epochs: int = 100  # linear probe
    batch_size: int = 256
    optimizer: Literal["sgd", "lars"] = "sgd"
    base_lr: float = 0.1  # lr = base_lr x batch / 256 (MAE's rule)
    weight_decay: float = 0.0
    warmup_epochs: int = 5
    tran1_epochs: int = 30
    tran1_base_lr: float = 5e-4  # AdamW
    tran1_heads: int = 0  # 0: d / 64 (at least 1)
    tran1_max_images: int | None = None  # train tran-1 on a seeded subset of this size (null: all)
    # where tran-1's grids are written during the run: null = the probe folder, tmp = the system's
    # temporary folder ($TMPDIR: node-local scratch on clusters), or a folder
    grid_dir: str | None = None
    output_stride: int | None = None  # re-dilate the frozen CNN for evaluation (null: its own)
    knn_k: int = 20
    knn_temperature: float = 0.07
    online: bool = False  # online linear probe on the kept-quarter features during pretraining
    embedding: bool = True  # write embedding.png: t-SNE map of the pooled val features by class
    embedding_max_points: int = 2000  # class-balanced subsample drawn in it (t-SNE's cost)

    def validate(self) -> None:
        """Epochs, batch, k and rates positive; the stride one timm takes."""
        positive(
            "probe",
            self,
            "epochs",
            "batch_size",
            "tran1_epochs",
            "knn_k",
            "base_lr",
            "tran1_base_lr",
            "knn_temperature",
            "embedding_max_points",
        )
        not_negative("probe", self, "weight_decay", "warmup_epochs", "tran1_heads")
        if self.tran1_max_images is not None:
            must(
                self.tran1_max_images > 0,
                "probe.tran1_max_images",
                self.tran1_max_images,
                "positive or null",
            )
        check_stride("probe.output_stride", self.output_stride)


@dataclass
class FinetuneConfig:
    """Full fine-tuning (``heatssl finetune``): every ``null`` takes its family's default.

    The family (``recipe: auto``) is ``vit`` for transformers (a timm model with ``blocks``), else
    ``cnn``; :mod:`heatssl.finetuning.recipe` holds both recipes. The resolved values are written
    into the fine-tuning folder's ``config.yaml``.
    """

    recipe: Literal["auto", "cnn", "vit"] = "auto"
    epochs: int | None = None
    base_lr: float | None = None  # AdamW; lr = base_lr x effective batch / 256
    weight_decay: float | None = None
    layer_decay: float | None = None  # layer-wise lr decay (timm's parameter groups); 1: off
    drop_path: float | None = None  # stochastic depth rate (timm's drop_path_rate)
    warmup_epochs: float | None = None
    smoothing: float | None = None  # label smoothing
    mixup: float | None = None  # mixup alpha (0: off)
    cutmix: float | None = None  # cutmix alpha (0: off)
    auto_augment: str | None = None  # timm's RandAugment string, or "none"
    re_prob: float | None = None  # random erasing probability
    ema_decay: float = 0.0  # model EMA (timm's ModelEmaV3) decay, e.g. 0.9998; 0: off
    val_every_n_epochs: int = 1  # validate (top-1 / top-5) every N epochs; the last one always
    min_lr_ratio: float = 0.0
    out_dir: str | None = None  # default: <run folder>/finetune, or runs/finetune_<model>

    def validate(self) -> None:
        """Counts and rates in their ranges (values left null are the family's, already valid)."""
        for key in ("epochs", "base_lr"):
            value = getattr(self, key)
            must(value is None or value > 0, f"finetune.{key}", value, "positive or null")
        for key in ("weight_decay", "drop_path", "warmup_epochs", "mixup", "cutmix"):
            value = getattr(self, key)
            must(value is None or value >= 0, f"finetune.{key}", value, ">= 0 or null")
        for key in ("layer_decay", "re_prob", "smoothing"):
            value = getattr(self, key)
            low_ok = value is None or (value > 0 if key == "layer_decay" else value >= 0)
            rule = "in (0, 1] (1: off)" if key == "layer_decay" else "in [0, 1]"
            must(low_ok and (value is None or value <= 1), f"finetune.{key}", value, rule)
        must(0.0 <= self.ema_decay < 1.0, "finetune.ema_decay", self.ema_decay, "in [0, 1)")
        must(
            self.val_every_n_epochs >= 1,
            "finetune.val_every_n_epochs",
            self.val_every_n_epochs,
            ">= 1",
        )
        must(
            0.0 <= self.min_lr_ratio <= 1.0, "finetune.min_lr_ratio", self.min_lr_ratio, "in [0, 1]"
        )
