"""The light pixel decoder: predicted feature grid (N, d, h, w) -> image (N, 3, h*r, w*r).

A 1x1 projection, ``depth`` 3x3 conv blocks at grid resolution, ``upsample_blocks`` (upsample x2,
3x3 conv) blocks that halve the width, then a 1x1 conv to ``3 x s x s`` channels and a pixel shuffle for
the remaining factor s (MAE's linear patch head when ``upsample_blocks`` is 0). It is thrown away after
pretraining, so it stays small: convolutions at full pixel resolution would cost more than the
quarter-size encoder saves.
"""

from __future__ import annotations

import math
from typing import Literal

from torch import Tensor, nn

from heatssl.errors import ArgumentError, check_choice

DecoderNorm = Literal["batch", "group", "none"]
"""Normalisation in the decoder's conv blocks; ``group`` is independent of the batch."""


def _norm(kind: DecoderNorm, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":  # batch-independent: the same result on any split of the batch
        return nn.GroupNorm(math.gcd(8, channels), channels)
    return nn.Identity()


def _conv_block(c_in: int, c_out: int, norm: DecoderNorm) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=norm == "none"), _norm(norm, c_out), nn.GELU()
    )


class ConvDecoder(nn.Module):
    """Decode a feature grid to pixels.

    Args:
        in_dim: Channels of the feature grid (the backbone stage's width).
        reduction: Pixels per grid cell (a power of two: the backbone stage's reduction).
        width: Channels after the 1x1 projection.
        depth: 3x3 conv blocks at grid resolution before upsampling.
        upsample_blocks: (x2 upsample, 3x3 conv) blocks; capped at log2(reduction).
        min_width: Lower bound on the width while it halves at each upsampling block.
        out_channels: Image channels.
        norm: Normalisation in the conv blocks: ``batch`` (default), ``group`` (independent of
            the batch: per-device batches and DDP without SyncBatchNorm give the global result) or
            ``none``.
    """

    def __init__(
        self,
        in_dim: int,
        reduction: int,
        width: int = 128,
        depth: int = 1,
        upsample_blocks: int = 1,
        min_width: int = 16,
        out_channels: int = 3,
        norm: DecoderNorm = "batch",
    ) -> None:
        super().__init__()
        check_choice("norm", norm, DecoderNorm)
        if reduction < 1 or reduction & (reduction - 1):
            raise ArgumentError(
                f"reduction={reduction}: the decoder upsamples a grid cell to pixels in steps of 2, "
                f"so the backbone's pixels per cell must be a power of two (1, 2, 4, 8, ...). "
                f"Use a backbone, patch size or stage whose reduction is one."
            )
        if depth < 0 or upsample_blocks < 0:
            raise ArgumentError(f"depth={depth}, upsample_blocks={upsample_blocks} must be >= 0.")
        factors = int(math.log2(reduction))
        blocks = min(upsample_blocks, factors)
        layers: list[nn.Module] = [nn.Conv2d(in_dim, width, 1)]
        layers += [_conv_block(width, width, norm) for _ in range(depth)]
        c = width
        for _ in range(blocks):
            c_next = max(min_width, c // 2)
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), _conv_block(c, c_next, norm)]
            c = c_next
        shuffle = 2 ** (factors - blocks)
        layers += [nn.Conv2d(c, out_channels * shuffle * shuffle, 1), nn.PixelShuffle(shuffle)]
        self.layers = nn.Sequential(*layers)
        self.reduction = reduction

    def forward(self, grid: Tensor) -> Tensor:
        """Pixels (N, out_channels, h * reduction, w * reduction)."""
        return self.layers(grid)
