"""Probe runs: resolve a backbone (checkpoint, exported file or bare timm name), cache its features
once, train the probes, and write heads, metrics JSON and a markdown table into an output folder.

A probe folder holds ``metrics.json``, ``metrics.md``, the trained heads (``<kind>_head.safetensors``),
``embedding.png`` (t-SNE map of the val features, ``probe.embedding``) and the resolved ``config.yaml``;
with ``data.label_fraction < 1`` the probes train on that class-balanced share of the train split
only (val stays whole), listed in ``label_subset.json``.
"""

from __future__ import annotations

import dataclasses
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

from heatssl.config import Config, config_keys, load_config, save_config
from heatssl.data.module import build_datamodule
from heatssl.errors import CheckpointError, ConfigError, HeatSSLWarning
from heatssl.model.backbone import Backbone, restride
from heatssl.model.export import load_exported_backbone, read_export_metadata
from heatssl.model.timm_folder import is_hub_source
from heatssl.probing.embedding import write_embedding
from heatssl.probing.features import FeatureCache, build_cache, subset_rows
from heatssl.probing.head_files import save_head
from heatssl.probing.plan import grid_folder, plan_probe
from heatssl.probing.probes import run_probes
from heatssl.probing.report import metrics_markdown
from heatssl.train.build import MODEL_KEYS, build_backbone
from heatssl.train.run import backbone_from_checkpoint, load_checkpoint_config


@dataclass
class ProbeResult:
    """Where a probe run wrote its files, and its metrics."""

    out_dir: Path
    metrics: dict[str, Any]
    cache: FeatureCache


def source_kind(source: str) -> str:
    """``checkpoint`` (.ckpt), ``export`` (.safetensors), ``hub`` (a timm folder: ``local-dir:PATH``
    or ``hf-hub:NAME``) or ``timm`` (a model name: random initialisation)."""
    if is_hub_source(source):
        folder = source.removeprefix("local-dir:")
        if source.startswith("local-dir:") and not (Path(folder) / "config.json").is_file():
            raise CheckpointError(
                f"{source}: {folder} is not a timm folder (no config.json in it). Give a folder "
                f"written by `heatssl export --format timm` (or timm's save_for_hf)."
            )
        return "hub"
    suffix = Path(source).suffix
    if suffix in (".ckpt", ".safetensors"):
        if not Path(source).is_file():
            raise CheckpointError(
                f"Backbone file {source} does not exist. Give a pretraining .ckpt, an exported "
                f".safetensors file, or a timm model name (random initialisation)."
            )
        return "checkpoint" if suffix == ".ckpt" else "export"
    return "timm"


def probe_config(source: str, config: str | None, overrides: list[str] | None) -> Config:
    """The config of a probe run: ``config`` if given, else the checkpoint's own, else defaults."""
    if config is not None:
        cfg_source: Any = config
    elif source_kind(source) == "checkpoint":
        cfg_source = load_checkpoint_config(source).to_dict()
    else:
        cfg_source = None
    return load_config(cfg_source, overrides)


def _check_named_model(cfg: Config, found: str, source: str, named: Collection[str]) -> None:
    if "backbone" in named and cfg.model.backbone != found:
        raise ConfigError(
            f"{source} holds a {found!r} backbone but the config names model.backbone="
            f"{cfg.model.backbone!r}. Drop the model.backbone setting or use a matching file."
        )


def _check_named_stride(cfg: Config, loaded: Backbone, source: str, named: Collection[str]) -> None:
    stride = loaded.create_kwargs.get("output_stride")
    if "output_stride" in named and cfg.model.output_stride != stride:
        raise ConfigError(
            f"model.output_stride={cfg.model.output_stride} cannot change {source}: a trained "
            f"backbone keeps the stride it was built with ({stride}). To evaluate it at another "
            f"stride set probe.output_stride={cfg.model.output_stride} instead."
        )


def resolve_backbone(source: str, cfg: Config, named: Collection[str] = ()) -> Backbone:
    """The frozen backbone to probe: trained weights from a file, or a random-init timm model.

    ``named`` lists the ``model.*`` keys the user set explicitly (``backbone``, ``output_stride``):
    a file's backbone must match the name, and its stride is changed with ``probe.output_stride``
    only. With ``probe.output_stride`` set, the backbone is re-dilated to it (same weights).
    """
    backbone = _resolve(source, cfg, named)
    if source_kind(source) in ("checkpoint", "export"):
        _check_named_stride(cfg, backbone, source, named)
    if cfg.probe.output_stride is not None:
        with config_keys(output_stride="probe.output_stride"):
            backbone = restride(backbone, cfg.probe.output_stride)
    return backbone


def _resolve(source: str, cfg: Config, named: Collection[str]) -> Backbone:
    kind = source_kind(source)
    size = cfg.data.image_size
    if kind == "checkpoint":
        _check_named_model(cfg, load_checkpoint_config(source).model.backbone, source, named)
        return backbone_from_checkpoint(source)
    if kind == "export":
        _check_named_model(cfg, read_export_metadata(source)["model_name"], source, named)
        with config_keys(**MODEL_KEYS):
            return load_exported_backbone(source, image_size=size, check_size=False)
    if kind == "hub":  # the folder's config.json holds the architecture and its arguments
        with config_keys(**MODEL_KEYS):
            return Backbone(
                source, stage=cfg.model.stage, image_size=size, pretrained=True, check_size=False
            )
    # the baseline is random initialisation of the named model (the caller's config is left as is)
    model = dataclasses.replace(cfg.model, backbone=source, pretrained=False)
    return build_backbone(model, size, check_size=False)


def default_out_dir(source: str, cfg: Config) -> Path:
    """``probe.out_dir``, else <run folder>/probe for a checkpoint, else runs/probe_<name>."""
    if cfg.probe.out_dir:
        return Path(cfg.probe.out_dir)
    if source_kind(source) == "checkpoint":
        return Path(source).resolve().parent.parent / "probe"
    if is_hub_source(source):  # local-dir:runs/x/backbone_timm -> probe_backbone_timm
        return Path("runs") / f"probe_{Path(source.split(':', 1)[1].rstrip('/')).name}"
    return Path("runs") / f"probe_{Path(source).stem}"


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
    out = Path(out_dir) if out_dir is not None else default_out_dir(source, cfg)
    torch.manual_seed(cfg.seed)
    backbone = resolve_backbone(source, cfg, named=named)
    # data.label_fraction < 1: only the labelled subset's features are extracted and trained on
    data = build_datamodule(cfg.data, seed=cfg.seed, labelled=True, label_dir=out, index_dir=out)
    batch = max(cfg.data.batch_size, 128)
    train_loader = data.feature_dataloader("train", batch)
    val_loader = data.feature_dataloader("val", batch)
    n_train, n_val = len(data.train_dataset), len(data.val_dataset)
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
        "labelled_images": len(data.train_dataset),
        "output_stride": backbone.create_kwargs.get("output_stride"),
        "feature_grid": list(cache.train.grid_shape),
        "extract_seconds": cache.seconds,
        "probes": metrics,
        **_embedding(cache, cfg, out, backbone.name),
    }
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    heading = title or f"{backbone.name} ({source}) on {cfg.data.name}"
    if cfg.data.label_fraction < 1.0:
        heading += (
            f", data.label_fraction={cfg.data.label_fraction:g} "
            f"({len(data.train_dataset)} labelled images)"
        )
    table = metrics_markdown(metrics, heading)
    (out / "metrics.md").write_text(table)
    return ProbeResult(out, report, cache)
