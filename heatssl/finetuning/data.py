"""Labelled loaders for fine-tuning: timm's training transform, heatssl's loaders and splits.

The training transform is timm's ``create_transform`` (random resized crop, flip, RandAugment)
in its prefetcher form: images leave the workers as uint8 and are normalised on the device, where
random erasing then runs too (:class:`heatssl.finetuning.classifier.FinetuneModule`). Evaluation is
heatssl's own centred crop, the one the probes use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from torch import Tensor

from heatssl.config import DataConfig
from heatssl.data.datamodule import HeatDataModule
from heatssl.data.images import to_rgb
from heatssl.data.transforms import build_transform


class TimmTrainTransform:
    """PIL image -> uint8 ``[3, S, S]``: timm's training pipeline without its normalisation."""

    def __init__(self, image_size: int, auto_augment: str | None) -> None:
        aa = None if auto_augment in (None, "", "none") else auto_augment
        self.timm = create_transform(
            image_size,
            is_training=True,
            auto_augment=aa,
            color_jitter=0.0 if aa else 0.4,  # timm's rule: RandAugment replaces colour jitter
            interpolation="bicubic",
            use_prefetcher=True,  # ends in ToNumpy: uint8, CHW
        )

    def __call__(self, image: Image.Image) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.timm(to_rgb(image))))


class FinetuneDataModule(HeatDataModule):
    """:class:`HeatDataModule` over ``data.label_fraction`` of the labels with timm's training
    transform (evaluation unchanged); the subset is saved as ``label_subset.json`` in ``out_dir``."""

    def __init__(
        self,
        cfg: DataConfig,
        seed: int,
        auto_augment: str | None,
        out_dir: str | Path,
        rank: int = 0,
    ) -> None:
        super().__init__(cfg, seed, labelled=True, label_dir=out_dir, index_dir=out_dir, rank=rank)
        self.auto_augment = auto_augment

    def transforms(self) -> tuple[Any, Any]:
        """timm's training pipeline (uint8 out), heatssl's centred crop for evaluation."""
        size = self.cfg.image_size
        return TimmTrainTransform(size, self.auto_augment), build_transform(size, False)
