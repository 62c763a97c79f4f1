"""heatssl: self-supervised pretraining of any timm backbone with the heat equation (QB-Heat).

The building blocks are plain torch modules you can use in other SSL code, the way LightlySSL's
losses are used::

    from heatssl import HeatLoss, HeatPredictor

    heat_loss = HeatLoss(dim=512)                   # learned A, B; add its parameters to your optimiser
    loss = ssl_loss + 0.1 * heat_loss(feature_map)  # any (N, d, h, w) map with h, w >= 2

The pipeline (pretrain, probe, export, fine-tune, heat maps) runs from Python as the CLI runs it::

    from heatssl import export_timm, finetune, load_config, pretrain, probe, source_config

    cfg = load_config("demo")
    ckpt = str(pretrain(cfg).last_checkpoint)
    probe(ckpt, cfg)
    export_timm(ckpt)  # a timm folder: timm.create_model("local-dir:...", pretrained=True)
    finetune(ckpt, source_config(ckpt, None, ["finetune.epochs=2"]))

The model-level names import only torch and timm; the run-level ones (``pretrain``, ``probe``,
``finetune``, exports, ...) load their libraries (Lightning, safetensors, grad-cam, matplotlib) on
first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from heatssl.requirements import check_versions

check_versions()  # before anything reads a file: older torch / timm can run code from one

from heatssl.config import Config, load_config
from heatssl.errors import (
    ArgumentError,
    BadImageError,
    CheckpointError,
    ConfigError,
    HeatSSLError,
    NonFiniteLossError,
    UnreadableImageError,
)
from heatssl.model.backbone import Backbone
from heatssl.model.decoder import ConvDecoder
from heatssl.model.heads import LinearHead, Tran1Head
from heatssl.model.heat import HeatOperators, HeatPredictor, MaskTokenPredictor
from heatssl.model.heat_loss import HeatLoss
from heatssl.model.qbheat import QBHeat, QBHeatOutput

__version__ = "0.2.0"

_LAZY = {
    "HeatDataModule": "heatssl.data.datamodule",
    "HeatPretrainModule": "heatssl.train.pretrain_module",
    "pretrain": "heatssl.train.pretrain",
    "probe": "heatssl.probing.probe",
    "finetune": "heatssl.finetuning.finetune",
    "heatmaps": "heatssl.explain.cam",
    "backbone_from_checkpoint": "heatssl.runs.sources",
    "resolve_backbone": "heatssl.runs.sources",
    "source_config": "heatssl.runs.sources",
    "read_export_metadata": "heatssl.runs.sources",
    "load_exported_backbone": "heatssl.runs.sources",
    "export_backbone": "heatssl.runs.exports",
    "export_checkpoint": "heatssl.runs.exports",
    "export_timm": "heatssl.runs.timm_folder",
    "trusted_checkpoints": "heatssl.runs.checkpoints",
    "load_linear_head": "heatssl.runs.head_files",
}

__all__ = [
    "ArgumentError",
    "Backbone",
    "BadImageError",
    "CheckpointError",
    "Config",
    "ConfigError",
    "ConvDecoder",
    "HeatLoss",
    "HeatOperators",
    "HeatPredictor",
    "HeatSSLError",
    "LinearHead",
    "MaskTokenPredictor",
    "NonFiniteLossError",
    "QBHeat",
    "QBHeatOutput",
    "Tran1Head",
    "UnreadableImageError",
    "__version__",
    "load_config",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    """Import the run-level names on first use (they need Lightning, grad-cam, matplotlib)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'heatssl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
