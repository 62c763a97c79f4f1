"""One table from several runs of scripts/compare.py: an ablation row per run, for the docs.

Each run of compare.py writes its own JSON (``--out``; one row of heatssl settings, ``--set``, or a
LightlySSL method). This script gathers the final probes of each, the EMA teacher's too when the run
had one, into ``results/<name>.json`` in the format ``scripts/tables.py`` prints, each row naming
the file and the command it came from.

Usage::

    python scripts/levers_table.py --out results/levers.json \\
        "pixels (the recipe)=results/latent5_pixels.json" "both=results/latent5_both.json"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import tables

COLUMNS = [
    ("row", "row"),
    ("data", "data, budget"),
    ("settings", "settings (`--set`)"),
    ("images_per_s", "images/s"),
    ("images_seen", "images seen"),
    ("linear", "linear"),
    ("knn", "kNN"),
    ("tran1", "tran-1"),
    ("mean", "mean of the probes"),
]


NAMES = {
    "simclr": "SimCLR (LightlySSL)",
    "mocov2": "MoCo-v2 (LightlySSL)",
    "mae": "MAE (LightlySSL)",
    "random": "random init",
}


def rows_of(label: str, path: Path) -> list[dict[str, Any]]:
    """The rows of one compare.py JSON: one per method, and one per EMA teacher it probed."""
    report = json.loads(path.read_text())
    args = report["args"]
    data = f"{Path(args['data']).name}, {args['image_size']} px, {args['minutes']:g} min"
    rows = []
    single = len(report["results"]) == 1  # a run of several methods: LightlySSL's by their names
    seed = f", seed {args['seed']}" if args.get("seed") else ""  # told apart from a seed-0 run's
    for name, result in report["results"].items():
        last = result["exports"][-1]
        settings = " ".join(args.get("overrides", [])) if name.startswith("heatssl") else ""
        for suffix, probes in (
            ("", last["probes"]),
            (" (EMA teacher)", last.get("teacher_probes")),
        ):
            if probes is None:
                continue
            figures = [probes[k] for k in ("linear", "knn", "tran1") if k in probes]
            rows.append(
                {
                    "row": f"{label}{suffix}"
                    if name.startswith("heatssl") or single
                    else f"{NAMES[name]}{seed}{suffix}",
                    "data": data,
                    "settings": f"`{settings}`" if settings else "-",
                    "images_per_s": f"{result.get('images_per_second', 0):.0f}",
                    "images_seen": f"{last['images_seen']:,}",
                    **{k: f"{probes[k]:.1f}" if k in probes else "-" for k in ("linear", "knn")},
                    "tran1": f"{probes['tran1']:.1f}" if "tran1" in probes else "-",
                    "mean": f"{sum(figures) / len(figures):.1f}",
                    "file": str(path),
                    "command": report.get("command", "not recorded"),
                }
            )
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options: ``LABEL=FILE`` pairs, the output file and a note."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="*", help="LABEL=results/FILE.json, in the table's order")
    p.add_argument("--out", default="results/levers.json", help="the table's JSON")
    p.add_argument("--note", default="", help="what the table compares, for its provenance")
    args = p.parse_args(argv)
    for pair in args.runs:
        _, sep, file = pair.partition("=")
        if not sep or not Path(file).is_file():
            p.error(f"{pair!r}: give LABEL=FILE with an existing compare.py JSON")
    return args


def main(argv: list[str] | None = None) -> int:
    """Write the table's JSON from the ``LABEL=FILE`` pairs."""
    args = parse_args(argv)
    if not args.runs:
        print("levers_table.py: give at least one LABEL=FILE", file=sys.stderr)
        return 2
    rows: list[dict[str, Any]] = []
    machines = {}
    for pair in args.runs:
        label, _, file = pair.partition("=")
        rows += rows_of(label, Path(file))
        report = json.loads(Path(file).read_text())
        machines[file] = report.get("machine", {}).get("cpu_model", "?")
    columns = [{"key": k, "header": h} for k, h in COLUMNS]
    tables.save(
        args.out,
        "scripts/levers_table.py",
        argv,
        columns,
        rows,
        source="the final probes of each compare.py run named in a row's file and command",
        machines=machines,
        note=args.note,
        units="val top-1 (%) of heatssl's probes; images/s of pretraining",
    )
    print(f"written {args.out}: {len(rows)} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
