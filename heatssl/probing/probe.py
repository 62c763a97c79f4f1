"""``heatssl probe``: a frozen backbone from any source, its features cached once, the probes trained,
and heads, metrics JSON and a markdown table written into an output folder.

A probe folder holds ``metrics.json``, ``metrics.md``, the trained heads (``<kind>_head.safetensors``),
``embedding.png`` (t-SNE map of the val features, ``probe.embedding``) and the resolved ``config.yaml``;
with ``data.label_fraction < 1`` the probes train on that class-balanced share of the train split
only (val stays whole), listed in ``label_subset.json``.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import warnings
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from heatssl.config import Config, config_keys, save_config
from heatssl.data.datamodule import build_datamodule, images_in
from heatssl.errors import HeatSSLWarning
from heatssl.probing.embedding import write_embedding
from heatssl.probing.features import FeatureCache, build_cache, subset_rows
from heatssl.probing.plan import grid_folder, plan_probe
from heatssl.probing.probes import run_probes
from heatssl.probing.report import metrics_markdown
from heatssl.runs.head_files import save_head
from heatssl.runs.layout import default_out_dir
from heatssl.runs.sources import resolve_backbone
from heatssl.writing import write_text


@dataclass
class ProbeResult:
    """Where a probe run wrote its files, and its metrics."""

    out_dir: Path
    metrics: dict[str, Any]
    cache: FeatureCache


def _embedding(cache: FeatureCache, cfg: Config, out: Path, backbone: str) -> dict[str, Any]:
    """Draw ``<out>/embedding.png`` when ``probe.embedding``; its metrics.json entries."""
    if not cfg.probe.embedding:
        return {"embedding": None}
    start = time.perf_counter()
    drawn = write_embedding(
        cache.val.pooled,
        cache.val.labels,
        cache.class_names,
        out / "embedding.png",
        seed=cfg.seed,
        max_points=cfg.probe.embedding_max_points,
        backbone=backbone,
    )
    if drawn.path is None:
        warnings.warn(drawn.skipped, HeatSSLWarning, stacklevel=3)
        return {"embedding": None, "embedding_skipped": drawn.skipped}
    return {"embedding": drawn.path.name, "embedding_seconds": time.perf_counter() - start}


def probe(
    source: str,
    cfg: Config,
    out_dir: str | Path | None = None,
    named: Collection[str] = (),
    title: str | None = None,
) -> ProbeResult:
    """Probe the backbone ``source`` on ``cfg.data`` with ``cfg.probe``; write the output folder.

    The cost is printed first (:mod:`heatssl.probing.plan`). tran-1's grids (of its
    ``probe.tran1_max_images`` subset) are written to a fresh folder in ``probe.grid_dir`` (default:
    the output folder) during the run and removed at its end.
    """
    out = (
        Path(out_dir)
        if out_dir is not None
        else default_out_dir(source, "probe", cfg.probe.out_dir)
    )
    torch.manual_seed(cfg.seed)
    backbone = resolve_backbone(source, cfg, named=named)
    # data.label_fraction < 1: only the labelled subset's features are extracted and trained on
    data = build_datamodule(cfg.data, seed=cfg.seed, labelled=True, label_dir=out, index_dir=out)
    batch = max(cfg.data.batch_size, 128)
    train_loader = data.feature_dataloader("train", batch)
    val_loader = data.feature_dataloader("val", batch)
    n_train, n_val = images_in(data.train_dataset), images_in(data.val_dataset)
    tran1 = "tran1" in cfg.probe.kinds
    grid_rows = subset_rows(n_train, cfg.probe.tran1_max_images) if tran1 else None
    grids = grid_folder(cfg.probe.grid_dir, out) if tran1 else None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        with config_keys(heads="probe.tran1_heads"):
            plan = plan_probe(
                backbone,
                cfg.probe,
                cfg.data.image_size,
                batch,
                n_train,
                n_val,
                len(data.class_names),
                n_train if grid_rows is None else len(grid_rows),
                grids,
                device,
            )
        print(f"heatssl: {plan.line()}", file=sys.stderr, flush=True)
        cache = build_cache(
            backbone,
            train_loader,
            val_loader,
            data.class_names,
            device,
            grid_dir=grids,
            train_grid_rows=grid_rows,
        )
        # the heads' initial weights from the seed alone, whatever building the backbone drew
        torch.manual_seed(cfg.seed)
        try:
            metrics, heads = run_probes(cache, cfg.probe)
        finally:
            cache.delete_grids()
    finally:
        if grids is not None:
            shutil.rmtree(grids, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    for kind, head in heads.items():
        save_head(
            head,
            out / f"{kind}_head.safetensors",
            cache.class_names,
            backbone=backbone.name,
            source=str(source),
            stage=backbone.stage,
            output_stride=backbone.create_kwargs.get("output_stride"),
        )
    report = {
        "source": str(source),
        "backbone": backbone.name,
        "dataset": cfg.data.name,
        "image_size": cfg.data.image_size,
        "train_images": len(cache.train),
        "val_images": len(cache.val),
        "label_fraction": cfg.data.label_fraction,
        "labelled_images": images_in(data.train_dataset),
        "output_stride": backbone.create_kwargs.get("output_stride"),
        "feature_grid": list(cache.train.grid_shape),
        "extract_seconds": cache.seconds,
        "probes": metrics,
        **_embedding(cache, cfg, out, backbone.name),
    }
    write_text(out / "metrics.json", json.dumps(report, indent=2))
    heading = title or f"{backbone.name} ({source}) on {cfg.data.name}"
    if cfg.data.label_fraction < 1.0:
        heading += (
            f", data.label_fraction={cfg.data.label_fraction:g} "
            f"({images_in(data.train_dataset)} labelled images)"
        )
    table = metrics_markdown(metrics, heading)
    write_text(out / "metrics.md", table)
    return ProbeResult(out, report, cache)
