"""Two kept quadrants of one image and an invariance term between their pooled grids.

``loss.pair_weight``: besides the quadrant QB-Heat extrapolates from, the student encodes a second,
different quadrant of the same image, and each quadrant's pooled grid, through a small MLP (the
predictor), predicts the other's pooled grid with gradients stopped (SimSiam's symmetric
``1 - cos`` loss, Chen and He 2021). Neighbouring quarters of one photo mostly show one object, so
the term asks the pooled features that a kNN probe compares to agree across the object's parts; it
needs no EMA teacher. Unlike SimSiam, the predictor has no BatchNorm and no bottleneck (Linear, GELU,
Linear at the grid's width) and there is no projector MLP: the pooled grid of the heat operators'
channels is the target itself. Pure torch: no Lightning, no files.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def other_quadrants(q: Tensor) -> Tensor:
    """One quadrant id per sample, drawn uniformly from the three that differ from ``q``."""
    shift = torch.randint(1, 4, q.shape, device=q.device, dtype=q.dtype)
    return (q + shift) % 4


class PairTerm(nn.Module):
    """SimSiam's symmetric invariance loss between the pooled grids of two views.

    Args:
        dim: Channels of the grids (the heat operators' channels).
        hidden: Hidden width of the predictor MLP (Linear, GELU, Linear); ``None``: ``dim``.
    """

    def __init__(self, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        width = hidden or dim
        self.predictor = nn.Sequential(nn.Linear(dim, width), nn.GELU(), nn.Linear(width, dim))

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """``1 - cos``, averaged over both directions and the batch, of each grid's (N, d, h, w)
        pooled prediction against the other's detached pool: 0 when they agree, at most 2."""
        pa, pb = a.float().mean(dim=(-2, -1)), b.float().mean(dim=(-2, -1))
        ab = F.cosine_similarity(self.predictor(pa), pb.detach(), dim=1, eps=1e-6)
        ba = F.cosine_similarity(self.predictor(pb), pa.detach(), dim=1, eps=1e-6)
        return 1.0 - 0.5 * (ab.mean() + ba.mean())
