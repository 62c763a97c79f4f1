"""heatssl (QB-Heat) vs LightlySSL's SimCLR, MoCo-v2 and MAE, and random init, at equal wall-clock.

For one ImageFolder dataset (``<data>/train`` and ``<data>/val``), one image size and one training
budget in minutes per method on this machine, every method pretrains its backbone in the same kind
of plain PyTorch loop (same data folder, same loader workers, time-based warm-up + cosine schedule,
so each method gets a complete schedule within its budget), exports the backbone at a few points of
the budget, and every export is then probed with heatssl's own probes (linear, kNN; tran-1 at the
end). Backbones: resnet18 (``output_stride=16``, as in the imagenette recipe) for heatssl, SimCLR,
MoCo-v2 and random init; vit_tiny with patch 8 for MAE and for heatssl-vit.

Each method trains in a child process, so its peak memory (max RSS) is its own. Figures (images/s,
images seen, probe accuracies, peak memory) go to a JSON rewritten after every method; a plot of
probe accuracy vs pretraining minutes goes next to it.

Needs LightlySSL, a bench-only extra: ``pip install -e ".[bench]"``.

Usage::

    python scripts/compare.py --minutes 15                       # the table in docs/benchmarks.md
    python scripts/compare.py --minutes 1 --methods heatssl simclr --points 1.0 --kinds linear knn
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: no bars in the log

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from benchlib import machine, peak_rss_gib, provenance
from compare_methods import build_method
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from heatssl.config import Config, load_config
from heatssl.model.optim import clock_warmup_cosine
from heatssl.probing import probe as probing
from heatssl.runs.exports import export_backbone
from heatssl.runs.figures import new_figure, save_figure
from heatssl.runs.markdown import markdown_table

METHODS = ("heatssl", "simclr", "mocov2", "mae", "heatssl_vit", "random")
FAMILY = {
    "heatssl": "resnet18",
    "simclr": "resnet18",
    "mocov2": "resnet18",
    "random": "resnet18",
    "mae": "vit_tiny/8",
    "heatssl_vit": "vit_tiny/8",
}
VIT = [
    "model.backbone=vit_tiny_patch16_224",
    "model.output_stride=null",
    "model.kwargs={patch_size: 8}",
    # heatssl's ViT settings (the imagenette_vit recipe); MAE's run ignores them
    "heat.heat_weight=0.03",
    "decoder.width=64",
    "decoder.upsample_blocks=0",
    # the imagenette_vit recipe's objective: the paper's pixels (the imagenette recipe's teacher and
    # global term were measured on resnet18 only)
    "loss.target=pixels",
    "loss.teacher_resolution=full",
    "loss.global_weight=0.0",
]
WARMUP_FRACTION = 0.1  # of the budget, for every method


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="../shared/data/imagenette-128", help="ImageFolder root")
    p.add_argument("--minutes", type=float, default=15.0, help="training budget per method")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument(
        "--points",
        nargs="+",
        type=float,
        default=[1 / 3, 2 / 3, 1.0],
        help="fractions of the budget at which the backbone is exported and probed",
    )
    p.add_argument("--kinds", nargs="+", default=["linear", "knn"], help="probes at every point")
    p.add_argument(
        "--final-kinds", nargs="+", default=["linear", "tran1", "knn"], help="probes at the end"
    )
    p.add_argument("--workers", type=int, default=2, help="data-loader workers per method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--set",
        nargs="+",
        default=[],
        dest="overrides",
        metavar="KEY=VALUE",
        help="config overrides for the heatssl methods only (an ablation row), e.g. loss.target=both",
    )
    p.add_argument("--out", default="results/compare.json")
    p.add_argument("--runs", default="bench_results/runs_compare")
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the other methods' results already in --out (re-run some methods only)",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: train one method
    args = p.parse_args(argv)
    if args.minutes <= 0 or any(not 0 < f <= 1 for f in args.points):
        p.error("--minutes must be > 0 and every --points fraction in (0, 1]")
    args.points = sorted(set(args.points) | {1.0})
    return args


def recipe(args: argparse.Namespace, method: str, extra: list[str] | None = None) -> Config:
    """The heatssl config a method's backbone is built and probed with (the imagenette recipe)."""
    overrides = [
        f"data.root={args.data}",
        f"data.image_size={args.image_size}",
        f"data.num_workers={args.workers}",
        f"seed={args.seed}",
        f"run_dir={Path(args.runs) / method}",
        "trainer.progress_bar=false",
        "probe.tran1_epochs=10",
        *(VIT if FAMILY[method].startswith("vit") else []),
        *(args.overrides if method.startswith("heatssl") else []),
        *(extra or []),
    ]
    return load_config("imagenette", overrides)


# ----- one method's training, in a child process ------------------------------------------------
def train_child(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Train ``name`` for the budget; export the backbone at each point; return the figures."""
    cfg = recipe(args, name)
    method = build_method(name, cfg)
    run_dir = Path(args.runs) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    if name == "random":
        path = export_backbone(method.backbone, run_dir / "backbone_0min.safetensors")
        return {"exports": [{"minutes": 0.0, "path": str(path), "images_seen": 0}]}
    dataset = ImageFolder(
        str(Path(args.data) / "train"), transform=method.transform(args.image_size)
    )
    loader = DataLoader(
        dataset,
        batch_size=method.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
        generator=torch.Generator().manual_seed(args.seed),
    )
    if len(loader) == 0:
        raise SystemExit(
            f"{name}: {len(dataset)} training images are fewer than one batch of "
            f"{method.batch_size}; use a larger dataset."
        )
    optimizer = method.optimizer()
    peaks = [g["lr"] for g in optimizer.param_groups]
    budget = args.minutes * 60.0
    points = list(args.points)
    exports, seen, steps, losses = [], 0, 0, []
    paused = 0.0  # seconds spent exporting: not training time
    begin = time.perf_counter()
    schedule = clock_warmup_cosine(
        lambda: time.perf_counter() - begin - paused, budget, WARMUP_FRACTION
    )
    method.train()
    while points:
        for views, _ in loader:
            trained = time.perf_counter() - begin - paused  # data loading included
            progress = min(1.0, trained / budget)
            scale = schedule(steps)  # the clock decides, as trainer.max_time's schedule
            for group, peak in zip(optimizer.param_groups, peaks, strict=True):
                group["lr"] = peak * scale
            loss = method.loss(views, progress)
            if not torch.isfinite(loss):
                raise RuntimeError(f"{name}: non-finite loss at step {steps}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(method.parameters(), 1.0)
            optimizer.step()
            method.after_step(progress)
            seen += method.images_in(views)
            steps += 1
            losses.append(float(loss.detach()))
            trained = time.perf_counter() - begin - paused
            if trained >= points[0] * budget:
                pause = time.perf_counter()
                minutes = points.pop(0) * args.minutes
                export: dict[str, Any] = {"minutes": minutes, "images_seen": seen}
                for which, backbone in method.encoders().items():  # "" and "teacher"
                    path = (
                        run_dir / f"backbone_{which}{'_' * bool(which)}{minutes:g}min.safetensors"
                    )
                    export[f"{which}{'_' * bool(which)}path"] = str(export_backbone(backbone, path))
                exports.append(export)
                print(f"{name}: {minutes:g} min, {seen} images, loss {losses[-1]:.4f}", flush=True)
                paused += time.perf_counter() - pause
                if not points:
                    break
    return {
        "exports": exports,
        "images_seen": seen,
        "steps": steps,
        "batch_size": method.batch_size,
        "train_seconds": trained,
        "images_per_second": seen / trained,
        "first_loss": losses[0],
        "last_loss": sum(losses[-20:]) / len(losses[-20:]),
        "peak_rss_gib": peak_rss_gib(),
    }


# ----- the parent: children in turn, then probes, JSON and plot ---------------------------------
def run_method(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Train ``name`` in a child process and return its figures (from the child's JSON)."""
    out = Path(args.runs) / name / "train.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, __file__, "--child", name, *_forward(args)]
    subprocess.run(argv, check=True)
    return json.loads(out.read_text())


def _forward(args: argparse.Namespace) -> list[str]:
    return [
        f"--data={args.data}",
        f"--minutes={args.minutes}",
        f"--image-size={args.image_size}",
        f"--workers={args.workers}",
        f"--seed={args.seed}",
        f"--runs={args.runs}",
        "--points",
        *[str(p) for p in args.points],
        *(["--set", *args.overrides] if args.overrides else []),
    ]


def probe_exports(args: argparse.Namespace, name: str, figures: dict[str, Any]) -> None:
    """Probe every export of ``name`` with heatssl's probes (more kinds at the last one); an EMA
    teacher's export (``teacher_path``) gets the same probes, as ``teacher_probes``."""
    for i, export in enumerate(figures["exports"]):
        last = i == len(figures["exports"]) - 1
        kinds = args.final_kinds if last else args.kinds
        cfg = recipe(args, name, [f"probe.kinds=[{', '.join(kinds)}]"])
        for which in ("", "teacher_"):
            if f"{which}path" not in export:
                continue
            path = export[f"{which}path"]
            result = probing.probe(path, cfg, Path(path).with_suffix(""))
            export[f"{which}probes"] = {k: v["top1"] for k, v in result.metrics["probes"].items()}


def plot(report: dict[str, Any], path: Path) -> None:
    """Probe top-1 vs pretraining minutes, one line per method, one panel per probe kind."""
    kinds = ["linear", "knn", "tran1"]
    fig = new_figure(5 * len(kinds), 4)
    axes = fig.subplots(1, len(kinds), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for name, r in report["results"].items():
            pts = [(e["minutes"], e["probes"][kind]) for e in r["exports"] if kind in e["probes"]]
            if not pts:
                continue
            style = "--" if FAMILY[name].startswith("vit") else "-"
            if name == "random":
                ax.axhline(pts[0][1], color="grey", linestyle=":", label="random init (resnet18)")
                continue
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, style, marker="o", label=f"{name} ({FAMILY[name]})")
        ax.set_title(f"{kind} probe")
        ax.set_xlabel("pretraining minutes (this machine)")
        ax.set_ylabel("val top-1 (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def table(report: dict[str, Any]) -> str:
    """Markdown table of the final figures per method."""
    header = ["method", "backbone", "images/s", "images seen", "linear", "tran-1", "kNN"]
    rows = []
    for name, r in report["results"].items():
        last = r["exports"][-1]
        final = last["probes"]
        ips = f"{r['images_per_second']:.0f}" if "images_per_second" in r else "-"
        peak = f"{r['peak_rss_gib']:.2f}" if "peak_rss_gib" in r else "-"
        for label, probes in ((name, final), (f"{name} (EMA teacher)", last.get("teacher_probes"))):
            if probes is None:
                continue
            cells = [f"{probes[k]:.1f}" if k in probes else "-" for k in ("linear", "tran1", "knn")]
            rows.append([label, FAMILY[name], ips, last["images_seen"], *cells, peak])
    return markdown_table([*header, "peak RSS GiB"], rows)


def main(argv: list[str] | None = None) -> int:
    """Train every method in turn (child processes), probe, write JSON, plot and table."""
    args = parse_args(argv)
    if args.child:
        figures = train_child(args, args.child)
        (Path(args.runs) / args.child / "train.json").write_text(json.dumps(figures, indent=2))
        return 0
    try:
        import lightly  # noqa: F401
    except ImportError:
        if set(args.methods) & {"simclr", "mocov2", "mae"}:
            print('LightlySSL is missing: pip install -e ".[bench]"', file=sys.stderr)
            return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        **provenance("scripts/compare.py", argv),
        "machine": machine(),
        "args": vars(args),
        "results": {},
    }
    if args.merge and out.is_file():
        kept = json.loads(out.read_text())["results"]
        report["results"] = {k: v for k, v in kept.items() if k not in args.methods}
    for name in args.methods:
        start = time.perf_counter()
        figures = run_method(args, name)
        probe_exports(args, name, figures)
        figures["family"] = FAMILY[name]
        figures["wall_seconds"] = time.perf_counter() - start
        report["results"][name] = figures
        out.write_text(json.dumps(report, indent=2))
        plot(report, out.with_suffix(".png"))
    print(table(report))
    print(f"written {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
