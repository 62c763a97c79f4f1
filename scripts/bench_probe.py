"""Probe quality and probe speed: QB-Heat pretraining vs random initialisation, and the ablations.

Needs an Imagenette copy (by default ``../shared/data/imagenette-128``, ImageFolder
train/ and val/); users without it pass ``--data`` to any ImageFolder. For every variant it pretrains
resnet18 at 64 px for the same number of epochs (the budget), then probes the frozen backbone with
heatssl's own probes (features extracted once). The random-init baseline is probed the same way.

It also reports the probe speed: seconds of the 100-epoch linear probe over cached features vs one
feature-extraction pass (target: at most 1.5x).

Usage::

    python scripts/bench_probe.py --epochs 10 --variants default            # quality vs random init
    python scripts/bench_probe.py --epochs 6 --variants default no_heat normalized fixed_quadrant \\
        mask_token copy --kinds linear knn --out results/ablations.json     # the ablation table

The JSON is rewritten after every variant, so a crash loses at most the variant in progress.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import yaml
from benchlib import machine

from heatssl.config import load_config
from heatssl.probing import probe as probing
from heatssl.probing.report import top1_table
from heatssl.train import pretrain as run

VARIANTS: dict[str, list[str]] = {
    "default": [],
    "no_heat": ["heat.heat_weight=0"],
    "normalized": ["heat.step=normalized"],
    "fixed_quadrant": ["heat.quadrant=top_left"],
    "mask_token": ["heat.predictor=mask_token"],
    "copy": ["heat.predictor=copy"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="../shared/data/imagenette-128", help="ImageFolder root")
    p.add_argument("--epochs", type=int, default=10, help="pretraining epochs per variant")
    p.add_argument("--variants", nargs="*", default=["default"], choices=list(VARIANTS))
    p.add_argument(
        "--custom",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE[ KEY=VALUE...]",
        help="an extra variant for a sweep, e.g. --custom 'lr_x2:optim.base_lr=4e-3' (repeatable)",
    )
    p.add_argument("--kinds", nargs="+", default=["linear", "tran1", "knn"])
    p.add_argument("--no-random", action="store_true", help="skip the random-init baseline")
    p.add_argument(
        "--probe-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="applies to probing only, e.g. data.image_size=64 to probe at 64 px a backbone "
        "pretrained at 128 px (repeatable)",
    )
    p.add_argument("--out", default="results/probe_quality.json")
    p.add_argument("--runs", default="bench_results/runs", help="run folders of the variants")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="probe a variant's existing last.ckpt instead of pretraining again (refused when the "
        "run folder's config differs from the one this command would train)",
    )
    p.add_argument(
        "overrides", nargs="*", help="key=value overrides for every run (a variant's own win)"
    )
    args = p.parse_args(argv)
    args.custom_variants = {}
    for spec in args.custom:
        name, sep, rest = spec.partition(":")
        overrides = rest.split()
        if not sep or not name or not overrides or any("=" not in o for o in overrides):
            p.error(f"--custom {spec!r}: expected NAME:KEY=VALUE[ KEY=VALUE...]")
        if name in VARIANTS or name == "random_init":
            p.error(f"--custom name {name!r} is taken by a built-in variant; choose another name")
        args.custom_variants[name] = overrides
    return args


def _overrides(args: argparse.Namespace, variant: str) -> list[str]:
    """The overrides that define a variant: built-in or from ``--custom``."""
    if variant in args.custom_variants:
        return args.custom_variants[variant]
    return VARIANTS.get(variant, [])


def _cfg(args: argparse.Namespace, variant: str) -> Any:
    overrides = [
        f"data.root={args.data}",
        f"run_dir={Path(args.runs) / variant}",
        f"trainer.max_epochs={args.epochs}",
        f"probe.kinds=[{', '.join(args.kinds)}]",
        "trainer.progress_bar=false",
        *args.overrides,
        *_overrides(args, variant),  # after the common overrides: a variant's own keys win
    ]
    return load_config("imagenette", overrides)


def _probe_cfg(args: argparse.Namespace, cfg: Any) -> Any:
    """The probe's config: the pretraining config plus ``--probe-override``."""
    if not args.probe_override:
        return cfg
    return load_config(cfg.to_dict(), args.probe_override)


def _probe_entry(result: probing.ProbeResult) -> dict[str, Any]:
    m = result.metrics
    entry = {k: m["probes"][k] for k in m["probes"]}
    speed = {"extract_seconds": m["extract_seconds"]}
    if "linear" in m["probes"]:
        speed["linear_seconds"] = m["probes"]["linear"]["seconds"]
        speed["linear_over_extract"] = speed["linear_seconds"] / m["extract_seconds"]
    return {"probes": entry, "speed": speed, "out_dir": str(result.out_dir)}


# Keys a reused run may differ in: how it was probed, shown or pruned, not what was trained.
_REUSE_IGNORED = ("probe.", "trainer.progress_bar", "trainer.keep_checkpoints")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def reusable(cfg: Any) -> tuple[Path, list[str]] | None:
    """The run's ``last.ckpt`` and the keys added since it ran, if it trained exactly ``cfg``.

    ``None`` when there is no checkpoint. A key whose value differs raises ``SystemExit``, naming it:
    a figure probed from another configuration must not be reported under this variant's name. Keys
    the saved config lacks (added to heatssl after the run) are returned so the JSON records them.
    """
    run_dir = Path(cfg.run_dir)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    saved_path = run_dir / "config.yaml"
    if not ckpt.is_file() or not saved_path.is_file():
        return None
    saved = _flat(yaml.safe_load(saved_path.read_text()))
    wanted = _flat(cfg.to_dict())
    ignored = [k for k in wanted if k.startswith(_REUSE_IGNORED)]
    differ = [
        f"{k}: ran {saved[k]!r}, wanted {wanted[k]!r}"
        for k in wanted
        if k in saved and k not in ignored and saved[k] != wanted[k]
    ]
    if differ:
        raise SystemExit(
            f"--reuse: {run_dir} was trained with another configuration ({'; '.join(differ)}); "
            "drop --reuse to pretrain again, or point --runs elsewhere"
        )
    return ckpt, sorted(k for k in wanted if k not in saved and k not in ignored)


def main(argv: list[str] | None = None) -> int:
    """Pretrain and probe every variant; print and save the table."""
    args = parse_args(argv)
    report: dict[str, Any] = {
        "machine": machine(),
        "args": vars(args),
        "results": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(report, indent=2))

    if not args.no_random:
        cfg = _cfg(args, "random_init")
        start = time.perf_counter()
        result = probing.probe(
            cfg.model.backbone, _probe_cfg(args, cfg), Path(args.runs) / "random_init" / "probe"
        )
        report["results"]["random_init"] = {
            **_probe_entry(result),
            "pretrain_seconds": 0.0,
            "total_seconds": time.perf_counter() - start,
        }
        save()
    for variant in [*args.variants, *args.custom_variants]:
        cfg = _cfg(args, variant)
        start = time.perf_counter()
        reused = reusable(cfg) if args.reuse else None
        if reused is not None:
            ckpt, added = reused
            result = probing.probe(str(ckpt), _probe_cfg(args, cfg))
            pretrain = {"reused": str(ckpt), "keys_added_since": added, "pretrain_seconds": 0.0}
        else:
            pre = run.pretrain(cfg)
            result = probing.probe(str(pre.last_checkpoint), _probe_cfg(args, cfg))
            pretrain = {
                "pretrain_seconds": pre.seconds,
                "pretrain_steps": pre.global_step,
                "images_seen": pre.global_step * cfg.data.batch_size,
            }
        report["results"][variant] = {
            **_probe_entry(result),
            "overrides": _overrides(args, variant),
            **pretrain,
            "total_seconds": time.perf_counter() - start,
        }
        save()
    print(table(report))
    print(f"written {out}")
    return 0


def table(report: dict[str, Any]) -> str:
    """Markdown table: top-1 per probe and pretraining minutes per variant."""
    results = report["results"]
    minutes = [
        "reused" if "reused" in r else f"{r['pretrain_seconds'] / 60:.1f}" for r in results.values()
    ]
    probes = {name: r["probes"] for name, r in results.items()}
    return top1_table(probes, report["args"]["kinds"], "variant", {"pretrain min": minutes})


if __name__ == "__main__":
    raise SystemExit(main())
