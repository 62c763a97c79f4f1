"""Probes of backbone exports as written and after re-estimating their BatchNorm statistics.

QB-Heat's student trains on one quarter of each image (32 px at the ``imagenette`` recipe's 64 px),
so the BatchNorm running statistics in its export are those of quarters, while the probes feed
whole images. This script measures what that mismatch costs: every export is probed as written,
then again after ``torch.optim.swa_utils.update_bn`` re-estimated every BatchNorm layer's
statistics on ``--batches`` batches of whole training images (no labels used; the weights do not
change). It also records, per layer, how far the re-estimated variances are from the stored ones.

Usage::

    python scripts/bench_bn_recal.py --out results/bn_recal.json \\
        qbheat=bench_results/runs_compare15_seed1/heatssl/backbone_15min.safetensors

The JSON is a table for ``scripts/tables.py``, rewritten after every export.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from benchlib import machine, provenance
from tables import save
from torch import nn
from torch.optim.swa_utils import update_bn

from heatssl.config import load_config
from heatssl.data.datamodule import build_datamodule
from heatssl.data.transforms import to_model_input
from heatssl.probing.features import build_cache
from heatssl.probing.probes import run_probes
from heatssl.runs.sources import resolve_backbone

IMAGES = {
    "augmented": "the pretraining loader's random crops of whole images",
    "plain": "the probes' own view of the training images (resize + centre crop)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("exports", nargs="+", metavar="LABEL=EXPORT", help="backbone files to probe")
    p.add_argument("--data", default="../shared/data/imagenette-128", help="ImageFolder root")
    p.add_argument("--recipe", default="imagenette", help="config whose data and probe keys apply")
    p.add_argument("--batches", type=int, default=60, help="training batches for the statistics")
    p.add_argument("--images", choices=sorted(IMAGES), default="augmented", help="their view")
    p.add_argument("--kinds", nargs="+", default=["linear", "knn"], help="probes to run")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--out", default="results/bn_recal.json", help="table JSON to write")
    args = p.parse_args(argv)
    bad = [e for e in args.exports if "=" not in e]
    if bad:
        p.error(f"{bad[0]!r} is not LABEL=EXPORT: write it as, e.g., qbheat={bad[0]}")
    if args.batches < 1:
        p.error(f"--batches={args.batches}: at least 1 batch is needed to estimate statistics")
    return args


class _FromLoader(nn.Module):
    """The backbone fed a loader's uint8 batch, as ``update_bn`` calls it."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(to_model_input(images))


def recalibrate(backbone: nn.Module, loader: Any, batches: int) -> dict[str, float]:
    """Re-estimate every BatchNorm layer's running statistics on ``batches`` of ``loader``.

    Returns, per layer, the median over channels of new variance / stored variance.
    """
    norms = {
        n: m for n, m in backbone.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }
    if not norms:
        raise ValueError(f"{type(backbone).__name__} has no BatchNorm layer to recalibrate")
    stored = {n: m.running_var.clone() for n, m in norms.items()}
    with torch.no_grad():
        update_bn(itertools.islice(loader, batches), _FromLoader(backbone))
    backbone.eval()
    return {
        n: float((m.running_var / stored[n].clamp_min(1e-12)).median()) for n, m in norms.items()
    }


def probe_top1(backbone: nn.Module, data: Any, cfg: Any) -> dict[str, float]:
    """Top-1 of every probe in ``cfg.probe.kinds`` on ``backbone``'s cached features."""
    torch.manual_seed(cfg.seed)
    loaders = (data.feature_dataloader(s, max(cfg.data.batch_size, 128)) for s in ("train", "val"))
    cache = build_cache(backbone, *loaders, data.class_names, torch.device("cpu"))
    torch.manual_seed(cfg.seed)  # the heads' initial weights from the seed alone, as heatssl probe
    metrics, _ = run_probes(cache, cfg.probe)
    return {kind: round(metrics[kind]["top1"], 2) for kind in cfg.probe.kinds}


def measure(args: argparse.Namespace, label: str, source: str, cfg: Any) -> dict[str, Any]:
    """One export's row: its probes as written, the statistics, its probes after."""
    data = build_datamodule(cfg.data, seed=cfg.seed, labelled=True)
    backbone = resolve_backbone(source, cfg)
    before = probe_top1(backbone, data, cfg)
    loader = (
        data.train_dataloader() if args.images == "augmented" else data.feature_dataloader("train")
    )
    start = time.perf_counter()
    ratios = recalibrate(backbone, loader, args.batches)
    seconds = time.perf_counter() - start
    after = probe_top1(backbone, data, cfg)
    spread = sorted(ratios.values())
    return {
        "label": label,
        "source": source,
        "as_written": [f"{before[k]:.1f}" for k in cfg.probe.kinds],
        "recalibrated": [f"{after[k]:.1f}" for k in cfg.probe.kinds],
        "change": [f"{after[k] - before[k]:+.1f}" for k in cfg.probe.kinds],
        "top1": {"as_written": before, "recalibrated": after},
        "var_ratio": [f"{v:.2f}" for v in (spread[0], statistics.median(spread), spread[-1])],
        "recal_seconds": round(seconds, 1),
        "var_ratio_per_layer": {n: round(r, 3) for n, r in ratios.items()},
    }


def main(argv: list[str] | None = None) -> int:
    """Probe every export twice; the table JSON after each."""
    args = parse_args(argv)
    cfg = load_config(
        args.recipe, [f"data.root={args.data}", f"probe.kinds=[{', '.join(args.kinds)}]", *args.set]
    )
    probes = " / ".join(args.kinds)
    columns = [
        {"key": "label", "header": "export"},
        {"key": "as_written", "header": f"{probes}, as written"},
        {"key": "recalibrated", "header": f"{probes}, statistics re-estimated"},
        {"key": "change", "header": "change"},
        {"key": "var_ratio", "header": "new / stored variance, over layers (min / median / max)"},
    ]
    rows: list[dict[str, Any]] = []
    for entry in args.exports:
        label, source = entry.split("=", 1)
        rows.append(measure(args, label, source, cfg))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        save(
            args.out,
            "scripts/bench_bn_recal.py",
            argv if argv is not None else sys.argv[1:],
            columns,
            rows,
            statistics_from=f"{args.batches} batches of {cfg.data.batch_size}: {IMAGES[args.images]}",
            heatssl_commit=provenance("scripts/bench_bn_recal.py", argv)["heatssl_commit"],
            machine=machine(),
        )
        print(f"{label}: {rows[-1]['as_written']} -> {rows[-1]['recalibrated']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
