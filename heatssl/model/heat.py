"""The physics: first-order heat operators, their step rules and the quarter-block extrapolation.

Pure torch (no Lightning, no I/O), so any SSL codebase can use these modules alone.

The steady-state heat equation on a feature map ``z(x, y)`` in R^d is simplified (docs/method.md) to
two first-order linear equations, one per axis::

    dz/dx = A z,    dz/dy = B z

with learned d x d matrices A and B shared by all positions and images. On the feature grid (step one
cell) this gives ``z(x+1, y) = z + A z`` and ``z(x, y+1) = z + B z``; stepping towards -x or -y uses
``z - A z`` and ``z - B z``.

Example:
    >>> import torch
    >>> from heatssl import HeatLoss, HeatPredictor
    >>> predictor = HeatPredictor(dim=64)
    >>> block = torch.randn(8, 64, 4, 4)          # encoder features of the kept quarter
    >>> full = predictor(block, quadrant=0)       # (8, 64, 8, 8): the whole grid
    >>> loss = HeatLoss(operators=predictor.operators)(block)   # residual on the encoder's own grid
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import build_sincos2d_pos_embed
from torch import Tensor, nn

from heatssl.errors import check_choice
from heatssl.model.quadrants import flip_where, place_block, quadrant_ids

StepRule = Literal["euler", "normalized"]
"""``euler``: ``z + A z``; ``normalized``: ``z + s A norm(z)`` (FINOLA-style, ``s`` the image's
feature scale, so that rescaling the features rescales the steps, as with ``euler``)."""
InitRule = Literal["zeros", "random"]
"""Initial A and B: ``zeros`` (pure copy outwards) or ``random`` (small Gaussian)."""
PredictorKind = Literal["heat", "copy", "mask_token"]
"""How the masked quadrants' features are predicted: learned heat operators, A = B = 0 frozen
(copy outwards), or one learned [MASK] feature (MAE-style baseline)."""


def channel_standardize(z: Tensor, eps: float = 1e-5) -> Tensor:
    """Standardise every feature vector over its channels (dim 1): FINOLA's normalisation.

    One fused ``layer_norm`` (no affine) over the channels moved last: the same numbers as
    ``(z - mean) / sqrt(var + eps)`` in one kernel instead of five.
    """
    return F.layer_norm(z.movedim(1, -1), (z.shape[1],), eps=eps).movedim(-1, 1)


def feature_scale(z: Tensor, eps: float = 1e-8) -> Tensor:
    """Each image's feature scale: the RMS of its map centred over positions, shape (N, 1, ..., 1).

    Centred, so a constant added to a channel (a norm layer's bias) does not count as scale.
    ``z`` is (N, d, ...) with positions after the channels.
    """
    dims = tuple(range(2, z.ndim))
    centred = z - z.mean(dim=dims, keepdim=True) if dims else z
    return centred.pow(2).mean(dim=tuple(range(1, z.ndim)), keepdim=True).add(eps).sqrt()


def commutator_penalty(a: Tensor, b: Tensor, probes: int = 0) -> Tensor:
    """``||AB - BA||_F^2``: the two first-order equations are only consistent when A and B commute.

    With ``probes > 0`` it returns the unbiased Hutchinson estimate ``mean_k ||(AB - BA) v_k||^2``
    over Gaussian probes ``v_k`` (unit variance, so ``E||M v||^2 = ||M||_F^2``): O(d^2 k) instead of
    two O(d^3) products, which matters for d = 512+ on a CPU. ``probes=0`` computes it exactly.
    """
    if probes <= 0:
        return (a @ b - b @ a).pow(2).sum()
    v = torch.randn(a.shape[1], probes, device=a.device, dtype=a.dtype)
    mv = a @ (b @ v) - b @ (a @ v)
    return mv.pow(2).sum() / probes


class HeatOperators(nn.Module):
    """The learned matrices A (x axis) and B (y axis) and the step rule that applies them.

    Args:
        dim: Feature dimension d.
        step: ``normalized`` (default, the rule every recipe uses, chosen by the ablation):
            ``z + s A norm(z)`` (FINOLA-style, norm = per-vector standardisation over channels,
            ``s`` = the image's :func:`feature_scale`); ``euler``: ``z + A z``.
        init: ``zeros`` (pure copy outwards at the start) or ``random`` (small Gaussian).
        trainable: False freezes A and B (with ``init="zeros"`` this is plain copying outward).
    """

    def __init__(
        self,
        dim: int,
        step: StepRule = "normalized",
        init: InitRule = "zeros",
        trainable: bool = True,
    ) -> None:
        super().__init__()
        check_choice("step", step, StepRule)
        check_choice("init", init, InitRule)
        self.dim, self.step_rule = dim, step
        std = 0.05 / dim**0.5 if init == "random" else 0.0
        self.A = nn.Parameter(torch.randn(dim, dim) * std, requires_grad=trainable)
        self.B = nn.Parameter(torch.randn(dim, dim) * std, requires_grad=trainable)

    def velocity(self, z: Tensor, axis: Literal["x", "y"], scale: Tensor | None = None) -> Tensor:
        """The derivative the equations predict along ``axis`` at ``z`` (channels on dim 1).

        ``normalized`` multiplies ``A norm(z)`` by ``scale`` (N, 1, ...: the image's feature scale;
        computed from ``z`` when not given), so both rules are homogeneous: ``velocity(c z) =
        c velocity(z)``, and the heat loss cannot be won by growing or shrinking the features.
        """
        mat = self.A if axis == "x" else self.B
        f = z
        if self.step_rule == "normalized":
            f = channel_standardize(z) * (feature_scale(z) if scale is None else scale)
        return torch.einsum("ij,nj...->ni...", mat.to(f.dtype), f)

    def commutator(self, probes: int = 0) -> Tensor:
        """``||AB - BA||_F^2`` of the current operators (estimated with ``probes`` > 0)."""
        return commutator_penalty(self.A, self.B, probes)


class HeatPredictor(nn.Module):
    """Extrapolate a quarter-block feature grid (N, d, h, w) to the whole grid (N, d, 2h, 2w).

    The kept block stays as it is. First each of its rows is continued along x for w cells (towards
    the masked side), then every column of the now full-width half is continued along y for h cells.
    k cells away is k repeated steps (k small matrix products), never a matrix power, so the cost is
    small and autograd sees a plain chain.

    Args:
        dim: Feature dimension d.
        step: Step rule, see :class:`HeatOperators`.
        init: Initial A and B, see :class:`HeatOperators`.
        trainable: False keeps A and B fixed.
    """

    def __init__(
        self,
        dim: int,
        step: StepRule = "normalized",
        init: InitRule = "zeros",
        trainable: bool = True,
    ) -> None:
        super().__init__()
        self.operators = HeatOperators(dim, step=step, init=init, trainable=trainable)

    def forward(
        self, block: Tensor, quadrant: int | str | Tensor = 0, check: bool = True
    ) -> Tensor:
        """Return the full grid; ``quadrant`` says where each sample's block sits (id, name or (N,)).

        ``check=False``: ``quadrant`` holds valid ids already (no host read of its values).
        """
        n, _, h, w = block.shape
        q = quadrant_ids(quadrant, n, block.device, check)
        flip_x, flip_y = q % 2 == 1, q >= 2
        # Flip each sample so its block is the top-left one; a flipped axis steps with -A (or -B).
        z = flip_where(flip_where(block, flip_x, -1), flip_y, -2)
        sign_x = (1.0 - 2.0 * flip_x.to(block.dtype)).view(n, 1, 1)
        sign_y = (1.0 - 2.0 * flip_y.to(block.dtype)).view(n, 1, 1)
        ops = self.operators
        # One scale per image, from its kept block, held through every step (normalized rule).
        scale = feature_scale(block).view(n, 1, 1) if ops.step_rule == "normalized" else None
        column, new_columns = z[..., -1], []
        for _ in range(w):
            column = column + sign_x * ops.velocity(column, "x", scale)
            new_columns.append(column)
        top = torch.cat([z, torch.stack(new_columns, dim=-1)], dim=-1)
        row, new_rows = top[..., -1, :], []
        for _ in range(h):
            row = row + sign_y * ops.velocity(row, "y", scale)
            new_rows.append(row)
        full = torch.cat([top, torch.stack(new_rows, dim=-2)], dim=-2)
        return flip_where(flip_where(full, flip_y, -2), flip_x, -1)

    def commutator(self, probes: int = 0) -> Tensor:
        """``||AB - BA||_F^2``, see :func:`commutator_penalty`."""
        return self.operators.commutator(probes)


class MaskTokenPredictor(nn.Module):
    """Baseline (MAE-style): a learned [MASK] feature plus each cell's position fills the masked
    quadrants.

    The positions are MAE's fixed 2-D sin-cos embedding of the full grid (timm's
    ``build_sincos2d_pos_embed``), so masked cells can be told apart on any grid size, as MAE's
    decoder tells its mask tokens apart. It has no A and B: its heat loss brings its own.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.mask_token, std=0.02)

    def positions(self, h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Sin-cos positions of an (h, w) grid as (1, d, h, w)."""
        d = self.mask_token.shape[0]
        table = build_sincos2d_pos_embed([h, w], dim=-(-d // 4) * 4, device=device)
        return table[:, :d].T.reshape(1, d, h, w).to(dtype)

    def forward(
        self, block: Tensor, quadrant: int | str | Tensor = 0, check: bool = True
    ) -> Tensor:
        """Return (N, d, 2h, 2w): the block in its quadrant, [MASK] + position elsewhere."""
        n, d, h, w = block.shape
        q = quadrant_ids(quadrant, n, block.device, check)
        fill = self.mask_token.to(block.dtype).view(1, d, 1, 1) + self.positions(
            2 * h, 2 * w, block.device, block.dtype
        )
        return place_block(block, q, fill.expand(n, d, 2 * h, 2 * w))


def build_predictor(
    kind: PredictorKind, dim: int, step: StepRule = "normalized", init: InitRule = "zeros"
) -> nn.Module:
    """The predictor of the masked quadrants: ``heat``, ``copy`` (A = B = 0, frozen) or ``mask_token``."""
    check_choice("predictor", kind, PredictorKind)
    if kind == "mask_token":
        return MaskTokenPredictor(dim)
    if kind == "copy":
        return HeatPredictor(dim, step=step, init="zeros", trainable=False)
    return HeatPredictor(dim, step=step, init=init)
