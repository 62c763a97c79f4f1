"""Fine-tuning reports: the metrics table and the confusion-matrix picture."""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure
from torch import Tensor

from heatssl.runs.markdown import markdown_table


def finetune_markdown(metrics: dict[str, Any]) -> str:
    """Title, the best and last epoch, then top-1 / top-5 of every epoch."""
    ema = metrics["reported"].startswith("ema_")
    header = ["epoch", "top-1", "top-5", *(["EMA top-1", "EMA top-5"] if ema else [])]
    rows = []
    for row in metrics["epochs"]:
        cells = [int(row["epoch"]), f"{row['top1']:.2f}", f"{row['top5']:.2f}"]
        if ema:
            cells += [f"{row['ema_top1']:.2f}", f"{row['ema_top5']:.2f}"]
        rows.append(cells)
    best, key = metrics["best"], metrics["reported"]
    lines = [
        f"### fine-tuned {metrics['backbone']} from {metrics['source']}",
        "",
        f"{metrics['train_images']} labelled training images (label_fraction "
        f"{metrics['label_fraction']:g}), {metrics['val_images']} val images, "
        f"{metrics['recipe']['recipe']} recipe, {metrics['seconds'] / 60:.1f} min.",
        "",
    ]
    if best is not None:
        lines += [
            f"**best val top-1 {best[key]:.2f}** (epoch {int(best['epoch'])}); last epoch "
            f"{metrics['final'][key]:.2f}.",
            "",
        ]
    return "\n".join(lines) + markdown_table(header, rows) + "\n"


def confusion_figure(confusion: Tensor, class_names: list[str], title: str) -> Figure:
    """Row-normalised confusion matrix (true class per row), counts written in the cells."""
    counts = confusion.float()
    rates = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    k = len(class_names)
    size = min(14.0, 2.5 + 0.55 * k)
    fig = Figure(figsize=(size, size * 0.9), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    if k <= 30:
        ax.set_xticks(range(k), class_names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(k), class_names, fontsize=8)
        for i in range(k):
            for j in range(k):
                n = int(counts[i, j])
                if n:
                    color = "white" if rates[i, j] > 0.5 else "black"
                    ax.text(j, i, str(n), ha="center", va="center", fontsize=7, color=color)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    return fig
