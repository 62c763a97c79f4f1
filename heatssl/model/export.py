"""Backbones to and from files: a safetensors file that plain timm loads, with how to rebuild it.

The file holds the full timm state dict and, as metadata, the model name, the ``create_model``
arguments and the probed stage. timm loads it with ``pretrained_cfg_overlay=dict(file=...)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from heatssl.errors import CheckpointError
from heatssl.model.backbone import Backbone

EXPORT_FORMAT = "heatssl-backbone-v1"


def export_backbone(backbone: Backbone, path: str | Path) -> Path:
    """Write the backbone as a safetensors file that plain timm loads.

    The file holds the full timm state dict (the classifier, which pretraining never trains, at its
    default size) and, as metadata, the model name and the ``create_model`` kwargs. Load it with::

        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path), **kwargs)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = dict(backbone.create_kwargs)
    full = timm.create_model(backbone.name, pretrained=False, **kwargs)
    missing, unexpected = full.load_state_dict(backbone.model.state_dict(), strict=False)
    head = set(full.state_dict()) - set(backbone.model.state_dict())
    if unexpected or set(missing) - head:
        raise RuntimeError(f"Export mismatch: missing {missing}, unexpected {unexpected}.")
    tensors = {k: v.detach().cpu().contiguous() for k, v in full.state_dict().items()}
    metadata = {
        "format": EXPORT_FORMAT,
        "model_name": backbone.name,
        "create_kwargs": json.dumps(kwargs),
        "stage": str(backbone.stage),
    }
    save_file(tensors, str(path), metadata=metadata)
    return path


def safetensors_metadata(path: str | Path, what: str) -> dict[str, str]:
    """The metadata of a safetensors file; a missing or unreadable file is a :class:`CheckpointError`.

    ``what`` names what the file should be (for the message), e.g. "a heatssl backbone export".
    """
    if not Path(path).is_file():
        raise CheckpointError(f"{path} does not exist. Give the path of {what}.")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({err}); it should be {what}. "
            f"The file may be truncated or of another format: write it again."
        ) from err


def read_export_metadata(path: str | Path) -> dict[str, Any]:
    """Model name, create kwargs and stage stored in an exported file."""
    meta = safetensors_metadata(path, "a heatssl backbone export (`heatssl export`)")
    if meta.get("format") != EXPORT_FORMAT:
        raise CheckpointError(
            f"{path} is not a heatssl backbone export (metadata format={meta.get('format')!r}, "
            f"expected {EXPORT_FORMAT!r}). Create one with `heatssl export`."
        )
    return {
        "model_name": meta["model_name"],
        "create_kwargs": json.loads(meta["create_kwargs"]),
        "stage": int(meta["stage"]),
    }


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
    state = load_file(str(path))
    own = backbone.model.state_dict()
    backbone.model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)
    return backbone
