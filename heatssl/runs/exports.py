"""``heatssl export``: a pretrained backbone as a safetensors file that plain timm loads.

The file holds the full timm state dict and, as metadata, the model name, the ``create_model``
arguments and the probed stage (:func:`heatssl.runs.sources.read_export_metadata` reads them back).
timm loads it with ``pretrained_cfg_overlay=dict(file=...)``. ``--format timm`` writes a timm folder
instead (:mod:`heatssl.runs.timm_folder`).
"""

from __future__ import annotations

import json
from pathlib import Path

import timm
from safetensors.torch import save_file

from heatssl.model.backbone import Backbone
from heatssl.model.teacher import Encoder
from heatssl.runs.files import EXPORT_FORMAT
from heatssl.runs.layout import RunLayout
from heatssl.runs.sources import backbone_from_checkpoint, checkpoint_config
from heatssl.writing import replace_file


def export_backbone(backbone: Backbone, path: str | Path, encoder: Encoder | None = None) -> Path:
    """Write the backbone as a safetensors file that plain timm loads.

    The file holds the full timm state dict (the classifier, which pretraining never trains, at its
    default size) and, as metadata, the model name, the ``create_model`` kwargs and, when given,
    which ``encoder`` of its run it is (student or EMA teacher). Load it with::

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
        **({"encoder": encoder} if encoder else {}),
    }
    return replace_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def export_checkpoint(
    checkpoint: str | Path, out: str | Path | None = None, encoder: Encoder | None = None
) -> Path:
    """Export a checkpoint's backbone to safetensors (default ``RUN/backbone.safetensors``): the
    encoder its ``loss.encoder`` names, or ``encoder`` (student / teacher) when given."""
    if out is None:
        out = RunLayout.of_checkpoint(checkpoint).backbone_file
    which = encoder or checkpoint_config(checkpoint).loss.encoder
    return export_backbone(backbone_from_checkpoint(checkpoint, which), out, which)
