"""One table from runs of scripts/bench_finetune.py: a row per start, every seed, for the docs.

``bench_finetune.py`` writes one result per start x label fraction x seed. This script gathers
them into ``results/<name>.json`` in the format ``scripts/tables.py`` prints: per start the best
val top-1 of each seed and their mean, with all and with a fraction of the labels, and, where a
``scripts/compare.py`` JSON holds the same export (matched by its path), the frozen probes and the
pretraining images of that start, so a fine-tuning row and its pretraining row are one run.

Usage::

    python scripts/finetune_table.py results/finetune15_seed1.json --out results/finetune15.json \\
        --compare results/compare15_seed1.json \\
        --label "qbheat=QB-Heat (the recipe)" --label "simclr=SimCLR (LightlySSL)"
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import tables


def fractions_of(results: list[dict[str, Any]]) -> list[float]:
    """The label fractions of the runs, all labels first."""
    return sorted({r["label_fraction"] for r in results}, reverse=True)


def seeds_cell(runs: dict[int, dict[str, Any]]) -> dict[str, str] | str:
    """``a / b (mean m)`` over the seeds of one start and fraction (``-`` if none ran)."""
    if not runs:
        return "-"
    seeds = sorted(runs)
    tops = [runs[s]["best_top1"] for s in seeds]
    marks = ["*" if runs[s].get("resumed") else "" for s in seeds]
    figures = " / ".join(f"{t:.1f}{m}" for t, m in zip(tops, marks, strict=True))
    if len(tops) == 1:
        return {"figures": figures, "format": "{figures} (seed " + str(seeds[0]) + ")"}
    mean = sum(tops) / len(tops)
    label = "seed " + " / ".join(str(s) for s in seeds)
    return {
        "figures": figures,
        "mean": f"{mean:.1f}",
        "format": "{figures} (mean {mean}; " + label + ")",
    }


def exports_of(compare_files: list[Path]) -> dict[str, dict[str, Any]]:
    """Every export of the compare.py runs, by its path: images seen, probes, file."""
    found = {}
    for file in compare_files:
        report = json.loads(file.read_text())
        for result in report["results"].values():
            for export in result["exports"]:
                found[str(Path(export["path"]))] = {"file": str(file), **export}
    return found


def table_of(
    results: list[dict[str, Any]],
    labels: dict[str, str],
    exports: dict[str, dict[str, Any]],
) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """The columns and rows: one row per start, in the order the starts first ran."""
    fractions = fractions_of(results)
    by_start: dict[str, dict[float, dict[int, dict[str, Any]]]] = defaultdict(
        lambda: defaultdict(dict)
    )
    for r in results:
        by_start[r["start"]][r["label_fraction"]][r.get("seed", 0)] = r
    columns = [{"key": "start", "header": "start"}]
    columns += [
        {"key": f"labels_{f:g}", "header": f"fine-tuned, {f * 100:g}% labels"} for f in fractions
    ]
    columns += [
        {"key": "probes", "header": "frozen linear / tran-1 / kNN (all labels)"},
        {"key": "pretraining", "header": "pretraining images seen"},
        {"key": "minutes", "header": "minutes per run"},
    ]
    rows = []
    for start, per_fraction in by_start.items():
        runs = [r for f in per_fraction.values() for r in f.values()]
        source = str(Path(runs[0]["source"]))
        export = exports.get(source)
        probes = export["probes"] if export else {}
        minutes = [r["minutes"] for r in runs]
        rows.append(
            {
                "start": labels.get(start, start),
                **{f"labels_{f:g}": seeds_cell(per_fraction.get(f, {})) for f in fractions},
                "probes": [
                    f"{probes[k]:.1f}" if k in probes else "-" for k in ("linear", "tran1", "knn")
                ],
                "pretraining": f"{export['images_seen']:,}" if export else "-",
                "minutes": f"{min(minutes):.1f}-{max(minutes):.1f}",
                "source": source,
                "compare_file": export["file"] if export else None,
            }
        )
    for f in fractions:  # the best mean of each fraction in bold
        key = f"labels_{f:g}"
        means = [
            float(r[key]["mean"]) for r in rows if isinstance(r[key], dict) and "mean" in r[key]
        ]
        for r in rows:
            if means and isinstance(r[key], dict) and r[key].get("mean") == f"{max(means):.1f}":
                r.setdefault("bold", []).append(key)
    return columns, rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="bench_finetune.py JSON files")
    p.add_argument("--out", default="results/finetune15.json", help="the table's JSON")
    p.add_argument("--compare", nargs="*", default=[], help="compare.py JSONs of the starts")
    p.add_argument("--label", action="append", default=[], metavar="START=TEXT")
    p.add_argument("--note", default="", help="what the table compares, for its provenance")
    args = p.parse_args(argv)
    for file in [*args.runs, *args.compare]:
        if not Path(file).is_file():
            p.error(f"{file!r} does not exist: give the JSON a benchmark wrote")
    for pair in args.label:
        if "=" not in pair:
            p.error(f"--label {pair!r}: give START=TEXT, e.g. qbheat='QB-Heat (the recipe)'")
    return args


def main(argv: list[str] | None = None) -> int:
    """Write the table's JSON."""
    args = parse_args(argv)
    results, commands = [], {}
    for file in args.runs:
        report = json.loads(Path(file).read_text())
        results += report["results"]
        commands[file] = report.get("args", {})
    if not results:
        print("finetune_table.py: the files hold no runs", file=sys.stderr)
        return 2
    labels = dict(pair.split("=", 1) for pair in args.label)
    columns, rows = table_of(results, labels, exports_of([Path(f) for f in args.compare]))
    source = (
        "best val top-1 of each bench_finetune.py run; frozen probes and images seen from the "
        "compare.py run that wrote the same export"
    )
    units = "val top-1 (%); * marks a run resumed from its last.ckpt"
    about = {"source": source, "runs": commands, "note": args.note, "units": units}
    tables.save(args.out, "scripts/finetune_table.py", argv, columns, rows, **about)
    print(f"written {args.out}: {len(rows)} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
