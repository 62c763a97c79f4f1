"""Typed run configuration: YAML recipes plus ``key=value`` overrides, validated once before anything runs.

A run is described by one :class:`Config` (nested dataclasses, one per section). Recipes live as YAML
under ``configs/``; the command line overrides single keys with dotted paths (``trainer.max_epochs=3``).
Unknown keys and values of the wrong type are refused with the closest valid key named
(:mod:`heatssl.config_types`). Each section then checks its own values in its ``validate`` method,
and :meth:`Config.validate` adds the checks that span sections; :func:`load_config` calls it, so
the layers that read a config (data, train, probing, explain) never re-check its values. The model
layer checks its own arguments for callers without a config, in its own words; building through
:mod:`heatssl.runs.build` re-words those errors with config keys. The resolved config is written into every
run folder so any run can be repeated.

Choices that the model layer defines (step rules, predictors, quadrants, decoder norms) use its
``Literal`` types, so a value allowed here is one the model accepts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from heatssl.config_runs import FinetuneConfig, ProbeConfig, TrainerConfig
from heatssl.config_sections import (
    DataConfig,
    DecoderConfig,
    HeatConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
)
from heatssl.config_types import check_bounded, load_yaml, merge, parse_override, plain
from heatssl.errors import ArgumentError, ConfigError, rename_arguments
from heatssl.writing import write_text

__all__ = [
    "CONFIG_DIR",
    "Config",
    "ConfigError",
    "DataConfig",
    "DecoderConfig",
    "FinetuneConfig",
    "HeatConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "ProbeConfig",
    "TrainerConfig",
    "config_keys",
    "effective_batch",
    "load_config",
    "save_config",
]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


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
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML- and checkpoint-safe: only builtins)."""
        return plain(dataclasses.asdict(self))

    def validate(self) -> None:
        """Every section checks itself; sizes that need the model are checked when it is built."""
        if not self.run_dir.strip():
            raise ConfigError(
                f"run_dir={self.run_dir!r} names no folder: the run would write into the current "
                f"one. Set run_dir=runs/NAME."
            )
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed={self.seed} must be in [0, 2**32): a whole number >= 0.")
        paths = {
            "run_dir": self.run_dir,
            "data.root": self.data.root,
            "probe.out_dir": self.probe.out_dir,
            "probe.grid_dir": self.probe.grid_dir,
            "finetune.out_dir": self.finetune.out_dir,
        }
        for key, value in paths.items():
            if value is not None and any(ord(c) < 32 or ord(c) == 127 for c in value):
                raise ConfigError(
                    f"{key}={value!r} holds a control character (a terminal escape, a line break): "
                    f"not a path to write or read. Type the path again."
                )
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate()


def effective_batch(cfg: Config, processes: int) -> int:
    """Per-device batch x processes (devices x nodes) x gradient accumulation: the batch each
    optimiser step sees, which the learning rate follows (``base_lr x batch / 256``)."""
    return cfg.data.batch_size * processes * cfg.trainer.accumulate_grad_batches


@contextmanager
def config_keys(**keys: str) -> Iterator[None]:
    """Re-raise a library :class:`ArgumentError` as a :class:`ConfigError` in config words.

    ``keys`` maps argument names to config keys (``image_size="data.image_size"``), so a message
    such as "image_size=50 ... Fix: output_stride=16" reads "data.image_size=50 ... Fix:
    model.output_stride=16".
    """
    try:
        yield
    except ArgumentError as err:
        raise ConfigError(rename_arguments(str(err), keys)) from err


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


def _read_yaml(path: Path) -> dict[str, Any]:
    """The mapping in a YAML file; a syntax error names the file, line and column."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path} is not UTF-8 text (byte {err.start}: {err.reason}): save it as UTF-8."
        ) from err
    try:
        data = load_yaml(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}{where}: not valid YAML ({problem}). Fix the file.") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (model:, data:, ...).")
    return data


def load_config(
    source: str | Path | dict[str, Any] | None = None, overrides: list[str] | None = None
) -> Config:
    """Build a validated Config from defaults, a YAML file (or dict) and ``key=value`` overrides."""
    cfg = Config()
    if source is not None:
        data = source if isinstance(source, dict) else _read_yaml(resolve_config_path(source))
        check_bounded(data, "the config" if isinstance(source, dict) else str(source))
        merge(cfg, data)
    for text in overrides or []:
        merge(cfg, parse_override(text))
    cfg.validate()
    return cfg


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML (reloadable with :func:`load_config`)."""
    return write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
