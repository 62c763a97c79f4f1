"""Pictures people look at: the QB-Heat reconstruction sheet (input / kept quarter / reconstruction)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import Tensor


def _to_hwc(image: Tensor) -> Tensor:
    return image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu()


def reconstruction_figure(
    images: Tensor, mask: Tensor, recon: Tensor, title: str = ""
) -> matplotlib.figure.Figure:
    """A figure with one column per image; rows: input, kept quarter (rest grey), reconstruction.

    Args:
        images: Input images in [0, 1], (N, 3, H, W).
        mask: 1 where masked, (N, 1, H, W).
        recon: Reconstructions in [0, 1], (N, 3, H, W).
        title: Figure title.
    """
    n = images.shape[0]
    fig, axes = plt.subplots(3, n, figsize=(1.3 * n + 0.9, 4.2), squeeze=False)
    kept = images * (1 - mask) + 0.5 * mask
    for row, (batch, name) in enumerate(
        ((images, "input"), (kept, "kept quarter"), (recon, "reconstruction"))
    ):
        for i in range(n):
            ax = axes[row, i]
            ax.imshow(_to_hwc(batch[i]), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def save_figure(fig: matplotlib.figure.Figure, path: str | Path, dpi: int = 100) -> Path:
    """Save ``fig`` as PNG (creating folders) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def figure_to_tensor(fig: matplotlib.figure.Figure) -> Tensor:
    """RGB uint8 tensor (3, H, W) of a rendered figure, for loggers that take images."""
    fig.canvas.draw()
    rgba = torch.frombuffer(bytearray(fig.canvas.buffer_rgba()), dtype=torch.uint8)
    w, h = fig.canvas.get_width_height()
    return rgba.view(h, w, 4)[..., :3].permute(2, 0, 1).clone()
