"""Heat-map inputs: image files of any size, mode or format PIL reads, or the first images of a split.

Each input keeps its original (for overlays at its own resolution) beside the normalised model input;
unreadable files are left out and named in one warning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from heatssl.config import Config
from heatssl.data.datamodule import build_datamodule
from heatssl.data.images import (
    IMAGE_SUFFIXES,
    MAX_IMAGE_PIXELS,
    read_image,
    to_rgb,
    warn_unreadable,
)
from heatssl.data.transforms import normalize, to_model_input
from heatssl.errors import BadImageError, UnreadableImageError


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
        raise BadImageError(
            f"No image file or folder at {folder}. Give --images an image file or a folder of them."
        )
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def prepare(image: Image.Image, size: int) -> tuple[Tensor, np.ndarray]:
    """The model input (3, size, size), normalised, and the original as float RGB in [0, 1]."""
    rgb = to_rgb(image)
    original = np.asarray(rgb, dtype=np.float32) / 255.0
    resized = np.asarray(rgb.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    return normalize(torch.from_numpy(resized / 255.0).permute(2, 0, 1)), original


def load_images(
    paths: list[Path], size: int, max_pixels: int | None = MAX_IMAGE_PIXELS
) -> LoadedImages:
    """Read every path; unreadable files (and ones over ``max_pixels``) are skipped and named in
    one warning."""
    inputs, originals, names, skipped = [], [], [], []
    for path in paths:
        try:
            x, original = prepare(read_image(path, max_pixels=max_pixels), size)
        except UnreadableImageError as err:
            skipped.append(f"{path} ({str(err).removeprefix(f'{path}: ')})")
            continue
        inputs.append(x)
        originals.append(original)
        names.append(Path(path).stem)
    warn_unreadable(skipped)
    if not inputs:
        raise BadImageError(
            f"None of the {len(paths)} image file(s) could be read"
            f"{': ' + '; '.join(skipped[:3]) if skipped else ''}."
        )
    return LoadedImages(torch.stack(inputs), originals, names, skipped)


def dataset_images(cfg: Config, split: str, num: int) -> tuple[LoadedImages, list[str], list[str]]:
    """The first ``num`` images of a dataset split, their true class names, and all class names."""
    data = build_datamodule(cfg.data, seed=cfg.seed)
    inputs, labels = [], []
    for x, y, _ in data.feature_dataloader(split, batch_size=min(num, 64)):
        inputs.append(x)
        labels.append(y)
        if sum(len(t) for t in inputs) >= num:
            break
    x = torch.cat([t.cpu() for t in inputs])[:num]  # uint8 (a DALI loader may give them on a GPU)
    y = torch.cat([t.cpu() for t in labels])[:num].tolist()
    originals = [img.permute(1, 2, 0).float().div(255.0).numpy() for img in x]
    x = to_model_input(x)
    names = [f"{split}_{i:04d}" for i in range(len(x))]
    classes = data.class_names
    return LoadedImages(x, originals, names), [classes[i] for i in y], classes
