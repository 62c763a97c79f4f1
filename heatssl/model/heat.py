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
from torch import Tensor, nn

from heatssl.errors import check_choice
from heatssl.model.quadrants import flip_where, place_block, quadrant_ids

StepRule = Literal["euler", "normalized"]
"""``euler``: ``z + A z``; ``normalized``: ``z + A norm(z)`` (FINOLA-style)."""
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
        step: ``euler``: ``z + A z``; ``normalized``: ``z + A norm(z)`` (FINOLA-style, norm =
            per-vector standardisation over channels).
        init: ``zeros`` (pure copy outwards at the start) or ``random`` (small Gaussian).
        trainable: False freezes A and B (with ``init="zeros"`` this is plain copying outward).
    """

    def __init__(
        self, dim: int, step: StepRule = "euler", init: InitRule = "zeros", trainable: bool = True
    ) -> None:
        super().__init__()
        check_choice("step", step, StepRule)
        check_choice("init", init, InitRule)
        self.dim, self.step_rule = dim, step
        std = 0.05 / dim**0.5 if init == "random" else 0.0
        self.A = nn.Parameter(torch.randn(dim, dim) * std, requires_grad=trainable)
        self.B = nn.Parameter(torch.randn(dim, dim) * std, requires_grad=trainable)

    def velocity(self, z: Tensor, axis: Literal["x", "y"]) -> Tensor:
        """The derivative the equations predict along ``axis`` at ``z`` (channels on dim 1)."""
        mat = self.A if axis == "x" else self.B
        f = channel_standardize(z) if self.step_rule == "normalized" else z
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
        self, dim: int, step: StepRule = "euler", init: InitRule = "zeros", trainable: bool = True
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
        column, new_columns = z[..., -1], []
        for _ in range(w):
            column = column + sign_x * ops.velocity(column, "x")
            new_columns.append(column)
        top = torch.cat([z, torch.stack(new_columns, dim=-1)], dim=-1)
        row, new_rows = top[..., -1, :], []
        for _ in range(h):
            row = row + sign_y * ops.velocity(row, "y")
            new_rows.append(row)
        full = torch.cat([top, torch.stack(new_rows, dim=-2)], dim=-2)
        return flip_where(flip_where(full, flip_y, -2), flip_x, -1)

    def commutator(self, probes: int = 0) -> Tensor:
        """``||AB - BA||_F^2``, see :func:`commutator_penalty`."""
        return self.operators.commutator(probes)


class MaskTokenPredictor(nn.Module):
    """Baseline (MAE-style): one learned [MASK] feature fills the three masked quadrants.

    Used by the ablation against the heat predictor; it has no A and B, so no heat loss.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(
        self, block: Tensor, quadrant: int | str | Tensor = 0, check: bool = True
    ) -> Tensor:
        """Return (N, d, 2h, 2w): the block in its quadrant and the [MASK] feature elsewhere."""
        n, d, h, w = block.shape
        q = quadrant_ids(quadrant, n, block.device, check)
        fill = self.mask_token.to(block.dtype).view(1, d, 1, 1).expand(n, d, 2 * h, 2 * w)
        return place_block(block, q, fill)


def build_predictor(
    kind: PredictorKind, dim: int, step: StepRule = "euler", init: InitRule = "zeros"
) -> nn.Module:
    """The predictor of the masked quadrants: ``heat``, ``copy`` (A = B = 0, frozen) or ``mask_token``."""
    check_choice("predictor", kind, PredictorKind)
    if kind == "mask_token":
        return MaskTokenPredictor(dim)
    if kind == "copy":
        return HeatPredictor(dim, step=step, init="zeros", trainable=False)
    return HeatPredictor(dim, step=step, init=init)
