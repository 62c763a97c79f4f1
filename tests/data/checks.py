"""What every batch of the data layer must look like (shared by the data tests)."""

from __future__ import annotations

import torch

from heatssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD

LOW = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)) - 1e-4
HIGH = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)) + 1e-4


def check_batch(batch, batch_size: int, image_size: int, num_classes: int = 10) -> None:
    """Shapes, dtypes, normalised range and labels of one ``(images, labels, skipped)`` batch."""
    images, labels, skipped = batch
    assert skipped == []
    assert images.shape == (batch_size, 3, image_size, image_size)
    assert images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.shape == (batch_size,)
    assert images.min() >= LOW and images.max() <= HIGH
    assert images.std() > 0.1  # not a constant image
    assert labels.min() >= 0 and labels.max() < num_classes
