"""Fine-tuning from different starts (QB-Heat, SimCLR, random init) with 100% and 10% of labels.

Every start is fine-tuned by ``heatssl finetune``'s code with the same recipe and the same budget:
``--epochs`` over all labels, and the same number of steps over a label fraction (``--epochs /
fraction`` epochs, warm-up scaled alike), so each run costs about the same time. Starts are
anything ``heatssl finetune`` takes: an exported ``.safetensors`` backbone (``scripts/compare.py``
writes QB-Heat's and LightlySSL SimCLR's), a checkpoint, a timm folder or a bare timm name.

Needs an Imagenette copy (``../shared/data/imagenette-128``). The JSON is rewritten after every
run, so a crash loses at most the run in progress; ``--skip-done`` continues a partial JSON, and
a run folder with a ``last.ckpt`` but no ``metrics.json`` (a stopped run) is resumed, its row marked
``resumed`` (its ``minutes`` then cover only the part after the resume). ``--seed`` repeats the
table with another training seed (the label subset is drawn from the data, so it stays the same).

Usage::

    python scripts/bench_finetune.py --epochs 8 \\
        --start qbheat=bench_results/runs_compare/heatssl/backbone_15min.safetensors \\
        --start simclr=bench_results/runs_compare/simclr/backbone_15min.safetensors \\
        --start random=resnet18 --fractions 1.0 0.1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from benchlib import machine, provenance

from heatssl.config import load_config
from heatssl.finetuning.finetune import finetune


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="../shared/data/imagenette-128", help="ImageFolder root")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument(
        "--start", action="append", required=True, metavar="NAME=SOURCE", help="repeatable"
    )
    p.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.1])
    p.add_argument("--epochs", type=int, default=8, help="epochs over all labels (the budget)")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up epochs over all labels")
    p.add_argument("--runs", default="bench_results/runs_finetune")
    p.add_argument("--out", default="results/finetune.json")
    p.add_argument("--skip-done", action="store_true", help="keep the runs already in --out")
    p.add_argument("--seed", type=int, default=0, help="training seed (folders get _sN if not 0)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    return p.parse_args(argv)


def run_one(args: argparse.Namespace, name: str, source: str, fraction: float) -> dict[str, Any]:
    """One fine-tuning run; its figures."""
    epochs = max(1, round(args.epochs / fraction))
    out = Path(args.runs) / (f"{name}_labels{fraction:g}" + (f"_s{args.seed}" if args.seed else ""))
    resume = "last" if (out / "checkpoints" / "last.ckpt").is_file() else None
    if (out / "metrics.json").is_file():
        resume = None  # a finished run: start again
    overrides = [
        f"seed={args.seed}",
        f"run_dir={out}",
        "data.name=imagefolder",
        f"data.root={args.data}",
        f"data.image_size={args.image_size}",
        f"data.label_fraction={fraction}",
        "model.output_stride=16",
        f"finetune.epochs={epochs}",
        f"finetune.warmup_epochs={args.warmup / fraction}",
        f"finetune.val_every_n_epochs={max(1, round(1 / fraction))}",  # the same val passes
        f"finetune.out_dir={out}",
        "trainer.progress_bar=false",
        "trainer.checkpoint_every_n_minutes=0",
        *args.overrides,
    ]
    cfg = load_config("imagenette", overrides)
    start = time.perf_counter()
    result = finetune(source, cfg, resume=resume, force=True)
    m = result.metrics
    return {
        "start": name,
        "source": source,
        "label_fraction": fraction,
        "seed": args.seed,
        "resumed": resume is not None,
        "train_images": m["train_images"],
        "epochs": epochs,
        "best_top1": m["best"][m["reported"]],
        "final_top1": m["final"][m["reported"]],
        "final_top5": m["final"][m["reported"].replace("top1", "top5")],
        "minutes": (time.perf_counter() - start) / 60,
        "recipe": m["recipe"],
        "out_dir": str(out),
    }


def main(argv: list[str] | None = None) -> int:
    """Every start x fraction; the JSON after each."""
    args = parse_args(argv)
    starts = dict(s.split("=", 1) for s in args.start)
    out = Path(args.out)
    results: list[dict[str, Any]] = []
    if args.skip_done and out.is_file():
        results = json.loads(out.read_text())["results"]
    done = {(r["start"], r["label_fraction"], r.get("seed", 0)) for r in results}
    header = {**provenance("scripts/bench_finetune.py", argv), "machine": machine()}
    for fraction in args.fractions:
        for name, source in starts.items():
            if (name, fraction, args.seed) in done:
                continue
            results.append(run_one(args, name, source, fraction))
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({**header, "args": vars(args), "results": results}, indent=2))
            r = results[-1]
            print(
                f"{name} labels {fraction:g}: best top-1 {r['best_top1']:.2f}, final "
                f"{r['final_top1']:.2f} ({r['epochs']} epochs, {r['minutes']:.1f} min)",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
