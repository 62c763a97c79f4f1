"""Figures every stage saves: on their own canvas, to PNG; and the QB-Heat reconstruction sheet.

Figures are built with matplotlib's object API on an Agg canvas of their own, so importing heatssl
never selects a backend or touches pyplot's global state. The reconstruction sheet (input / kept
quarter / reconstruction) is drawn by pretraining's pictures and by ``heatssl reconstruct``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from heatssl.data.transforms import denormalize, to_model_input
from heatssl.model.qbheat import QBHeat
from heatssl.writing import replace_file


def new_figure(width: float, height: float) -> Figure:
    """A figure of ``width`` x ``height`` inches on its own Agg canvas (no pyplot, no backend)."""
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Save ``fig`` as PNG, creating folders; whole or not at all, never through a link."""
    return replace_file(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))


def figure_to_tensor(fig: Figure) -> Tensor:
    """RGB uint8 tensor (3, H, W) of a rendered figure, for loggers that take images."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    rgba = torch.frombuffer(bytearray(canvas.buffer_rgba()), dtype=torch.uint8)
    w, h = canvas.get_width_height()
    return rgba.view(h, w, 4)[..., :3].permute(2, 0, 1).clone()


def _to_hwc(image: Tensor) -> Tensor:
    return image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu()


def reconstruction_figure(images: Tensor, mask: Tensor, recon: Tensor, title: str = "") -> Figure:
    """A figure with one column per image; rows: input, kept quarter (rest grey), reconstruction.

    Args:
        images: Input images in [0, 1], (N, 3, H, W).
        mask: 1 where masked, (N, 1, H, W).
        recon: Reconstructions in [0, 1], (N, 3, H, W).
        title: Figure title.
    """
    n = images.shape[0]
    fig = new_figure(1.3 * n + 0.9, 4.2)
    axes = fig.subplots(3, n, squeeze=False)
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


def reconstruction_images(qbheat: QBHeat, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Images in [0, 1], the masked-region mask and QB-Heat's reconstruction in [0, 1].

    ``images`` as a loader gives them (uint8) or normalised; quadrants cycle over the batch.
    """
    device = next(qbheat.parameters()).device
    x = to_model_input(images.to(device))
    mask, recon = qbheat.reconstruct(x)
    return denormalize(x.float()), mask, denormalize(recon)


def reconstruction_sheet(
    qbheat: QBHeat, images: Tensor, title: str, subtitle: str | None = None
) -> Figure:
    """The reconstruction figure of ``images``: ``title`` (what the row shows appended), then
    ``subtitle`` on a line of its own."""
    shown, mask, recon = reconstruction_images(qbheat, images)
    heading = f"{title} ({qbheat.reconstruction_note})" + (f"\n{subtitle}" if subtitle else "")
    return reconstruction_figure(shown, mask, recon, title=heading)
