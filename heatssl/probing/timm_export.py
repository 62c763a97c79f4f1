"""``heatssl export --format timm``: a pretraining checkpoint as a timm folder with its model card.

The folder (:func:`heatssl.model.timm_folder.export_timm_folder`) loads with
``timm.create_model("local-dir:PATH", pretrained=True)`` alone; a linear probe head from
``heatssl probe`` can be folded into timm's classifier. Lives in probing because it reads probe
heads and probe figures.
"""

from __future__ import annotations

from pathlib import Path

from heatssl.config import config_keys
from heatssl.model.timm_folder import export_timm_folder
from heatssl.probing.head_files import load_linear_head
from heatssl.probing.model_card import model_card, probe_metrics
from heatssl.train.checkpoint import safe_torch_load
from heatssl.train.run import backbone_from_checkpoint, load_checkpoint_config


def export_timm(
    checkpoint: str | Path, out: str | Path | None = None, head: str | Path | None = None
) -> Path:
    """Write the checkpoint's backbone as a timm folder (default ``RUN/backbone_timm``); return it.

    ``head``: a ``linear_head.safetensors`` written by ``heatssl probe`` to fold in (the folder is
    then a classifier over its classes); without it, a feature extractor (``num_classes: 0``).
    """
    checkpoint = Path(checkpoint)
    run_dir = checkpoint.resolve().parent.parent
    cfg = load_checkpoint_config(checkpoint)
    step = int(safe_torch_load(checkpoint, mmap=True).get("global_step", 0))
    backbone = backbone_from_checkpoint(checkpoint)
    linear, class_names = load_linear_head(head) if head is not None else (None, None)
    folder = Path(out) if out is not None else run_dir / "backbone_timm"
    classes = 0 if linear is None else linear.fc.out_features
    card = model_card(cfg, folder.name, step, probe_metrics(run_dir), classes)
    with config_keys(image_size="data.image_size"):
        return export_timm_folder(backbone, folder, cfg.data.image_size, linear, class_names, card)
