"""What every batch of the data layer must look like (shared by the data tests)."""

from __future__ import annotations

import torch


def check_batch(batch, batch_size: int, image_size: int, num_classes: int = 10) -> None:
    """Shapes, dtypes, value range and labels of one ``(images, labels, skipped)`` batch.

    Loaders give uint8 images (0..255); the model's normalisation runs on the device later.
    """
    images, labels, skipped = batch
    assert skipped == []
    assert images.shape == (batch_size, 3, image_size, image_size)
    assert images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels.shape == (batch_size,)
    assert images.float().std() > 25.0  # not a constant image
    assert labels.min() >= 0 and labels.max() < num_classes
