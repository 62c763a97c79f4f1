"""heatssl: self-supervised pretraining of any timm backbone with the heat equation (QB-Heat).

The building blocks are plain torch modules you can use in other SSL code, the way LightlySSL's
losses are used::

    from heatssl import HeatLoss, HeatPredictor

    heat_loss = HeatLoss(dim=512)                   # learned A, B; add its parameters to your optimiser
    loss = ssl_loss + 0.1 * heat_loss(feature_map)  # any (N, d, h, w) map with h, w >= 2

The pipeline (pretrain, probe, heat maps) runs from Python as the CLI runs it::

    from heatssl import load_config, pretrain, probe

    cfg = load_config("demo")
    result = pretrain(cfg)
    probe(str(result.last_checkpoint), cfg)

The model-level names import only torch and timm; the run-level ones (``pretrain``, ``probe``,
``heatmaps``, ...) load Lightning, grad-cam and matplotlib on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

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
from heatssl.model.export import export_backbone, load_exported_backbone, read_export_metadata
from heatssl.model.heads import LinearHead, Tran1Head
from heatssl.model.heat import HeatOperators, HeatPredictor, MaskTokenPredictor
from heatssl.model.heat_loss import HeatLoss
from heatssl.model.qbheat import QBHeat, QBHeatOutput

__version__ = "0.1.0"

_LAZY = {
    "HeatDataModule": "heatssl.data.module",
    "HeatPretrainModule": "heatssl.train.module",
    "pretrain": "heatssl.train.run",
    "backbone_from_checkpoint": "heatssl.train.run",
    "trusted_checkpoints": "heatssl.train.checkpoint",
    "probe": "heatssl.probing.run",
    "load_linear_head": "heatssl.probing.head_files",
    "heatmaps": "heatssl.explain.cam",
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
    "export_backbone",
    "load_config",
    "load_exported_backbone",
    "read_export_metadata",
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
