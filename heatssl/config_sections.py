"""The sections of a run config: one dataclass per YAML section, each checking its own values.

Used through :mod:`heatssl.config`, which assembles them into :class:`~heatssl.config.Config`, merges
YAML and overrides into them and calls every section's ``validate`` once, when a config is loaded.
Choices that the model layer defines (step rules, predictors, quadrants, decoder norms) use its
``Literal`` types, so a value allowed here is one the model accepts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from heatssl.errors import ConfigError
from heatssl.model.backbone import OUTPUT_STRIDES
from heatssl.model.decoder import DecoderNorm
from heatssl.model.heat import InitRule, PredictorKind, StepRule
from heatssl.model.qbheat import LossRegion
from heatssl.model.quadrants import QuadrantChoice


def _must(ok: bool, key: str, value: Any, rule: str) -> None:
    """Refuse ``key=value`` unless ``ok``, saying what ``rule`` it must follow."""
    if not ok:
        raise ConfigError(f"{key}={value!r} must be {rule}.")


def _positive(section: str, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _must(value > 0, f"{section}.{name}", value, "positive")


def _not_negative(section: str, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _must(value >= 0, f"{section}.{name}", value, ">= 0")


def _check_stride(key: str, stride: int | None) -> None:
    if stride not in (None, *OUTPUT_STRIDES):
        raise ConfigError(
            f"{key}={stride} is not allowed. Allowed values: null (the model's own), "
            f"{', '.join(map(str, OUTPUT_STRIDES))}."
        )


@dataclass
class ModelConfig:
    """The timm backbone and which of its feature maps QB-Heat works on."""

    backbone: str = "resnet18"
    stage: int = -1  # index into timm's feature_info (negative counts from the end)
    output_stride: int | None = None  # dilate the last stages (CNNs) for a finer grid
    pretrained: bool = False  # timm's own pretrained weights: needs network access
    grad_checkpointing: bool = False  # timm's set_grad_checkpointing: less memory, more compute
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments

    def validate(self) -> None:
        """The stride is one timm takes (the model name and stage are checked against timm)."""
        _check_stride("model.output_stride", self.output_stride)


@dataclass
class HeatConfig:
    """The heat predictor and the heat-equation losses (docs/method.md)."""

    predictor: PredictorKind = "heat"
    step: StepRule = "normalized"  # chosen by the ablation (docs/benchmarks.md)
    init: InitRule = "zeros"
    # channels of A and B: null = the backbone's own; a number adds a learned 1x1 projection
    dim: int | None = None
    quadrant: QuadrantChoice = "random"
    heat_weight: float = 0.1
    commute_weight: float = 1e-3
    commute_probes: int = 16  # random probes estimating ||AB - BA||_F^2 (0: exact, O(d^3))

    def validate(self) -> None:
        """Loss weights and probe counts are not negative; ``dim`` is null or positive."""
        _not_negative("heat", self, "heat_weight", "commute_weight", "commute_probes")
        if self.dim is not None:
            _must(self.dim > 0, "heat.dim", self.dim, "null (the backbone's channels) or positive")


@dataclass
class DecoderConfig:
    """The light conv decoder from the predicted feature grid back to pixels."""

    width: int = 128
    depth: int = 1  # 3x3 conv blocks at grid resolution before upsampling
    upsample_blocks: int = 1  # (x2 upsample, 3x3 conv) blocks; a pixel shuffle does the rest
    min_width: int = 16
    norm: DecoderNorm = "batch"  # group: batch-independent (DDP on CPU)

    def validate(self) -> None:
        """Widths are positive, block counts not negative."""
        _positive("decoder", self, "width", "min_width")
        _not_negative("decoder", self, "depth", "upsample_blocks")


@dataclass
class LossConfig:
    """Where and on what the pixel reconstruction is scored."""

    region: LossRegion = "masked"
    norm_pix: bool = True

    def validate(self) -> None:
        """Nothing beyond the types: both keys are choices."""


@dataclass
class DataConfig:
    """Which images, at which size, through which loader."""

    name: Literal["digits", "imagefolder", "cifar10", "stl10", "synthetic"] = "digits"
    root: str | None = None
    image_size: int = 32
    batch_size: int = 64
    num_workers: int | Literal["auto"] = "auto"  # loader processes (pil) or threads (dali)
    backend: Literal["pil", "dali"] = "pil"  # who decodes: PIL in worker processes, or NVIDIA DALI
    dali_device: Literal["auto", "cpu", "gpu"] = (
        "auto"  # dali: decode on the GPU when training on one
    )
    download: bool = False
    augment: Literal["ssl", "none"] = "ssl"
    crop_scale_min: float = 0.35
    val_fraction: float = 0.2  # digits / synthetic / folders without val/: share held out
    split_seed: int = 0  # draws that held-out share: tied to the data, not to the run's seed
    # share of the labelled training images the probes and fine-tuning use, class-balanced, drawn
    # with split_seed; pretraining ignores it and uses every image
    label_fraction: float = 1.0
    synthetic_size: int = 256  # synthetic only: number of images
    on_bad_image: Literal["skip", "error"] = "skip"  # unreadable files: skip + report, or stop

    def validate(self) -> None:
        """Sizes, shares and the folder an ImageFolder needs."""
        _positive("data", self, "image_size", "batch_size")
        if self.num_workers != "auto":
            _not_negative("data", self, "num_workers")
        if self.backend == "dali" and self.name != "imagefolder":
            raise ConfigError(
                f"data.backend=dali decodes image files (data.name=imagefolder); "
                f"data.name={self.name} is not a folder of image files. Set data.backend=pil."
            )
        _must(0.0 <= self.val_fraction < 1.0, "data.val_fraction", self.val_fraction, "in [0, 1)")
        _must(
            0.0 < self.label_fraction <= 1.0,
            "data.label_fraction",
            self.label_fraction,
            "in (0, 1] (e.g. 0.01 or 0.1 for a low-label protocol, 1.0 for every label)",
        )
        _must(
            0.0 < self.crop_scale_min <= 1.0,
            "data.crop_scale_min",
            self.crop_scale_min,
            "in (0, 1]",
        )
        if self.name == "synthetic":
            _must(
                self.synthetic_size >= 10,
                "data.synthetic_size",
                self.synthetic_size,
                ">= 10 (one image per class at least)",
            )
        if self.name == "imagefolder" and not self.root:
            raise ConfigError(
                "data.name=imagefolder needs data.root: a folder with train/<class>/*.jpg "
                "(and optionally val/<class>/*.jpg). Set data.root=/path/to/dataset."
            )


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay; lr = base_lr x effective batch / 256."""

    base_lr: float = 1.5e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.0

    def validate(self) -> None:
        """A positive learning rate; decay, warm-up and betas in their ranges."""
        _must(self.base_lr > 0, "optim.base_lr", self.base_lr, "positive (e.g. 1.5e-4)")
        _not_negative("optim", self, "weight_decay", "warmup_epochs")
        _must(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        ok = all(0.0 <= b < 1.0 for b in self.betas)
        _must(ok, "optim.betas", list(self.betas), "two numbers in [0, 1)")


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
    limit_train_batches: float | int = 1.0
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
        _must(
            seconds is not None and seconds > 0,
            "trainer.max_time",
            value,
            "minutes (e.g. 15) or a time 'HH:MM:SS' / 'DD:HH:MM:SS' (e.g. '00:15:00'), above 0",
        )
        return seconds

    def validate(self) -> None:
        """Counts are positive; the mid-epoch checkpoint triggers are >= 0 (0 turns one off)."""
        _positive("trainer", self, "max_epochs", "num_nodes", "accumulate_grad_batches")
        _not_negative("trainer", self, "checkpoint_every_n_steps", "checkpoint_every_n_minutes")
        self.max_time_seconds()  # a budget that cannot be read stops here
        _must(
            self.keep_checkpoints >= -1,
            "trainer.keep_checkpoints",
            self.keep_checkpoints,
            ">= 0 (how many epoch checkpoints to keep besides last.ckpt) or -1 (all)",
        )
        if self.wandb_project is not None:  # W&B refuses these characters in project names
            _must(
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
        _positive(
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
        _not_negative("probe", self, "weight_decay", "warmup_epochs", "tran1_heads")
        if self.tran1_max_images is not None:
            _must(
                self.tran1_max_images > 0,
                "probe.tran1_max_images",
                self.tran1_max_images,
                "positive or null",
            )
        _check_stride("probe.output_stride", self.output_stride)


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
            _must(value is None or value > 0, f"finetune.{key}", value, "positive or null")
        for key in ("weight_decay", "drop_path", "warmup_epochs", "mixup", "cutmix"):
            value = getattr(self, key)
            _must(value is None or value >= 0, f"finetune.{key}", value, ">= 0 or null")
        for key in ("layer_decay", "re_prob", "smoothing"):
            value = getattr(self, key)
            low_ok = value is None or (value > 0 if key == "layer_decay" else value >= 0)
            rule = "in (0, 1] (1: off)" if key == "layer_decay" else "in [0, 1]"
            _must(low_ok and (value is None or value <= 1), f"finetune.{key}", value, rule)
        _must(0.0 <= self.ema_decay < 1.0, "finetune.ema_decay", self.ema_decay, "in [0, 1)")
        _must(
            self.val_every_n_epochs >= 1,
            "finetune.val_every_n_epochs",
            self.val_every_n_epochs,
            ">= 1",
        )
        _must(
            0.0 <= self.min_lr_ratio <= 1.0, "finetune.min_lr_ratio", self.min_lr_ratio, "in [0, 1]"
        )
