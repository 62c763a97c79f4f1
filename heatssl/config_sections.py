"""The sections of a run config on what is trained: model, heat, decoder, loss, data, optimiser.

Each dataclass is one YAML section and checks its own values (the sections on how a run trains and
is evaluated are in :mod:`heatssl.config_runs`).

Used through :mod:`heatssl.config`, which assembles them into :class:`~heatssl.config.Config`, merges
YAML and overrides into them and calls every section's ``validate`` once, when a config is loaded.
Choices that the model layer defines (step rules, predictors, quadrants, decoder norms) use its
``Literal`` types, so a value allowed here is one the model accepts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from heatssl.errors import ArgumentError, ConfigError
from heatssl.model.backbone import OUTPUT_STRIDES, check_model_args
from heatssl.model.decoder import DecoderNorm
from heatssl.model.heat import InitRule, PredictorKind, StepRule
from heatssl.model.qbheat import LossRegion, Target, TeacherResolution
from heatssl.model.quadrants import QuadrantChoice
from heatssl.model.teacher import Encoder, GlobalLoss, LatentLoss


def must(ok: bool, key: str, value: Any, rule: str) -> None:
    """Refuse ``key=value`` unless ``ok``, saying what ``rule`` it must follow and the fix."""
    if not ok:
        fix = "" if "fix:" in rule else f"; fix: set {key} in the YAML config or as {key}=VALUE"
        raise ConfigError(f"{key}={value!r} must be {rule}{fix}.")


def positive(section: str, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        must(value > 0, f"{section}.{name}", value, "positive")


def not_negative(section: str, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        must(value >= 0, f"{section}.{name}", value, ">= 0")


def check_stride(key: str, stride: int | None) -> None:
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
        """The stride is one timm takes and ``kwargs`` only shape the architecture (the model name
        and stage are checked against timm when it is built)."""
        check_stride("model.output_stride", self.output_stride)
        try:
            check_model_args(self.kwargs, "model.kwargs")
        except ArgumentError as err:
            raise ConfigError(str(err)) from err


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
        not_negative("heat", self, "heat_weight", "commute_weight", "commute_probes")
        if self.dim is not None:
            must(self.dim > 0, "heat.dim", self.dim, "null (the backbone's channels) or positive")


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
        positive("decoder", self, "width", "min_width")
        not_negative("decoder", self, "depth", "upsample_blocks")


@dataclass
class LossConfig:
    """Where and on what the pixel reconstruction is scored, and the optional EMA-teacher target."""

    region: LossRegion = "masked"
    norm_pix: bool = True
    target: Target = "pixels"  # pixels (the paper), teacher (an EMA teacher's grid) or both
    teacher_weight: float = 1.0
    pixel_weight: float = 1.0
    latent_loss: LatentLoss = "smooth_l1"
    teacher_momentum: float = 0.996  # at the start; a cosine schedule takes it to 1
    latent_head: int = 0  # hidden width of a per-cell MLP before the latent loss (0: none)
    teacher_resolution: TeacherResolution = "full"  # half: the teacher sees the image at half size
    global_weight: float = 0.0  # pooled quarter -> MLP -> the teacher's pooled image (1 - cos)
    global_loss: GlobalLoss = "cosine"  # infonce: the batch's other images are negatives (MoCo v3)
    global_temperature: float = 0.2  # the infonce temperature
    view_jitter: float = (
        0.0  # colour jitter strength, drawn apart for student and teacher (0: none)
    )
    pair_weight: float = 0.0  # a second kept quadrant; its pool and the first's predict each other
    uniform_weight: float = 0.0  # spread the batch's pooled quarters on the sphere (Wang-Isola)
    encoder: Encoder = "student"  # the run's backbone (export, probe, fine-tune): student / teacher
    collapse_spread: float = (
        0.01  # a teacher whose targets spread less has collapsed: stop (0: off)
    )

    def validate(self) -> None:
        """Weights are not negative, the momentum is in [0, 1], a teacher encoder has a teacher."""
        not_negative(
            "loss",
            self,
            "teacher_weight",
            "pixel_weight",
            "collapse_spread",
            "latent_head",
            "global_weight",
            "pair_weight",
            "uniform_weight",
        )
        must(
            self.global_weight == 0 or self.target != "pixels",
            "loss.global_weight",
            self.global_weight,
            "0 when loss.target='pixels' (the global term needs the EMA teacher); fix: "
            "loss.target=both",
        )
        must(
            0.0 <= self.view_jitter <= 1.0 and (self.view_jitter == 0 or self.target != "pixels"),
            "loss.view_jitter",
            self.view_jitter,
            "in [0, 1] (1 = BYOL's colour jitter), and 0 when loss.target='pixels' (it makes the "
            "student's and the EMA teacher's views differ); fix: loss.view_jitter=1.0 with "
            "loss.target=both, or 0",
        )
        must(
            self.encoder == "student" or self.target != "pixels",
            "loss.encoder",
            self.encoder,
            "'student' when loss.target='pixels' (only 'teacher' and 'both' train an EMA "
            "teacher); fix: loss.encoder=student, or loss.target=both",
        )
        must(
            self.global_temperature > 0,
            "loss.global_temperature",
            self.global_temperature,
            "> 0 (it divides the cosine similarities of loss.global_loss=infonce); e.g. 0.2",
        )
        must(
            0.0 <= self.teacher_momentum <= 1.0,
            "loss.teacher_momentum",
            self.teacher_momentum,
            "in [0, 1] (e.g. 0.996; 1 freezes the teacher)",
        )


ROOTS = {
    "imagefolder": "a folder with train/<class>/*.jpg (and optionally val/<class>/*.jpg); set "
    "data.root=/path/to/dataset",
    "hf": "a folder of Parquet or Arrow files, or a Hub dataset id in the local cache",
    "webdataset": "a folder of .tar shards (or train/ and val/ of them), a brace pattern or a "
    "list file",
}
"""The data sources that read files, and what their ``data.root`` names."""


@dataclass
class DataConfig:
    """Which images, at which size, through which loader."""

    name: Literal["digits", "imagefolder", "cifar10", "stl10", "synthetic", "hf", "webdataset"] = (
        "digits"
    )
    root: str | None = None
    # hf and webdataset: the training split, the validation split (null: found or held out), the
    # columns (null: detected), streaming (hf), the val shards (webdataset), the shuffle buffer
    split: str = "train"
    val_split: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    streaming: bool = False
    val_root: str | None = None
    shuffle_buffer: int = 1000
    image_size: int = 32
    batch_size: int = 64
    num_workers: int | Literal["auto"] = "auto"  # loader processes, or threads (dali)
    # who decodes: PIL in worker processes, NVIDIA DALI, or torchvision's decode_jpeg in the
    # training process (on its GPU)
    backend: Literal["pil", "dali", "torchvision"] = "pil"
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
    # images with more pixels are unreadable files (judged from the header, never decoded): a tiny
    # 16-bit PNG can claim 12,000 x 12,000 px and take gigabytes to decode; null: no limit
    max_image_pixels: int | None = 64_000_000

    def validate(self) -> None:
        """Sizes, shares and the folder an ImageFolder needs."""
        positive("data", self, "image_size", "batch_size")
        if self.max_image_pixels is not None:
            positive("data", self, "max_image_pixels")
        if self.num_workers != "auto":
            not_negative("data", self, "num_workers")
        if self.backend != "pil" and self.name != "imagefolder":
            raise ConfigError(
                f"data.backend={self.backend} decodes image files, so it needs "
                f"data.name=imagefolder; data.name={self.name} is not a folder of image files "
                f"(data.backend: pil for every source; dali, torchvision for imagefolder). "
                f"Set data.backend=pil."
            )
        must(0.0 <= self.val_fraction < 1.0, "data.val_fraction", self.val_fraction, "in [0, 1)")
        must(
            0.0 < self.label_fraction <= 1.0,
            "data.label_fraction",
            self.label_fraction,
            "in (0, 1] (e.g. 0.01 or 0.1 for a low-label protocol, 1.0 for every label)",
        )
        must(
            0.0 < self.crop_scale_min <= 1.0,
            "data.crop_scale_min",
            self.crop_scale_min,
            "in (0, 1]",
        )
        if self.name == "synthetic":
            must(
                self.synthetic_size >= 10,
                "data.synthetic_size",
                self.synthetic_size,
                ">= 10 (one image per class at least)",
            )
        if self.name in ROOTS and not self.root:
            raise ConfigError(f"data.name={self.name} needs data.root: {ROOTS[self.name]}.")
        positive("data", self, "shuffle_buffer")


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
        must(self.base_lr > 0, "optim.base_lr", self.base_lr, "positive (e.g. 1.5e-4)")
        not_negative("optim", self, "weight_decay", "warmup_epochs")
        must(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        ok = all(0.0 <= b < 1.0 for b in self.betas)
        must(ok, "optim.betas", list(self.betas), "two numbers in [0, 1)")
