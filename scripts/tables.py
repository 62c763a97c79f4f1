"""The benchmark tables of the docs, generated from the figures in ``results/*.json``.

Every table stands between two markers that name its JSON file::

    <!-- table: NAME (results/FILE.json) -->
    | ... the generated table ... |

    <!-- /table -->

A JSON file holds one table: ``provenance`` (command, date, machine, where the figures came from),
``columns`` (each a ``key`` and a ``header``, optionally a ``format``) and ``rows``. A cell is a
string as printed, a list (``a / b``), a list of lists (``a / b ; c / d``) or an object of named
figures written with its own or its column's ``format``. A row's ``bold`` names the cells printed in
bold (``key``, or ``key.1`` for one figure of a list); a row whose ``run`` has a ``mark`` comes from
another run than the rest of its table and says so in its first cell (or its run's ``column``). A
row's ``figures_from`` lists the JSON files that hold its figures too (the README's summary): every
figure must be found there.

Usage::

    python scripts/tables.py            # rewrite the tables in the docs from results/
    python scripts/tables.py --check    # exit 1 naming each table that differs from its JSON
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "docs/benchmarks.md", "docs/evaluation.md", "docs/gpu.md")
MARKER = re.compile(
    r"^<!-- table: (?P<name>[\w.-]+) \((?P<file>results/[\w.-]+\.json)\) -->\n"
    r"(?P<body>.*?)^<!-- /table -->$",
    flags=re.M | re.S,
)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table, one line per row, cells separated by `` | ``."""

    def line(cells: list[str]) -> str:
        return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])


def _joined(value: str | list) -> str:
    """``a / b`` for a list, ``a / b ; c / d`` for a list of lists."""
    if isinstance(value, str):
        return value
    if value and isinstance(value[0], list):
        return " ; ".join(_joined(v) for v in value)
    return " / ".join(value)


def cell(value: Any, column: dict[str, str], bold: set[str]) -> str:
    """One cell's text: figures joined or formatted, in bold where the row says so."""
    key = column["key"]
    if isinstance(value, dict):
        fields = {k: _joined(v) for k, v in value.items() if k != "format"}
        text = value.get("format", column.get("format", "")).format_map(fields)
    elif isinstance(value, list) and not (value and isinstance(value[0], list)):
        text = " / ".join(f"**{v}**" if f"{key}.{i}" in bold else v for i, v in enumerate(value))
    else:
        text = _joined(value)
    return f"**{text}**" if key in bold else text


def render(table: dict[str, Any]) -> str:
    """The markdown table of one results JSON."""
    columns = table["columns"]
    rows = []
    for row in table["rows"]:
        cells = [cell(row.get(c["key"], ""), c, set(row.get("bold", ()))) for c in columns]
        run = row.get("run", {})
        if run.get("mark"):
            where = [c["key"] for c in columns].index(run.get("column", columns[0]["key"]))
            cells[where] += f" ({run['mark']})"
        rows.append(cells)
    return markdown_table([c["header"] for c in columns], rows)


def command_and_date(script: str, argv: list[str] | None = None) -> dict[str, str]:
    """The command that ran ``script`` (``argv``, else this process's) and the date, for a JSON."""
    return {
        "command": "python " + shlex.join([script, *(sys.argv[1:] if argv is None else argv)]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def save(
    path: Path | str,
    script: str,
    argv: list[str] | None,
    columns: list[dict[str, str]],
    rows: list[dict[str, Any]],
    **provenance: Any,
) -> None:
    """Write one table's JSON, its provenance led by the command that made it and the date."""
    provenance = {**command_and_date(script, argv), **provenance}
    table = {"provenance": provenance, "columns": columns, "rows": rows}
    Path(path).write_text(json.dumps(table, indent=2) + "\n")


def load(path: Path) -> dict[str, Any]:
    """A results JSON that holds a table, or a ValueError saying why it does not."""
    table = json.loads(path.read_text())
    if not {"columns", "rows"} <= set(table):
        raise ValueError(
            f"{path.name} holds no table (no columns / rows): a benchmark run's own output? "
            "Put its figures into the table's columns and rows, with their provenance"
        )
    return table


def _leaves(value: Any) -> list[str]:
    """Every string in a cell, a row or a table, but format templates."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() if k != "format" for s in _leaves(v)]
    if isinstance(value, list):
        return [s for v in value for s in _leaves(v)]
    return []


def untraced(table: dict[str, Any], root: Path = ROOT) -> list[str]:
    """Figures of rows with ``figures_from`` that none of those JSON files holds."""
    found = []
    for row in table["rows"]:
        if "figures_from" not in row:
            continue
        known = {s for f in row["figures_from"] for s in _leaves(load(root / f)["rows"])}
        figures = [s for c in table["columns"][1:] for s in _leaves(row.get(c["key"]))]
        found += [s for s in figures if re.search(r"\d", s) and s not in known]
    return found


def regenerate(text: str, root: Path = ROOT) -> tuple[str, list[str], list[str]]:
    """The text with every marked table generated anew, the tables that changed, the problems."""
    changed: list[str] = []
    problems: list[str] = []

    def fill(m: re.Match) -> str:
        name, path = m["name"], root / m["file"]
        if not path.is_file():
            problems.append(f"table {name}: {m['file']} does not exist")
            return m[0]
        try:
            table = load(path)
            body = render(table) + "\n\n"
            problems.extend(
                f"table {name}: {s} is in no file of its row's figures_from"
                for s in untraced(table, root)
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            problems.append(f"table {name}: {m['file']}: {err}")
            return m[0]
        if body != m["body"]:
            changed.append(f"table {name} ({m['file']})")
        return m[0][: m.start("body") - m.start()] + body + "<!-- /table -->"

    new = MARKER.sub(fill, text)
    if len(re.findall(r"^<!-- table:", text, flags=re.M)) != len(MARKER.findall(text)):
        problems.append(
            "a table marker is not <!-- table: NAME (results/FILE.json) --> ... <!-- /table -->"
        )
    return new, changed, problems


def check(root: Path = ROOT) -> list[str]:
    """What is wrong with the docs' tables (empty when every table equals its JSON)."""
    messages = []
    for doc in DOCS:
        if (root / doc).is_file():
            _, changed, problems = regenerate((root / doc).read_text(), root)
            messages += [f"{doc}: {c} differs from its JSON" for c in changed]
            messages += [f"{doc}: {p}" for p in problems]
    return messages


def write(root: Path = ROOT) -> tuple[list[str], list[str]]:
    """Rewrite the docs' tables from their JSON; the tables changed and the problems."""
    updated, trouble = [], []
    for doc in DOCS:
        path = root / doc
        if not path.is_file():
            continue
        text, changed, problems = regenerate(path.read_text(), root)
        if changed:
            path.write_text(text)
        updated += [f"{doc}: {c}" for c in changed]
        trouble += [f"{doc}: {m}" for m in problems]
    return updated, trouble


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.check:
        messages = check()
        for m in messages:
            print(m, file=sys.stderr)
        return 1 if messages else 0
    updated, problems = write()
    for m in updated:
        print(f"rewritten: {m}")
    for m in problems:
        print(m, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
