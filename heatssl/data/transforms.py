"""Image transforms and normalisation: PIL image in, normalised float32 ``[3, S, S]`` tensor out.

timm backbones expect ImageNet statistics, so every image heatssl feeds a model is normalised with
:data:`IMAGENET_MEAN` and :data:`IMAGENET_STD`; :func:`denormalize` undoes it for pictures.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torchvision.transforms import v2

from heatssl.data.images import to_rgb

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def build_transform(
    image_size: int,
    train: bool,
    augment: Literal["ssl", "none"] = "ssl",
    crop_scale_min: float = 0.35,
) -> v2.Compose:
    """PIL image -> normalised float32 ``[3, image_size, image_size]`` tensor.

    Training with ``augment="ssl"`` uses MAE's minimal augmentation (random resized crop plus
    horizontal flip): masked-prediction objectives need little else. Everything else resizes the
    short side and centre-crops, so evaluation is deterministic.
    """
    if train and augment == "ssl":
        geometry = [
            v2.RandomResizedCrop(image_size, scale=(crop_scale_min, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    else:
        geometry = [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose(
        [
            v2.Lambda(to_rgb),
            *geometry,
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def _stats(images: Tensor) -> tuple[Tensor, Tensor]:
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return mean, std


def normalize(images: Tensor) -> Tensor:
    """ImageNet-normalise ``[3, H, W]`` or ``[N, 3, H, W]`` images with values in [0, 1]."""
    mean, std = _stats(images)
    return (images - mean) / std


def denormalize(images: Tensor) -> Tensor:
    """Undo the ImageNet normalisation of ``[3, H, W]`` or ``[N, 3, H, W]`` images into [0, 1]."""
    mean, std = _stats(images)
    return (images * std + mean).clamp(0.0, 1.0)
