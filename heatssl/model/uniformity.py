"""A uniformity term on the pooled features a kNN probe compares (``loss.uniform_weight``).

Wang and Isola (2020) split what a contrastive loss asks of normalised features into alignment
(views of one image close) and uniformity (all images spread over the sphere), and wrote the second
as ``log E[exp(-t ||u - v||^2)]`` over pairs of different images in the batch. QB-Heat's global term
(pooled quarter -> the EMA teacher's pooled image, ``1 - cos``) is an alignment term; this module is
the other half, so that the cosine neighbourhoods a kNN probe reads are spread the way SimCLR's are,
without a second encoder pass: it costs one N x N matrix of the batch's pooled features. It sees the
batch of one process (no gather under DDP, like LightlySSL's losses by default). Pure torch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from heatssl.errors import ArgumentError


class UniformityLoss(nn.Module):
    """``log mean_{i != j} exp(-t ||u_i - u_j||^2)`` of the L2-normalised rows ``u`` of (N, d).

    Lower is more uniform: 0 when every row points the same way (collapse), about ``-2 t`` when
    the rows are spread like random directions in many dimensions, never below ``-4 t``.

    Args:
        t: The Gaussian potential's scale (Wang and Isola's ``t = 2``).
    """

    def __init__(self, t: float = 2.0) -> None:
        super().__init__()
        if not t > 0:
            raise ArgumentError(
                f"t={t!r} must be > 0: the scale of the Gaussian potential. Fix: t=2.0 "
                f"(Wang and Isola's value)."
            )
        self.t = t

    def forward(self, features: Tensor) -> Tensor:
        """The uniformity of a batch of feature vectors (N, d); 0 for a batch of one."""
        if features.ndim != 2:
            raise ArgumentError(
                f"features of shape {tuple(features.shape)}: expected (N, d), one pooled vector "
                f"per image. Fix: pool the grid first, e.g. grid.mean(dim=(-2, -1))."
            )
        n = features.shape[0]
        if n < 2:
            return features.sum() * 0.0  # no pair to spread; keeps the graph for DDP
        u = F.normalize(features.float(), dim=1, eps=1e-6)
        # ||u_i - u_j||^2 = 2 - 2 cos for unit rows, in float32 under bf16 autocast too; pairs i < j
        with torch.autocast(u.device.type, enabled=False):
            sq = (2.0 - 2.0 * (u @ u.T)).clamp_min(0.0)
        i, j = torch.triu_indices(n, n, offset=1, device=u.device)
        pairs = sq[i, j]
        return torch.logsumexp(-self.t * pairs, dim=0) - math.log(pairs.numel())
