"""Probe heads: plain modules that read a frozen backbone's features (docs/method.md, evaluation).

- :class:`LinearHead`: BatchNorm without affine, then Linear, on the pooled features (MAE's protocol).
- :class:`Tran1Head`: one transformer block (timm's ``Block``) over the grid's tokens, then the
  linear head.

Training them lives in :mod:`heatssl.probing`; the online probe of pretraining uses the linear head.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from heatssl.errors import ArgumentError


class LinearHead(nn.Module):
    """BatchNorm1d without affine (feature standardisation), then Linear: MAE's linear probe."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(in_dim, affine=False, eps=1e-6)
        self.fc = nn.Linear(in_dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, pooled: Tensor) -> Tensor:
        """Logits (N, C) from pooled features (N, d)."""
        return self.fc(self.bn(pooled))

    def folded(self) -> tuple[Tensor, Tensor]:
        """Weight (C, d) and bias (C,) of the equivalent single Linear (eval-mode BN folded in).

        ``logits = W' x + b'`` for pooled features x; with average pooling, ``W'`` applied at every
        grid cell gives the class activation map whose spatial mean is the logit minus ``b'``.
        """
        scale = torch.rsqrt(self.bn.running_var + self.bn.eps)
        weight = self.fc.weight * scale
        bias = self.fc.bias - weight @ self.bn.running_mean
        return weight, bias


class Tran1Head(nn.Module):
    """One transformer block over the (h x w) grid tokens, mean-pooled, then a :class:`LinearHead`."""

    chunk = 32  # images through the block at a time

    def __init__(self, in_dim: int, num_classes: int, tokens: int, heads: int = 0) -> None:
        super().__init__()
        heads = heads or max(1, in_dim // 64)
        if in_dim % heads:
            raise ArgumentError(
                f"heads={heads} must divide the feature width {in_dim} (0 picks d / 64)."
            )
        self.pos = nn.Parameter(torch.zeros(1, tokens, in_dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.block = Block(in_dim, num_heads=heads, mlp_ratio=4.0, qkv_bias=True)
        self.norm = nn.LayerNorm(in_dim)
        self.head = LinearHead(in_dim, num_classes)

    def no_weight_decay(self) -> set[str]:
        """The token positions (like a ViT's ``pos_embed``); norms and biases are 1-D, left out too."""
        return {"pos"}

    def forward(self, grid: Tensor) -> Tensor:
        """Logits (N, C) from feature grids (N, d, h, w).

        The block sees each image on its own, so it runs over ``chunk`` images at a time, and in
        training recomputes their activations in the backward pass: the same numbers as one pass
        over the batch, without a batch of wide grids' activations (hundreds of MB) held at once.
        Only the head's BatchNorm needs the whole batch.
        """
        tokens = grid.flatten(2).transpose(1, 2) + self.pos
        recompute = self.training and torch.is_grad_enabled()
        parts = [
            checkpoint(self.block, part, use_reentrant=False) if recompute else self.block(part)
            for part in tokens.split(self.chunk)
        ]
        return self.head(self.norm(torch.cat(parts)).mean(dim=1))
