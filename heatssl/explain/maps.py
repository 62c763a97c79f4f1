"""Heat-map and reconstruction runs: pick images, compute maps, write overlays, sheets and arrays.

A heat-map folder holds, per method, one overlay PNG per image at the image's own resolution,
``maps.npz`` with the raw arrays, and ``<method>_sheet.png`` (a contact sheet with true and predicted
classes and a colour bar).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from heatssl.config import Config
from heatssl.explain.cam import HeatmapResult, heatmaps
from heatssl.explain.inputs import dataset_images, image_files, load_images
from heatssl.explain.overlays import heatmap_sheet, overlay
from heatssl.runs.figures import reconstruction_sheet, save_figure
from heatssl.runs.head_files import load_head
from heatssl.runs.sources import qbheat_from_checkpoint, resolve_backbone
from heatssl.writing import make_folder, replace_file


@dataclass
class HeatmapRun:
    """What a heat-map run wrote, per method."""

    out_dir: Path
    sheets: dict[str, Path]
    results: dict[str, HeatmapResult]
    skipped: list[str]


def run_heatmaps(
    source: str,
    head_path: str | Path,
    cfg: Config,
    out_dir: str | Path,
    methods: list[str],
    images: str | None = None,
    split: str = "val",
    num: int = 16,
    target: str | None = None,
) -> HeatmapRun:
    """Heat maps of ``source`` + its linear head over an image folder or a dataset split."""
    head, info = load_head(head_path, kind="linear")
    class_names = list(info["class_names"])
    if cfg.probe.output_stride is None and info.get("output_stride") is not None:
        # the maps come from the backbone as it was probed (a head may be trained re-dilated)
        cfg = dataclasses.replace(
            cfg, probe=dataclasses.replace(cfg.probe, output_stride=info["output_stride"])
        )
    backbone = resolve_backbone(source, cfg).to("cuda" if torch.cuda.is_available() else "cpu")
    truths: list[str] | None = None
    if images is not None:
        loaded = load_images(image_files(images), cfg.data.image_size, cfg.data.max_image_pixels)
    else:
        loaded, truths, _ = dataset_images(cfg, split, num)
    out = Path(out_dir)
    sheets, results = {}, {}
    for method in methods:
        result = heatmaps(backbone, head, loaded.inputs, method, target, class_names)
        probs = torch.from_numpy(result.logits).softmax(dim=1)
        titles = []
        for i, name in enumerate(loaded.names):
            pred = int(probs[i].argmax())
            line = f"pred {class_names[pred]} ({100 * probs[i, pred]:.0f}%)"
            if truths is not None:
                line = f"true {truths[i]}\n{line}"
            if target is not None:
                line += f"\nmap for {target}"
            titles.append(f"{name}\n{line}")
        folder = make_folder(out / method.replace("+", "p"), inside=out)
        for name, original, heat in zip(loaded.names, loaded.originals, result.maps, strict=True):
            picture = Image.fromarray(overlay(original, heat))
            replace_file(folder / f"{name}.png", lambda tmp, p=picture: p.save(tmp, format="PNG"))
        arrays = dict(
            maps=result.maps,
            raw=result.raw if result.raw is not None else np.zeros(0),
            logits=result.logits,
            targets=result.targets,
            names=np.array(loaded.names),
            layer=np.array(result.layer),
        )
        replace_file(folder / "maps.npz", lambda tmp, a=arrays: np.savez_compressed(tmp, **a))
        shown = method if result.layer == "grid" else f"{method} on {result.layer}"
        fig = heatmap_sheet(loaded.originals, result.maps, titles, shown)
        sheets[method] = save_figure(fig, out / f"{method.replace('+', 'p')}_sheet.png")
        results[method] = result
    return HeatmapRun(out, sheets, results, loaded.skipped)


def run_reconstruction(checkpoint: str, out: str | Path, split: str = "val", num: int = 8) -> Path:
    """The QB-Heat reconstruction figure of a checkpoint on ``num`` images of its own data."""
    cfg, qbheat = qbheat_from_checkpoint(checkpoint)
    loaded, _, _ = dataset_images(cfg, split, num)
    sheet = reconstruction_sheet(qbheat, loaded.inputs, "QB-Heat reconstruction", str(checkpoint))
    return save_figure(sheet, out)
