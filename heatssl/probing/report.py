"""Probe results as markdown tables: a probe folder's ``metrics.md``, the demo's summary."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from heatssl.runs.markdown import markdown_table


def metrics_markdown(metrics: dict[str, Any], title: str) -> str:
    """The ``metrics.md`` of a probe folder: top-1 / top-5 and seconds per probe, under ``title``."""
    rows = [
        (kind, f"{m['top1']:.2f}", f"{m['top5']:.2f}", f"{m['seconds']:.1f}")
        for kind, m in metrics.items()
    ]
    table = markdown_table(("probe", "top-1", "top-5", "seconds"), rows)
    return f"### {title}\n\n{table}\n"


def top1_table(
    results: dict[str, dict[str, Any]],
    kinds: Sequence[str],
    first: str = "backbone",
    extra: dict[str, Sequence[Any]] | None = None,
) -> str:
    """One row per named result with its top-1 per probe kind (one decimal), plus ``extra`` columns.

    ``results`` maps a row name to a probe ``metrics`` dict (``{kind: {"top1": ...}}``); ``extra``
    maps more column names to one value per row, in the order of ``results``.
    """
    extra = extra or {}
    header = [first, *(f"{k} top-1" for k in kinds), *extra]
    rows = []
    for i, (name, probes) in enumerate(results.items()):
        accs = [f"{probes[k]['top1']:.1f}" if k in probes else "-" for k in kinds]
        rows.append([name, *accs, *(values[i] for values in extra.values())])
    return markdown_table(header, rows)
