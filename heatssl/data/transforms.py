"""Image transforms: a PIL image in, a uint8 ``[3, S, S]`` tensor out; normalisation on the device.

Loader workers send uint8 (a quarter of float32's bytes through shared and pinned memory) and the
float conversion with ImageNet's :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD` happens once the batch
is on the device (:func:`to_model_input`), where it costs nothing next to the step. JPEGs are decoded
at 1/2, 1/4 or 1/8 scale when the crop still covers ``S`` pixels at that scale (:meth:`CropResize.draft`):
the crop box is drawn first from the file's header, so the crops follow the same distribution.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import RandomResizedCrop

from heatssl.data.images import to_rgb
from heatssl.errors import ArgumentError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
CROP_RATIO: tuple[float, float] = (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop aspect range

Box = tuple[float, float, float, float]  # left, top, right, bottom in the image's pixels


class CropResize:
    """PIL image -> uint8 ``[3, size, size]`` tensor.

    Training (``train=True``): torchvision's random resized crop (area in ``[scale_min, 1]``,
    aspect ratio in ``[3/4, 4/3]``) and a horizontal flip with probability 1/2, MAE's minimal
    augmentation. Evaluation: the centred square resized to ``size`` (torchvision's
    ``Resize(size)`` + ``CenterCrop(size)``). Resizing is PIL's antialiased bilinear, as torchvision
    does for PIL images; random draws come from torch's generator (seeded per loader worker).
    """

    def __init__(self, size: int, train: bool, scale_min: float = 0.35) -> None:
        if size <= 0 or not 0.0 < scale_min <= 1.0:
            raise ArgumentError(
                f"size={size}, scale_min={scale_min}: size must be > 0 and scale_min in (0, 1]."
            )
        self.size, self.train, self.scale = size, train, (scale_min, 1.0)
        self._pending: tuple[tuple[int, int], Box] | None = None  # set by draft, used once

    def plan(self, image: Image.Image) -> Box:
        """The crop box for ``image`` (only its size is read, so a lazily opened file will do)."""
        width, height = image.size
        if self.train:
            top, left, h, w = RandomResizedCrop.get_params(
                image, list(self.scale), list(CROP_RATIO)
            )
            return float(left), float(top), float(left + w), float(top + h)
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        return left, top, left + side, top + side

    def draft(self, image: Image.Image) -> None:
        """Before decoding: draw the crop and ask the JPEG decoder for the smallest scale that keeps it.

        The decoder reduces by 2, 4 or 8 only while the crop stays at least ``size`` pixels on each
        side, so the resize afterwards still only shrinks. Formats without reduced decoding ignore it.
        """
        self._pending = None
        box = self.plan(image)
        width, height = image.size
        crop_w, crop_h = box[2] - box[0], box[3] - box[1]
        if min(crop_w, crop_h) < 2 * self.size:
            self._pending = ((width, height), box)
            return
        want = (math.ceil(width * self.size / crop_w), math.ceil(height * self.size / crop_h))
        result = image.draft(image.mode, want)
        scale = width / result[1][2] if result else 1.0
        self._pending = (image.size, tuple(v / scale for v in box))  # type: ignore[assignment]

    def box_and_flip(self, image: Image.Image) -> tuple[Box, bool]:
        """For a decoder elsewhere: the crop box in ``image``'s full-size pixels (only its size is
        read) and the flip, drawn as :meth:`draft` and :meth:`__call__` draw them for PIL."""
        self._pending = None
        box = self.plan(image)
        return box, self.flip()

    def flip(self) -> bool:
        """Whether to mirror this image: drawn after :meth:`plan` (training only, probability 1/2)."""
        return self.train and torch.rand(1).item() < 0.5

    def __call__(self, image: Image.Image) -> Tensor:
        pending, self._pending = self._pending, None
        image = to_rgb(image)
        box = pending[1] if pending and pending[0] == image.size else self.plan(image)
        out = image.resize((self.size, self.size), Image.Resampling.BILINEAR, box=box)
        if self.flip():
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.array(out)).permute(2, 0, 1)


def build_transform(
    image_size: int,
    train: bool,
    augment: Literal["ssl", "none"] = "ssl",
    crop_scale_min: float = 0.35,
) -> CropResize:
    """PIL image -> uint8 ``[3, image_size, image_size]`` tensor (see :class:`CropResize`).

    Training with ``augment="ssl"`` uses MAE's minimal augmentation (random resized crop plus
    horizontal flip): masked-prediction objectives need little else. Everything else resizes the
    short side and centre-crops, so evaluation is deterministic.
    """
    return CropResize(image_size, train=train and augment == "ssl", scale_min=crop_scale_min)


def _stats(images: Tensor) -> tuple[Tensor, Tensor]:
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return mean, std


def to_model_input(images: Tensor, channels_last: bool = False) -> Tensor:
    """A loader's uint8 ``[N, 3, H, W]`` batch (on its device) -> ImageNet-normalised float32.

    Run after the transfer to the device: the bytes cross as uint8, the arithmetic runs there.
    Floating-point images are taken as already normalised (a user's own loader) and pass unchanged
    but for the memory layout; any other dtype is refused.
    """
    if images.is_floating_point():
        x = images
    elif images.dtype == torch.uint8:
        x = images.float()
    else:
        raise ArgumentError(
            f"images of dtype {images.dtype}: expected uint8 images (0..255, what heatssl's "
            f"loaders give) or floating-point images already normalised with ImageNet's mean "
            f"and std. Convert them with heatssl.data.transforms.normalize(images / 255)."
        )
    if channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    if x is images:
        return x
    mean, std = _stats(x)
    return x.sub_(mean * 255.0).div_(std * 255.0)


def normalize(images: Tensor) -> Tensor:
    """ImageNet-normalise ``[3, H, W]`` or ``[N, 3, H, W]`` images with values in [0, 1]."""
    mean, std = _stats(images)
    return (images - mean) / std


def denormalize(images: Tensor) -> Tensor:
    """Undo the ImageNet normalisation of ``[3, H, W]`` or ``[N, 3, H, W]`` images into [0, 1]."""
    mean, std = _stats(images)
    return (images * std + mean).clamp(0.0, 1.0)
