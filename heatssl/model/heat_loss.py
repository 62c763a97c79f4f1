"""The heat residual loss: how far a feature map is from solving ``dz/dx = A z``, ``dz/dy = B z``.

Pure torch; a plain ``nn.Module`` that any SSL code can add to its own loss, on any (N, d, h, w) map.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from heatssl.errors import ArgumentError
from heatssl.model.heat import HeatOperators, StepRule, feature_scale


def _world_size() -> int:
    """Processes in the default torch.distributed group (1 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class HeatLoss(nn.Module):
    """Scale-free residual of ``dz/dx = A z`` and ``dz/dy = B z`` on any feature map (N, d, h, w).

    ``L = (mean||dz_x - A z||^2 + mean||dz_y - B z||^2 + eps) / (mean||dz_x||^2 + mean||dz_y||^2 +
    mean||z - zbar||^2 + eps)``, where ``dz_x, dz_y`` are forward differences between neighbouring
    cells and ``zbar`` is each image's mean feature over its positions. Neither a rescale nor an
    added constant can win it: the ratio is unchanged when the features are multiplied by any
    number (both step rules are homogeneous, ``normalized`` being ``s A norm(z)`` with ``s`` the
    image's feature scale), and a constant per channel (a norm layer's bias) changes neither the
    differences nor the centred denominator. A spatially constant map scores 1, the worst, not 0.

    Args:
        dim: Feature dimension; creates its own operators when ``operators`` is not given.
        operators: Share A and B with a :class:`~heatssl.model.heat.HeatPredictor`
            (``predictor.operators``).
        step: Step rule for operators it creates (default ``normalized``, the recipes' rule).
        eps: Added to the numerator and the denominator (a constant map scores 1).
        sync_distributed: In training mode under torch.distributed (DDP), average the numerator
            and the denominator over all processes before dividing, so the ratio is the one of the
            global batch and the gradients match a single process with that batch. Every process
            must then call the loss at the same steps, as DDP training does.

    Example:
        >>> loss_fn = HeatLoss(dim=256)
        >>> loss = loss_fn(torch.randn(4, 256, 7, 7))  # add ``weight * loss`` to any SSL loss
    """

    def __init__(
        self,
        dim: int | None = None,
        operators: HeatOperators | None = None,
        step: StepRule = "normalized",
        eps: float = 1e-8,
        sync_distributed: bool = True,
    ) -> None:
        super().__init__()
        if operators is None:
            if dim is None:
                raise ArgumentError(
                    "dim=None and operators=None: HeatLoss needs either dim (its own operators) "
                    "or operators (shared with a HeatPredictor)."
                )
            operators = HeatOperators(dim, step=step)
        self.operators, self.eps = operators, eps
        self.sync_distributed = sync_distributed

    def forward(self, z: Tensor) -> Tensor:
        """Return the scalar residual loss of feature map ``z`` (N, d, h, w), h and w >= 2."""
        if z.ndim != 4 or z.shape[-1] < 2 or z.shape[-2] < 2:
            raise ArgumentError(
                f"HeatLoss needs an (N, d, h, w) feature map with h, w >= 2 (neighbours on both "
                f"axes), got shape {tuple(z.shape)}. Use a larger image, an earlier stage or a "
                f"smaller output_stride."
            )
        z = z.float()
        centred = z - z.mean(dim=(-2, -1), keepdim=True)
        ops = self.operators
        scale = feature_scale(z) if ops.step_rule == "normalized" else None
        dx = z[..., :, 1:] - z[..., :, :-1]
        dy = z[..., 1:, :] - z[..., :-1, :]
        rx = dx - ops.velocity(z[..., :, :-1], "x", scale)
        ry = dy - ops.velocity(z[..., :-1, :], "y", scale)

        def msq(t: Tensor) -> Tensor:
            return t.pow(2).sum(dim=1).mean()

        parts = torch.stack([msq(rx) + msq(ry), msq(dx) + msq(dy) + msq(centred)])
        world = _world_size()
        if self.sync_distributed and self.training and world > 1:
            # A differentiable gather (a functional collective: torch.compile keeps it in the
            # graph): its backward sums every process's gradient, and DDP's averaging then gives
            # exactly the single-process gradient of the global ratio.
            from torch.distributed._functional_collectives import all_gather_tensor_autograd

            gathered = all_gather_tensor_autograd(parts, gather_dim=0, group=dist.group.WORLD)
            parts = gathered.view(world, 2).mean(dim=0)
        return (parts[0] + self.eps) / (parts[1] + self.eps)
