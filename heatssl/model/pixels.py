"""QB-Heat's pixel target and loss: MAE's per-patch standardised pixels and a masked squared error.

Pure torch, so the FLOP counter and the tests can call the same loss the objective does.
"""

from __future__ import annotations

from torch import Tensor


def patch_normalize(images: Tensor, patch: int, eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """Standardise every non-overlapping ``patch`` x ``patch`` cell over its pixels and channels.

    Returns the normalised images and the per-pixel mean and std (broadcast back to (N, C, H, W)), as
    MAE's norm_pix_loss does for its targets.
    """
    n, c, h, w = images.shape
    cells = images.reshape(n, c, h // patch, patch, w // patch, patch)
    mean = cells.mean(dim=(1, 3, 5), keepdim=True)
    std = (cells.var(dim=(1, 3, 5), keepdim=True, unbiased=False) + eps).sqrt()
    expand = (n, c, h // patch, patch, w // patch, patch)
    return (
        ((cells - mean) / std).reshape(n, c, h, w),
        mean.expand(expand).reshape(n, c, h, w),
        std.expand(expand).reshape(n, c, h, w),
    )


def reconstruction_loss(pred: Tensor, target: Tensor, weight: Tensor | None) -> Tensor:
    """Mean squared error over the pixels where ``weight`` (N, 1, H, W) is 1 (all when None)."""
    err = (pred.float() - target.float()).pow(2).mean(dim=1, keepdim=True)
    if weight is None:
        return err.mean()
    return (err * weight).sum() / weight.sum().clamp_min(1.0)
