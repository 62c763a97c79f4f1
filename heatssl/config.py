"""Typed run configuration: YAML recipes plus ``key=value`` overrides, validated before anything runs.

A run is described by one :class:`Config` (nested dataclasses). Recipes live as YAML under ``configs/``;
the command line overrides single keys with dotted paths (``trainer.max_epochs=3``). Unknown keys and
values of the wrong type are refused with the closest valid key named, so a typo never silently falls
back to a default. The resolved config is written into every run folder so any run can be repeated.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A config value or key that cannot be used; the message says what is allowed and the fix."""


OUTPUT_STRIDES = (None, 8, 16, 32)
"""Values of ``model.output_stride`` and ``probe.output_stride`` (timm CNNs take 8, 16, 32)."""


@dataclass
class ModelConfig:
    """The timm backbone and which of its feature maps QB-Heat works on."""

    backbone: str = "resnet18"
    stage: int = -1  # index into timm's feature_info (negative counts from the end)
    output_stride: int | None = (
        None  # dilate the last stages (CNNs that support it) for a finer grid
    )
    pretrained: bool = False  # timm's own pretrained weights: needs network access
    grad_checkpointing: bool = (
        False  # timm's set_grad_checkpointing: less memory, ~30% more compute
    )
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments


@dataclass
class HeatConfig:
    """The heat predictor and the heat-equation losses (METHOD.md sections 1 and 3)."""

    predictor: Literal["heat", "copy", "mask_token"] = "heat"
    step: Literal["euler", "normalized"] = "normalized"  # chosen by the ablation (README)
    init: Literal["zeros", "random"] = "zeros"
    quadrant: Literal["random", "top_left", "top_right", "bottom_left", "bottom_right"] = "random"
    heat_weight: float = 0.1
    commute_weight: float = 1e-3
    commute_probes: int = 16  # random probes estimating ||AB - BA||_F^2 (0: exact, O(d^3))


@dataclass
class DecoderConfig:
    """The light conv decoder from the predicted feature grid back to pixels."""

    width: int = 128
    depth: int = 1  # 3x3 conv blocks at grid resolution before upsampling
    upsample_blocks: int = 1  # (x2 upsample, 3x3 conv) blocks; a pixel shuffle does the rest
    min_width: int = 16
    norm: Literal["batch", "group", "none"] = "batch"  # group: batch-independent (DDP on CPU)


@dataclass
class LossConfig:
    """Where and on what the pixel reconstruction is scored."""

    region: Literal["masked", "full"] = "masked"
    norm_pix: bool = True


@dataclass
class DataConfig:
    """Which images, at which size, through which loader."""

    name: Literal["digits", "imagefolder", "cifar10", "stl10", "synthetic"] = "digits"
    root: str | None = None
    image_size: int = 32
    batch_size: int = 64
    num_workers: int = 0
    download: bool = False
    augment: Literal["ssl", "none"] = "ssl"
    crop_scale_min: float = 0.35
    val_fraction: float = 0.2  # digits / synthetic only: share held out for validation
    synthetic_size: int = 256  # synthetic only: number of images
    on_bad_image: Literal["skip", "error"] = "skip"  # unreadable files: skip + report, or stop


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay; lr = base_lr x effective batch / 256."""

    base_lr: float = 1.5e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.0


@dataclass
class TrainerConfig:
    """Lightning Trainer settings and run-folder behaviour."""

    max_epochs: int = 10
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
    checkpoint_every_n_steps: int = 0  # also refresh last.ckpt every N steps, mid-epoch (0: off)
    checkpoint_every_n_minutes: float = 30.0  # and every N minutes of training (0: off)
    progress_bar: bool = True
    logger: Literal["csv", "tensorboard", "none"] = "csv"


@dataclass
class ProbeConfig:
    """Frozen-backbone evaluation (METHOD.md section 4): which probes and how they train."""

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
    output_stride: int | None = None  # re-dilate the frozen CNN for evaluation (null: its own)
    knn_k: int = 20
    knn_temperature: float = 0.07
    online: bool = False  # online linear probe on the kept-quarter features during pretraining


@dataclass
class Config:
    """Everything one pretraining run needs."""

    run_dir: str = "runs/pretrain"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    heat: HeatConfig = field(default_factory=HeatConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML- and checkpoint-safe: only builtins)."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _suggest(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"{hint} Allowed keys: {', '.join(sorted(allowed))}."


def _check_type(path: str, value: Any, annotation: Any) -> Any:
    """Return ``value`` coerced to ``annotation`` or raise ConfigError naming what is allowed."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in args:
            try:
                return _check_type(path, value, arm)
            except ConfigError as err:
                errors.append(str(err))
        allowed = " or ".join(_type_name(a) for a in args)
        raise ConfigError(f"{path}={value!r} has the wrong type: expected {allowed}.")
    if annotation is type(None):
        if value is None:
            return None
        raise ConfigError(f"{path}={value!r}: expected null.")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(
            f"{path}={value!r} is not allowed. Allowed values: {', '.join(map(repr, args))}."
        )
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}={value!r}: expected a list, e.g. [a, b].")
        return [_check_type(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{path}={value!r}: expected a list of {len(args)} numbers.")
        pairs = enumerate(zip(value, args, strict=True))
        return tuple(_check_type(f"{path}[{i}]", v, a) for i, (v, a) in pairs)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}={value!r}: expected a mapping (key: value).")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}={value!r}: expected true or false.")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}={value!r}: expected an integer.")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}={value!r}: expected a number.")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}={value!r}: expected a string.")
    raise ConfigError(f"{path}: unsupported config type {annotation!r}.")  # pragma: no cover


def _type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "null"
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(annotation)))
    return getattr(annotation, "__name__", str(annotation))


def _merge(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    """Write ``updates`` into dataclass ``obj`` in place, checking every key and type."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    if not isinstance(updates, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping, got {updates!r}.")
    for key, value in updates.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"Unknown config key '{path}'.{_suggest(key, names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, prefix=f"{path}.")
        else:
            setattr(obj, key, _check_type(path, value, hints[key]))


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``a.b=value`` into its dotted key and the YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(
            f"Override '{text}' is not of the form key=value (for example trainer.max_epochs=5)."
        )
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A YAML path, or the name of a bundled recipe (``demo`` -> configs/demo.yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = CONFIG_DIR / f"{path.stem}.yaml"
    if path.suffix in ("", ".yaml", ".yml") and bundled.is_file():
        return bundled
    recipes = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(
        f"Config '{name_or_path}' not found. Give a YAML file path or a bundled recipe: "
        f"{', '.join(recipes)}."
    )


def load_config(
    source: str | Path | dict[str, Any] | None = None, overrides: list[str] | None = None
) -> Config:
    """Build a validated Config from defaults, a YAML file (or dict) and ``key=value`` overrides."""
    cfg = Config()
    if source is not None:
        if isinstance(source, dict):
            data = source
        else:
            path = resolve_config_path(source)
            data = yaml.safe_load(path.read_text()) or {}
        _merge(cfg, data)
    for text in overrides or []:
        key, value = parse_override(text)
        _merge(cfg, _nest(key, value))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that do not need the model (sizes are checked by the backbone adapter)."""
    positive = {
        "data.image_size": cfg.data.image_size,
        "data.batch_size": cfg.data.batch_size,
        "trainer.max_epochs": cfg.trainer.max_epochs,
        "trainer.accumulate_grad_batches": cfg.trainer.accumulate_grad_batches,
        "trainer.num_nodes": cfg.trainer.num_nodes,
        "decoder.width": cfg.decoder.width,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be positive.")
    if cfg.data.name == "imagefolder" and not cfg.data.root:
        raise ConfigError(
            "data.name=imagefolder needs data.root: a folder with train/<class>/*.jpg "
            "(and optionally val/<class>/*.jpg). Set data.root=/path/to/dataset."
        )
    for key, stride in (
        ("model.output_stride", cfg.model.output_stride),
        ("probe.output_stride", cfg.probe.output_stride),
    ):
        if stride not in OUTPUT_STRIDES:
            raise ConfigError(
                f"{key}={stride} is not allowed. Allowed values: null (the model's own), "
                f"{', '.join(map(str, OUTPUT_STRIDES[1:]))}."
            )
    for key in ("epochs", "batch_size", "tran1_epochs", "knn_k"):
        if getattr(cfg.probe, key) <= 0:
            raise ConfigError(f"probe.{key}={getattr(cfg.probe, key)} must be positive.")
    if cfg.optim.base_lr <= 0:
        raise ConfigError(f"optim.base_lr={cfg.optim.base_lr} must be positive (e.g. 1.5e-4).")
    for key in ("heat_weight", "commute_weight"):
        if getattr(cfg.heat, key) < 0:
            raise ConfigError(f"heat.{key}={getattr(cfg.heat, key)} must be >= 0.")


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML (reloadable with :func:`load_config`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path
