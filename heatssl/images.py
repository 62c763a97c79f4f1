"""Image files for heat maps: any size, mode or format PIL reads, converted; unreadable ones listed."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from heatssl.data import IMAGENET_MEAN, IMAGENET_STD
from heatssl.imageio import (
    IMAGE_SUFFIXES,
    UnreadableImageError,
    read_image,
    to_rgb,
    warn_unreadable,
)


@dataclass
class LoadedImages:
    """Model inputs, the originals (for overlays at their own size) and what could not be read."""

    inputs: Tensor  # (N, 3, S, S), normalised
    originals: list[np.ndarray]  # each (H, W, 3) float32 in [0, 1]
    names: list[str]
    skipped: list[str] = field(default_factory=list)


def image_files(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder`` (or the file itself), sorted."""
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise FileNotFoundError(f"No image file or folder at {folder}.")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def prepare(image: Image.Image, size: int) -> tuple[Tensor, np.ndarray]:
    """The model input (3, size, size), normalised, and the original as float RGB in [0, 1]."""
    rgb = to_rgb(image)
    original = np.asarray(rgb, dtype=np.float32) / 255.0
    resized = np.asarray(rgb.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    x = torch.from_numpy(resized / 255.0).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std, original


def load_images(paths: list[Path], size: int) -> LoadedImages:
    """Read every path; unreadable files are skipped and named in one warning."""
    inputs, originals, names, skipped = [], [], [], []
    for path in paths:
        try:
            x, original = prepare(read_image(path), size)
        except UnreadableImageError as err:
            skipped.append(f"{path} ({str(err).removeprefix(f'{path}: ')})")
            continue
        inputs.append(x)
        originals.append(original)
        names.append(Path(path).stem)
    warn_unreadable(skipped)
    if not inputs:
        raise FileNotFoundError(f"None of the {len(paths)} image file(s) could be read.")
    return LoadedImages(torch.stack(inputs), originals, names, skipped)
