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

    python scripts/compare.py --minutes 15                       # the README table (about 2 h)
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
from benchlib import machine
from torch import nn
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from heatssl import evaluate
from heatssl.backbone import Backbone, build_backbone, export_backbone
from heatssl.config import Config, load_config
from heatssl.data import build_transform
from heatssl.qbheat import QBHeat
from heatssl.schedule import scaled_lr, warmup_cosine

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
    p.add_argument("--out", default="bench_results/compare.json")
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
        *(extra or []),
    ]
    return load_config("imagenette", overrides)


# ----- methods: each returns (model to train, loss of a batch, transform, batch size, optimiser) ----
class Method(nn.Module):
    """One pretraining method around a heatssl :class:`Backbone` (whose weights get exported)."""

    batch_size = 128

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def transform(self, size: int) -> Any:
        raise NotImplementedError

    def loss(self, views: Any, progress: float) -> torch.Tensor:
        raise NotImplementedError

    def optimizer(self) -> torch.optim.Optimizer:
        raise NotImplementedError

    def images_in(self, views: Any) -> int:
        """Source images in a batch (not views)."""
        return (views[0] if isinstance(views, list | tuple) else views).shape[0]


class HeatSSL(Method):
    """QB-Heat exactly as ``heatssl pretrain`` builds it from the imagenette recipe."""

    def __init__(self, backbone: Backbone, cfg: Config) -> None:
        super().__init__(backbone)
        self.cfg = cfg
        self.qbheat = QBHeat.from_config(backbone, cfg)
        self.batch_size = cfg.data.batch_size

    def transform(self, size: int) -> Any:
        return build_transform(size, True, self.cfg.data.augment, self.cfg.data.crop_scale_min)

    def loss(self, views: Any, progress: float) -> torch.Tensor:
        return self.qbheat(views).loss

    def optimizer(self) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for name, param in self.qbheat.named_parameters():
            physics = name.startswith(("predictor.", "heat_loss."))
            (no_decay if param.ndim < 2 or physics else decay).append(param)
        opt = self.cfg.optim
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay}],
            lr=scaled_lr(opt.base_lr, self.batch_size),
            betas=tuple(opt.betas),
            weight_decay=0.0,
        )


class SimCLR(Method):
    """LightlySSL's SimCLR (its CIFAR/Imagenette benchmark settings, blur off at small sizes)."""

    def __init__(self, backbone: Backbone) -> None:
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        super().__init__(backbone)
        dim = backbone.num_features
        self.head = SimCLRProjectionHead(dim, dim, 128)
        self.criterion = NTXentLoss(temperature=0.5)

    def transform(self, size: int) -> Any:
        from lightly.transforms import SimCLRTransform

        return SimCLRTransform(input_size=size, cj_strength=0.5, gaussian_blur=0.0)

    def loss(self, views: Any, progress: float) -> torch.Tensor:
        z0, z1 = (self.head(self.backbone.pooled(v)) for v in views)
        return self.criterion(z0, z1)

    def optimizer(self) -> torch.optim.Optimizer:
        """SGD as in LightlySSL's benchmarks, over the trainable parameters only."""
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.SGD(
            params, lr=0.06 * self.batch_size / 128, momentum=0.9, weight_decay=5e-4
        )


class MoCoV2(Method):
    """LightlySSL's MoCo-v2: momentum encoder, memory bank of 4096, temperature 0.1."""

    def __init__(self, backbone: Backbone) -> None:
        import copy

        from lightly.loss import NTXentLoss
        from lightly.models.modules import MoCoProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        super().__init__(backbone)
        dim = backbone.num_features
        self.head = MoCoProjectionHead(dim, dim, 128)
        self.backbone_m = copy.deepcopy(backbone)
        self.head_m = copy.deepcopy(self.head)
        deactivate_requires_grad(self.backbone_m)
        deactivate_requires_grad(self.head_m)
        self.criterion = NTXentLoss(temperature=0.1, memory_bank_size=(4096, 128))

    def transform(self, size: int) -> Any:
        from lightly.transforms import MoCoV2Transform

        return MoCoV2Transform(input_size=size, cj_strength=0.5, gaussian_blur=0.0)

    def loss(self, views: Any, progress: float) -> torch.Tensor:
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule

        momentum = cosine_schedule(int(progress * 1000), 1000, 0.99, 1.0)
        update_momentum(self.backbone, self.backbone_m, m=momentum)
        update_momentum(self.head, self.head_m, m=momentum)
        query = self.head(self.backbone.pooled(views[0]))
        with torch.no_grad():
            key = self.head_m(self.backbone_m.pooled(views[1]))
        return self.criterion(query, key)

    optimizer = SimCLR.optimizer


class MAE(Method):
    """LightlySSL's MAE on the timm ViT inside a heatssl Backbone (mask ratio 0.75)."""

    def __init__(self, backbone: Backbone, cfg: Config) -> None:
        from lightly.models.modules import MAEDecoderTIMM, MaskedVisionTransformerTIMM

        super().__init__(backbone)
        self.cfg = cfg
        vit = backbone.model
        self.patch = vit.patch_embed.patch_size[0]
        self.encoder = MaskedVisionTransformerTIMM(vit=vit)
        self.seq_len = vit.patch_embed.num_patches + vit.num_prefix_tokens
        self.decoder = MAEDecoderTIMM(
            num_patches=vit.patch_embed.num_patches,
            patch_size=self.patch,
            embed_dim=vit.embed_dim,
            decoder_embed_dim=128,
            decoder_depth=2,
            decoder_num_heads=4,
            num_prefix_tokens=vit.num_prefix_tokens,
        )

    def transform(self, size: int) -> Any:
        from lightly.transforms import MAETransform

        return MAETransform(input_size=size)

    def loss(self, views: Any, progress: float) -> torch.Tensor:
        from lightly.models import utils

        images = views[0]
        n = images.shape[0]
        keep, masked = utils.random_token_mask(
            size=(n, self.seq_len), mask_ratio=0.75, device=images.device
        )
        encoded = self.encoder.encode(images=images, idx_keep=keep)
        tokens = utils.repeat_token(self.decoder.mask_token, (n, self.seq_len))
        tokens = utils.set_at_index(tokens, keep, self.decoder.embed(encoded))
        pred = self.decoder.predict(utils.get_at_index(self.decoder.decode(tokens), masked))
        target = utils.get_at_index(utils.patchify(images, self.patch), masked - 1)
        return nn.functional.mse_loss(pred, target)

    def optimizer(self) -> torch.optim.Optimizer:
        opt = (
            self.cfg.optim
        )  # heatssl's short-budget AdamW recipe: the MAE paper's lr is for 800 epochs
        return torch.optim.AdamW(
            self.parameters(),
            lr=scaled_lr(opt.base_lr, self.batch_size),
            betas=tuple(opt.betas),
            weight_decay=opt.weight_decay,
        )


def build_method(name: str, cfg: Config) -> Method:
    """The method ``name`` around a fresh backbone built from ``cfg``."""
    torch.manual_seed(cfg.seed)
    check = name.startswith("heatssl")
    backbone = build_backbone(cfg.model, cfg.data.image_size, check_size=check)
    if name in ("heatssl", "heatssl_vit"):
        return HeatSSL(backbone, cfg)
    if name == "simclr":
        return SimCLR(backbone)
    if name == "mocov2":
        return MoCoV2(backbone)
    if name == "mae":
        return MAE(backbone, cfg)
    return Method(backbone)


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
    method.train()
    while points:
        for views, _ in loader:
            trained = time.perf_counter() - begin - paused  # data loading included
            progress = min(1.0, trained / budget)
            scale = warmup_cosine(int(progress * 10_000), int(WARMUP_FRACTION * 10_000), 10_000)
            for group, peak in zip(optimizer.param_groups, peaks, strict=True):
                group["lr"] = peak * scale
            loss = method.loss(views, progress)
            if not torch.isfinite(loss):
                raise RuntimeError(f"{name}: non-finite loss at step {steps}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(method.parameters(), 1.0)
            optimizer.step()
            seen += method.images_in(views)
            steps += 1
            losses.append(float(loss.detach()))
            trained = time.perf_counter() - begin - paused
            if trained >= points[0] * budget:
                pause = time.perf_counter()
                minutes = points.pop(0) * args.minutes
                path = run_dir / f"backbone_{minutes:g}min.safetensors"
                export_backbone(method.backbone, path)
                exports.append({"minutes": minutes, "path": str(path), "images_seen": seen})
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
        "peak_rss_gib": _peak_rss_gib(),
    }


def _peak_rss_gib() -> float:
    """This process's peak resident memory (VmHWM: its own, not inherited like ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


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
    ]


def probe_exports(args: argparse.Namespace, name: str, figures: dict[str, Any]) -> None:
    """Probe every export of ``name`` with heatssl's probes (more kinds at the last one)."""
    for i, export in enumerate(figures["exports"]):
        last = i == len(figures["exports"]) - 1
        kinds = args.final_kinds if last else args.kinds
        cfg = recipe(args, name, [f"probe.kinds=[{', '.join(kinds)}]"])
        out_dir = Path(export["path"]).with_suffix("")
        result = evaluate.probe(export["path"], cfg, out_dir)
        export["probes"] = {k: v["top1"] for k, v in result.metrics["probes"].items()}


def plot(report: dict[str, Any], path: Path) -> None:
    """Probe top-1 vs pretraining minutes, one line per method, one panel per probe kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = ["linear", "knn", "tran1"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4), squeeze=False)
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
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(report: dict[str, Any]) -> str:
    """Markdown table of the final figures per method."""
    lines = [
        "| method | backbone | images/s | images seen | linear | tran-1 | kNN | peak RSS GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["results"].items():
        final = r["exports"][-1]["probes"]
        ips = f"{r['images_per_second']:.0f}" if "images_per_second" in r else "-"
        peak = f"{r['peak_rss_gib']:.2f}" if "peak_rss_gib" in r else "-"
        cells = [f"{final[k]:.1f}" if k in final else "-" for k in ("linear", "tran1", "knn")]
        lines.append(
            f"| {name} | {FAMILY[name]} | {ips} | {r['exports'][-1]['images_seen']} | "
            + " | ".join(cells)
            + f" | {peak} |"
        )
    return "\n".join(lines)


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
    report: dict[str, Any] = {"machine": machine(), "args": vars(args), "results": {}}
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
