"""Pictures people look at: QB-Heat reconstructions, heat-map overlays and contact sheets."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from pytorch_grad_cam.utils.image import show_cam_on_image
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


def resize_map(heat: np.ndarray, height: int, width: int) -> np.ndarray:
    """A (h, w) map resized bilinearly to (height, width)."""
    t = torch.from_numpy(np.ascontiguousarray(heat, dtype=np.float32))[None, None]
    out = torch.nn.functional.interpolate(t, size=(height, width), mode="bilinear")
    return out[0, 0].numpy()


def overlay(original: np.ndarray, heat: np.ndarray, weight: float = 0.5) -> np.ndarray:
    """uint8 RGB (H, W, 3): the heat map (jet colours) over the original at its own resolution."""
    h, w = original.shape[:2]
    return show_cam_on_image(original, resize_map(heat, h, w), use_rgb=True, image_weight=weight)


def heatmap_sheet(
    originals: list[np.ndarray], maps: np.ndarray, titles: list[str], method: str, cols: int = 4
) -> matplotlib.figure.Figure:
    """A contact sheet: each image with its map over it, a title per image, one colour bar."""
    n = len(originals)
    cols = min(cols, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols + 0.8, 2.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (original, heat, title) in enumerate(zip(originals, maps, titles, strict=True)):
        ax = axes.flat[i]
        h, w = original.shape[:2]
        ax.imshow(original)
        ax.imshow(resize_map(heat, h, w), cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
        ax.set_title(title, fontsize=8)
    mappable = matplotlib.cm.ScalarMappable(cmap="jet", norm=matplotlib.colors.Normalize(0, 1))
    fig.colorbar(mappable, ax=axes.ravel().tolist(), fraction=0.03, pad=0.02, label="relevance")
    fig.suptitle(f"heatssl heat maps: {method}", fontsize=10)
    return fig
