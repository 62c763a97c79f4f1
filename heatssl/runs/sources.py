"""Where a backbone comes from: one path from any source to a backbone and its config.

A source is a pretraining checkpoint (``.ckpt``: its stored config and weights), an export
(``.safetensors`` from ``heatssl export``: model name, ``create_model`` arguments and stage in its
metadata), a timm folder (``local-dir:PATH``) or Hub repo (``hf-hub:USER/NAME``: its ``config.json``
says the architecture) or a timm model name (random initialisation, the baseline). Every stage
(probes, fine-tuning, heat maps, exports) gets its backbone here, as timm's ``_builder`` gives every
model one path from its pretrained config. Files are read without running pickled code
(:func:`~heatssl.runs.checkpoints.safe_torch_load`), and a file that does not fit is refused with
what it holds instead.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch

from heatssl.config import Config, config_keys, load_config
from heatssl.errors import ArgumentError, CheckpointError, ConfigError
from heatssl.model.backbone import Backbone, check_model_args, restride
from heatssl.model.qbheat import QBHeat
from heatssl.model.teacher import Encoder
from heatssl.runs.build import MODEL_KEYS, build_backbone, build_qbheat
from heatssl.runs.checkpoints import safe_torch_load
from heatssl.runs.files import (
    EXPORT_FORMAT,
    HEAD_FORMAT,
    head_format,
    safetensors_metadata,
    safetensors_tensors,
)
from heatssl.runs.layout import HUB_PREFIXES, RunLayout

MODULE_PREFIX = "qbheat."
"""The pretraining module's name for QB-Heat's weights in a checkpoint's state dict."""
_GIVE = "Give a checkpoint from `heatssl pretrain` (RUN/checkpoints/last.ckpt)."
_EXPORT_WHAT = "a heatssl backbone export (`heatssl export`)"
_EXPORT_FIX = "`heatssl export RUN/checkpoints/last.ckpt -o FILE` writes one."


def is_hub_source(source: str) -> bool:
    """Whether ``source`` names a timm folder (``local-dir:PATH``) or a Hub repo (``hf-hub:NAME``)."""
    return source.startswith(HUB_PREFIXES)


def source_kind(source: str) -> str:
    """``checkpoint`` (.ckpt), ``export`` (.safetensors), ``hub`` (a timm folder: ``local-dir:PATH``
    or ``hf-hub:NAME``) or ``timm`` (a model name: random initialisation)."""
    if is_hub_source(source):
        folder = source.removeprefix("local-dir:")
        if source.startswith("local-dir:") and not (Path(folder) / "config.json").is_file():
            raise CheckpointError(
                f"{source}: {folder} is not a timm folder (no config.json in it). Give a folder "
                f"written by `heatssl export --format timm` (or timm's save_for_hf)."
            )
        return "hub"
    suffix = Path(source).suffix
    if suffix in (".ckpt", ".safetensors"):
        if not Path(source).is_file():
            raise CheckpointError(
                f"Backbone file {source} does not exist. Give a pretraining .ckpt, an exported "
                f".safetensors file, or a timm model name (random initialisation)."
            )
        return "checkpoint" if suffix == ".ckpt" else "export"
    return "timm"


# ----- pretraining checkpoints --------------------------------------------------------------------
@dataclass
class StoredRun:
    """What a pretraining checkpoint holds: its run config, state dict, class count and step."""

    config: Config
    state: dict[str, Any]
    num_classes: int | None
    global_step: int


def read_checkpoint(path: str | Path, mmap: bool = False) -> StoredRun:
    """The config, state dict, class count and step of a pretraining checkpoint (weights only).

    ``mmap=True`` maps the tensors instead of reading them (for the config alone).
    """
    if not Path(path).is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist. {_GIVE}")
    ckpt = safe_torch_load(path, mmap=mmap)
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    config = hp.get("config") if isinstance(hp, dict) else None
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(config, dict) or not isinstance(state, dict):
        if isinstance(ckpt, dict) and ckpt and all(hasattr(v, "shape") for v in ckpt.values()):
            held = f"a bare state dict of {len(ckpt)} tensors"
        elif isinstance(ckpt, dict):
            held = f"keys {sorted(map(str, ckpt))[:6]}"
        else:
            held = f"a {type(ckpt).__name__}"
        raise CheckpointError(
            f"{path} is a PyTorch checkpoint but not a heatssl pretraining checkpoint (no "
            f"hyper_parameters.config and state_dict; it holds {held}). {_GIVE}"
        )
    try:
        cfg = load_config(config)
    except ConfigError as err:
        raise CheckpointError(f"{path}: the run config stored in it cannot be used: {err}") from err
    return StoredRun(cfg, state, hp.get("num_classes"), int(ckpt.get("global_step", 0)))


def checkpoint_config(path: str | Path) -> Config:
    """The run config stored inside a pretraining checkpoint (its tensors are mapped, not read)."""
    return read_checkpoint(path, mmap=True).config


def drop_pruned_layers(
    module: torch.nn.Module, state: dict[str, Any], prefix: str = "backbone.model."
) -> dict[str, Any]:
    """``state`` without the backbone layers under ``prefix`` that ``module`` no longer has.

    Checkpoints written before backbones were pruned past their stage hold those layers; they were
    never trained.
    """
    own = module.state_dict().keys()
    return {k: v for k, v in state.items() if k in own or not k.startswith(prefix)}


def qbheat_from_checkpoint(path: str | Path) -> tuple[Config, QBHeat]:
    """The run config and QB-Heat (eval mode) of a pretraining checkpoint, weights checked."""
    stored = read_checkpoint(path)
    cfg = stored.config
    cfg.model.pretrained = False  # the weights come from the checkpoint, never from a download
    qbheat = build_qbheat(cfg)
    own = qbheat.state_dict()
    state = {
        k.removeprefix(MODULE_PREFIX): v
        for k, v in stored.state.items()
        if not k.startswith("online.")  # the online probe's head, not QB-Heat's
    }
    state = drop_pruned_layers(qbheat, state)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or reshaped:
        model = f"{cfg.model.backbone} {dict(cfg.model.kwargs)}".removesuffix(" {}")
        first = reshaped[0] if reshaped else (missing or unexpected)[0]
        example = (
            f"{MODULE_PREFIX}{first}: file {list(state[first].shape)}, {model} {list(own[first].shape)}"
            if reshaped
            else f"{MODULE_PREFIX}{first}"
        )
        raise CheckpointError(
            f"{path}: its weights do not fit the model its config describes (model.backbone="
            f"{model}, decoder.width={cfg.decoder.width}): {len(reshaped)} tensors of another "
            f"shape, {len(missing)} missing, {len(unexpected)} unexpected (e.g. {example}); they "
            f"come from another architecture (a state dict swapped in, or an edited file). {_GIVE}"
        )
    qbheat.load_state_dict(state)
    return cfg, qbheat.eval()


def backbone_from_checkpoint(path: str | Path, encoder: Encoder | None = None) -> Backbone:
    """The pretrained backbone of a pretraining checkpoint: the encoder its ``loss.encoder``
    names (student, or the EMA teacher), or ``encoder`` when given. Trainable either way."""
    cfg, qbheat = qbheat_from_checkpoint(path)
    which = encoder or cfg.loss.encoder
    try:
        backbone = qbheat.encoder(which)
    except ArgumentError as err:
        raise CheckpointError(f"{path}: {err}") from err
    return backbone.requires_grad_(True)  # the teacher's copy is frozen inside QB-Heat


# ----- exports ----------------------------------------------------------------------------------
def read_export_metadata(path: str | Path) -> dict[str, Any]:
    """Model name, create kwargs and stage stored in an exported file."""
    meta = safetensors_metadata(path, _EXPORT_WHAT, _EXPORT_FIX)
    if meta.get("format") != EXPORT_FORMAT:
        head = head_format(meta.get("heatssl")) == HEAD_FORMAT
        raise CheckpointError(
            f"{path} is not a heatssl backbone export (metadata format={meta.get('format')!r}, "
            f"expected {EXPORT_FORMAT!r}"
            + ("; it is a probe head: give it to `heatssl heatmaps --head`" if head else "")
            + "). Create one with `heatssl export`."
        )
    try:
        found = {
            "model_name": meta["model_name"],
            "create_kwargs": json.loads(meta["create_kwargs"]),
            "stage": int(meta["stage"]),
        }
    except (KeyError, ValueError, TypeError, RecursionError) as err:
        raise CheckpointError(
            f"{path} is a heatssl backbone export with incomplete metadata ({err!r} is missing or "
            f"malformed; it has {sorted(meta)}). {_EXPORT_FIX}"
        ) from err
    if not timm.is_model(found["model_name"]):
        raise CheckpointError(
            f"{path}: its metadata's model_name={found['model_name']!r} is not a timm model name "
            f"(an export names the architecture its weights are for). {_EXPORT_FIX}"
        )
    try:
        check_model_args(found["create_kwargs"], "create_kwargs")
    except ArgumentError as err:
        raise CheckpointError(f"{path}: its metadata's {err}") from err
    return found


def load_exported_backbone(
    path: str | Path, image_size: int | None = None, check_size: bool = True
) -> Backbone:
    """Rebuild a :class:`~heatssl.model.backbone.Backbone` from an exported safetensors file."""
    meta = read_export_metadata(path)
    kwargs = dict(meta["create_kwargs"])
    output_stride = kwargs.pop("output_stride", None)
    backbone = Backbone(
        meta["model_name"],
        stage=meta["stage"],
        image_size=image_size,
        output_stride=output_stride,
        check_size=check_size,
        **kwargs,
    )
    state = safetensors_tensors(path, _EXPORT_WHAT, _EXPORT_FIX)
    own = backbone.model.state_dict()
    missing = [k for k in own if k not in state]
    reshaped = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or reshaped:
        example = (
            f"e.g. {reshaped[0]}: file {list(state[reshaped[0]].shape)}, "
            f"{meta['model_name']} {list(own[reshaped[0]].shape)}"
            if reshaped
            else f"e.g. {missing[0]} missing"
        )
        raise CheckpointError(
            f"{path}: its weights do not fit the model its metadata names ({meta['model_name']} "
            f"with {meta['create_kwargs']}): {len(reshaped)} tensors of another shape, "
            f"{len(missing)} missing ({example}); they come from another architecture. "
            f"{_EXPORT_FIX}"
        )
    check_weights(state, own, path)
    backbone.model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)
    return backbone


def check_weights(state: dict[str, Any], own: dict[str, Any], path: str | Path) -> None:
    """Refuse weights of another dtype kind than the model's (integers for floats) or not finite."""
    for key, expected in own.items():
        value = state.get(key)
        if value is None or not expected.is_floating_point():
            continue
        if not value.is_floating_point():
            raise CheckpointError(
                f"{path}: {key} holds {value.dtype} values where the model has {expected.dtype} "
                f"weights: not weights heatssl wrote. {_EXPORT_FIX}"
            )
        if not bool(torch.isfinite(value).all()):
            raise CheckpointError(
                f"{path}: {key} holds NaN or infinite values: the weights are broken (a training "
                f"run that diverged, or an edited file). Export a good checkpoint again."
            )


# ----- timm folders -------------------------------------------------------------------------------
def check_timm_folder(source: str) -> None:
    """Refuse a ``local-dir:`` timm folder timm would read unsafely or not as heatssl wrote it.

    Its ``config.json`` must be JSON naming a timm architecture and only architecture arguments, and
    its weights must be ``model.safetensors`` (timm would otherwise unpickle ``pytorch_model.bin``).
    """
    folder = Path(source.removeprefix("local-dir:"))
    fix = "Give a folder written by `heatssl export --format timm`."
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise CheckpointError(
            f"{source}: its config.json is not valid JSON ({err}). {fix}"
        ) from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: its config.json is not a JSON object. {fix}")
    arch = config.get("architecture")
    if not isinstance(arch, str) or not timm.is_model(arch):
        raise CheckpointError(f"{source}: config.json's architecture={arch!r} is not a timm model.")
    try:
        args = config.get("model_args", {})
        shaped = (
            {k: v for k, v in args.items() if k != "num_classes"}
            if isinstance(args, dict)
            else args
        )
        check_model_args(shaped, "config.json model_args")
    except ArgumentError as err:
        raise CheckpointError(f"{source}: {err}") from err
    if not (folder / "model.safetensors").is_file():
        raise CheckpointError(
            f"{source}: no model.safetensors in {folder}: heatssl reads a timm folder's weights "
            f"from safetensors only (a pytorch_model.bin is a pickle, which can run code). {fix}"
        )


def _hub_backbone(source: str, cfg: Config) -> Backbone:
    """The backbone of a timm folder or Hub repo, its weights checked as an export's are."""
    if source.startswith("local-dir:"):
        check_timm_folder(source)
    size = cfg.data.image_size
    try:
        with config_keys(**MODEL_KEYS):
            backbone = Backbone(
                source, stage=cfg.model.stage, image_size=size, pretrained=True, check_size=False
            )
    except (RuntimeError, AttributeError, KeyError, ValueError, TypeError, IndexError) as err:
        # timm loading weights of another architecture: a size mismatch, or a layer it lacks
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise CheckpointError(
            f"{source}: its weights do not fit the architecture its config.json names ({first})."
        ) from err
    own = backbone.model.state_dict()
    check_weights(own, own, source)
    return backbone


# ----- any source -------------------------------------------------------------------------------
OUTPUT_KEYS = (("probe", "out_dir"), ("probe", "grid_dir"), ("finetune", "out_dir"))
"""Where a stage writes: set on the command line or by the run folder, never by a file read."""


def source_config(source: str, config: str | None, overrides: list[str] | None) -> Config:
    """The config of a run on ``source``: ``config`` if given, else a checkpoint's own, else the
    defaults; ``overrides`` on top.

    A checkpoint's stored config is validated like a user's, and its output folders are not
    taken: the stages write into the checkpoint's run folder unless the command line says otherwise.
    """
    if config is not None:
        cfg_source: Any = config
    elif source_kind(source) == "checkpoint":
        stored = checkpoint_config(source).to_dict()
        stored["run_dir"] = str(RunLayout.of_checkpoint(source).root)
        for section, key in OUTPUT_KEYS:
            stored[section][key] = None
        cfg_source = stored
    else:
        cfg_source = None
    return load_config(cfg_source, overrides)


def _check_named(cfg: Config, loaded: Backbone, found: str, source: str, named: Collection[str]):
    if "backbone" in named and cfg.model.backbone != found:
        raise ConfigError(
            f"{source} holds a {found!r} backbone but the config names model.backbone="
            f"{cfg.model.backbone!r}. Drop the model.backbone setting or use a matching file."
        )
    stride = loaded.create_kwargs.get("output_stride")
    if "output_stride" in named and cfg.model.output_stride != stride:
        raise ConfigError(
            f"model.output_stride={cfg.model.output_stride} cannot change {source}: a trained "
            f"backbone keeps the stride it was built with ({stride}). To evaluate it at another "
            f"stride set probe.output_stride={cfg.model.output_stride} instead."
        )


def resolve_backbone(source: str, cfg: Config, named: Collection[str] = ()) -> Backbone:
    """The backbone of ``source``: trained weights from a file, or a random-init timm model.

    ``named`` lists the ``model.*`` keys the user set explicitly (``backbone``, ``output_stride``):
    a file's backbone must match the name, and its stride is changed with ``probe.output_stride``
    only. With ``probe.output_stride`` set, the backbone is re-dilated to it (same weights).
    """
    kind = source_kind(source)
    size = cfg.data.image_size
    if kind == "checkpoint":
        backbone = backbone_from_checkpoint(source)
        _check_named(cfg, backbone, backbone.name, source, named)
    elif kind == "export":
        with config_keys(**MODEL_KEYS):
            backbone = load_exported_backbone(source, image_size=size, check_size=False)
        _check_named(cfg, backbone, backbone.name, source, named)
    elif kind == "hub":  # the folder's config.json holds the architecture and its arguments
        backbone = _hub_backbone(source, cfg)
    else:  # random initialisation of the named model (the caller's config is left as is)
        model = dataclasses.replace(cfg.model, backbone=source, pretrained=False)
        backbone = build_backbone(model, size, check_size=False)
    if cfg.probe.output_stride is not None:
        with config_keys(output_stride="probe.output_stride"):
            backbone = restride(backbone, cfg.probe.output_stride)
    return backbone
