"""A 2-D map of the val features, coloured by class: t-SNE of the pooled features of a probe run.

The picture one looks at first: do the classes of the frozen features form separate islands? The
pooled val features are subsampled class-balanced (seeded) to at most ``max_points`` (t-SNE's cost
grows with the points), standardised, reduced to at most 50 dimensions with PCA (the usual practice
before t-SNE) and embedded with scikit-learn's t-SNE (PCA initialisation, fixed seed). The scatter is
drawn with matplotlib's object API on its own canvas (:mod:`heatssl.runs.figures`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps

from heatssl.errors import ArgumentError
from heatssl.runs.figures import new_figure, save_figure

MIN_POINTS = 5  # fewer and t-SNE has nothing to show (and its perplexity would be below 1)
PCA_DIMS = 50
LEGEND_MAX = 40  # more classes than this: no legend (it would cover the figure)
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")  # beyond 20 classes colours repeat, markers not


@dataclass
class EmbeddingMap:
    """The written picture (``path``, None when skipped, then ``skipped`` says why) and its data."""

    path: Path | None
    skipped: str | None = None
    coords: np.ndarray | None = None  # (n, 2) t-SNE coordinates of the drawn points
    labels: np.ndarray | None = None  # (n,) their labels
    indices: np.ndarray | None = None  # (n,) their rows in the features given


def _numpy(x: Any, dtype: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.float() if x.is_floating_point() else x
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def balanced_subsample(labels: Any, max_points: int, seed: int = 0) -> np.ndarray:
    """Sorted row indices of at most ``max_points`` rows, as even over the classes as they allow.

    Each class is shuffled (seeded); rows are taken by rank within their class, so every class gives
    its first row before any gives its second, and a class with few rows leaves its share to the
    others. The same labels, ``max_points`` and ``seed`` give the same rows.
    """
    if max_points < 1:
        raise ArgumentError(f"max_points={max_points} must be positive.")
    labels = _numpy(labels, np.int64).reshape(-1)
    if len(labels) <= max_points:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    rank = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        rank[rng.permutation(rows)] = np.arange(len(rows))
    tie = rng.permutation(len(labels))  # which classes fill the last, partial rank
    order = np.lexsort((tie, rank))
    return np.sort(order[:max_points])


def tsne_coords(features: Any, seed: int = 0) -> np.ndarray:
    """(n, 2) t-SNE coordinates of (n, d) features: standardised, PCA to <= 50 dims, then t-SNE."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits  # (a scikit-learn dependency)

    x = _numpy(features, np.float64)
    n = x.shape[0]
    x = StandardScaler().fit_transform(x)
    dims = min(PCA_DIMS, n, x.shape[1])
    if dims < x.shape[1]:
        x = PCA(n_components=dims, random_state=seed).fit_transform(x)
    perplexity = min(30.0, (n - 1) / 3)
    tsne = TSNE(2, perplexity=perplexity, init="pca", random_state=seed)
    # one OpenMP thread: t-SNE's busy-waiting threads slow 3-10x on a loaded machine (measured on
    # 2 cores: 2000 points 11-16 s on one thread, 40 s on two), and the map is a side product
    with threadpool_limits(limits=1, user_api="openmp"):
        return tsne.fit_transform(x.astype(np.float32))


def _skip_reason(x: np.ndarray, labels: np.ndarray) -> str | None:
    if len(x) < MIN_POINTS:
        return f"only {len(x)} val point(s): a 2-D map needs at least {MIN_POINTS}"
    classes = len(np.unique(labels))
    if classes < 2:
        return f"the val features hold {classes} class: a map coloured by class needs two"
    if float(np.ptp(x, axis=0).max()) == 0.0:
        return "every val feature vector is the same: nothing to map"
    return None


def embedding_figure(coords: np.ndarray, labels: np.ndarray, class_names: list[str], title: str):
    """The scatter of ``coords`` coloured by class, with a legend of class names (up to 40)."""
    present = [int(c) for c in np.unique(labels)]
    many = len(present) > 8
    fig = new_figure(9.5 if many else 7.0, 6.0)
    ax = fig.add_subplot()
    colours = colormaps["tab20" if len(present) > 10 else "tab10"]
    size = float(np.clip(6000 / len(coords), 6, 30))
    for i, c in enumerate(present):
        name = class_names[c] if 0 <= c < len(class_names) else str(c)
        at = labels == c
        ax.scatter(
            coords[at, 0],
            coords[at, 1],
            s=size,
            color=colours(i % colours.N),
            marker=_MARKERS[(i // colours.N) % len(_MARKERS)],
            alpha=0.8,
            linewidths=0,
            label=name,
        )
    ax.set_xticks([])
    ax.set_yticks([])
    if len(present) > LEGEND_MAX:
        title += f"\n{len(present)} classes: no legend"
    elif many:
        columns = 1 if len(present) <= 20 else 2
        ax.legend(
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            fontsize=8,
            ncol=columns,
            markerscale=max(1.0, 30 / size) ** 0.5,
            frameon=False,
        )
    else:
        ax.legend(loc="best", fontsize=8, markerscale=max(1.0, 30 / size) ** 0.5)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def write_embedding(
    features: Any,
    labels: Any,
    class_names: list[str],
    path: str | Path,
    seed: int = 0,
    max_points: int = 2000,
    backbone: str = "",
) -> EmbeddingMap:
    """Draw the t-SNE map of pooled ``features`` (N, d) coloured by ``labels`` (N,) to ``path``.

    At most ``max_points`` rows are drawn, chosen by :func:`balanced_subsample`. Fewer than 5 points,
    a single class or identical features skip the picture: the result has ``path=None`` and says why
    in ``skipped``. Non-finite features are refused with an :class:`~heatssl.errors.ArgumentError`.
    """
    x = _numpy(features, np.float64)
    y = _numpy(labels, np.int64).reshape(-1)
    if x.ndim != 2 or len(x) != len(y):
        raise ArgumentError(
            f"features of shape {tuple(x.shape)} and {len(y)} labels: the map needs (N, d) "
            f"features with one label per row."
        )
    bad = int((~np.isfinite(x)).any(axis=1).sum())
    if bad:
        raise ArgumentError(
            f"{bad} of {len(x)} feature vectors hold NaN or infinite values: the backbone's output "
            f"is not finite, so no t-SNE map can be drawn. Check the checkpoint (or set "
            f"probe.embedding=false to skip the map)."
        )
    total = len(y)
    keep = balanced_subsample(y, max_points, seed)
    x, y = x[keep], y[keep]
    reason = _skip_reason(x, y)
    if reason is not None:
        return EmbeddingMap(None, f"no embedding.png: {reason}.")
    coords = tsne_coords(x, seed)
    shown = f"{len(keep)} of {total} points" if len(keep) < total else f"{total} points"
    title = f"{backbone + ': ' if backbone else ''}t-SNE of val features (pooled), {shown}"
    fig = embedding_figure(coords, y, list(class_names), title)
    out = save_figure(fig, path, dpi=110)
    return EmbeddingMap(out, None, coords, y, keep)
