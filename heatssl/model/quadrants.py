"""The four quadrants of an image or a feature grid: ids, names, crops, placement and masks.

A quadrant id is 0..3 (bit 0: right half, bit 1: bottom half), in the order of :data:`QUADRANTS`.
Every function takes one id per sample, so each image of a batch may keep a different quadrant.
"""

from __future__ import annotations

import typing
from typing import Literal

import torch
from torch import Tensor

from heatssl.errors import ArgumentError

Quadrant = Literal["top_left", "top_right", "bottom_left", "bottom_right"]
QUADRANTS: tuple[str, ...] = typing.get_args(Quadrant)
"""Quadrant names; the index in this tuple is the quadrant id (bit 0: right half, bit 1: bottom half)."""

QuadrantChoice = Literal["random", "top_left", "top_right", "bottom_left", "bottom_right"]
"""Which quadrant QB-Heat keeps: ``random`` (per sample) or a fixed one."""


def quadrant_ids(
    quadrant: int | str | Tensor, batch: int, device: torch.device, check: bool = True
) -> Tensor:
    """Quadrant ids (0..3) as a LongTensor of shape (batch,), from an id, a name or a tensor.

    ``check=False`` skips the range check of a tensor's values, which reads them on the host (a
    device sync): for ids made by heatssl itself, such as QB-Heat's sampled quadrants. Inside
    ``torch.compile`` it is skipped too: the read would break the graph (seen on the first GPU
    run, in the pictures' forward with given quadrants); eager calls still check.
    """
    if isinstance(quadrant, str):
        if quadrant not in QUADRANTS:
            raise ArgumentError(
                f"quadrant={quadrant!r} is not a quadrant. Allowed: {', '.join(QUADRANTS)}."
            )
        quadrant = QUADRANTS.index(quadrant)
    q = torch.as_tensor(quadrant, device=device, dtype=torch.long)
    if q.ndim == 0:
        q = q.expand(batch)
    check = check and not torch.compiler.is_compiling()
    if q.shape != (batch,) or (check and bool(((q < 0) | (q > 3)).any())):
        raise ArgumentError(
            f"quadrant={q.tolist()} must hold ids 0..3, one for each of the {batch} samples."
        )
    return q


def flip_where(x: Tensor, mask: Tensor, dim: int) -> Tensor:
    """Flip the samples selected by ``mask`` (shape (N,)) along ``dim``; the others stay."""
    return torch.where(mask.view(-1, *([1] * (x.ndim - 1))), x.flip(dim), x)


def quarters(x: Tensor) -> list[Tensor]:
    """The four quadrants of (..., 2h, 2w) in id order: top-left, top-right, bottom-left, bottom-right."""
    h, w = x.shape[-2] // 2, x.shape[-1] // 2
    return [x[..., :h, :w], x[..., :h, w:], x[..., h:, :w], x[..., h:, w:]]


def crop_quadrant(x: Tensor, quadrant: Tensor) -> Tensor:
    """Each sample's quadrant ``quadrant[i]`` of ``x`` (N, C, H, W), as (N, C, H/2, W/2)."""
    index = torch.arange(x.shape[0], device=x.device)
    return torch.stack(quarters(x))[quadrant, index]


def place_block(block: Tensor, quadrant: Tensor, fill: Tensor) -> Tensor:
    """``fill`` (N, C, 2h, 2w) with each sample's quadrant ``quadrant[i]`` replaced by ``block``."""
    candidates = []
    for qid in range(4):
        parts = quarters(fill)
        parts[qid] = block
        top, bottom = torch.cat(parts[:2], dim=-1), torch.cat(parts[2:], dim=-1)
        candidates.append(torch.cat([top, bottom], dim=-2))
    return torch.stack(candidates)[quadrant, torch.arange(block.shape[0], device=block.device)]


def quadrant_mask(quadrant: Tensor, height: int, width: int) -> Tensor:
    """Float mask (N, 1, H, W): 1 on the three masked quadrants, 0 on the kept one."""
    n = quadrant.shape[0]
    ys = torch.arange(height, device=quadrant.device).view(1, height, 1) >= height // 2
    xs = torch.arange(width, device=quadrant.device).view(1, 1, width) >= width // 2
    kept = (ys == (quadrant >= 2).view(n, 1, 1)) & (xs == (quadrant % 2 == 1).view(n, 1, 1))
    return (~kept).unsqueeze(1).float()
