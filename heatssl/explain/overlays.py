"""Heat-map pictures people look at: one overlay per image, and a contact sheet per method."""

from __future__ import annotations

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from pytorch_grad_cam.utils.image import show_cam_on_image

from heatssl.runs.figures import new_figure


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
) -> Figure:
    """A contact sheet: each image with its map over it, a title per image, one colour bar."""
    n = len(originals)
    cols = min(cols, n)
    rows = (n + cols - 1) // cols
    fig = new_figure(2.6 * cols + 0.8, 2.8 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
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
