"""The house: layers import only downwards, the stages stand side by side, no module grows too long.

Layers, from the bottom: ``errors`` (with the console, the version floors and safe writing),
``model`` (torch + timm), the config, ``data``, ``runs`` (the floor every stage shares: run folders,
sources, files, exports, the Trainer), then the stages ``train``, ``probing``, ``finetuning`` and
``explain``, which import none of each other, and the CLI, the demo and the package's public names on top.
Every ``import`` counts, also those inside functions.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.helpers import ROOT, SCRIPTS

PACKAGE = ROOT / "heatssl"
STAGES = ("train", "probing", "finetuning", "explain")
RANK = {"errors": 0, "console": 0, "requirements": 0, "writing": 0}
RANK.update({"model": 1, "config": 2, "data": 3, "runs": 4})
RANK.update(dict.fromkeys(STAGES, 5))
RANK.update({"cli": 6, "demo": 6, "__init__": 6})
LIMIT = 400  # lines per module, scripts included


def _part(module: str) -> str:
    """The layer a dotted heatssl module belongs to (``heatssl.runs.lock`` -> ``runs``)."""
    name = module.split(".")[1] if "." in module else "__init__"
    return "config" if name.startswith("config") else name


def _imports(path: Path) -> set[str]:
    """Every heatssl module ``path`` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m == "heatssl" or m.startswith("heatssl.")}


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts): p for p in PACKAGE.rglob("*.py")}


@pytest.mark.parametrize("module", sorted(_modules()))
def test_a_module_imports_only_its_own_layer_and_the_ones_below(module):
    own = _part(module)
    for imported in _imports(_modules()[module]):
        if imported == "heatssl":
            assert own in ("cli", "__init__"), f"{module} imports the package's public names"
            continue
        other = _part(imported)
        assert RANK[other] <= RANK[own], f"{module} ({own}) imports {imported} ({other}), above it"
        if own in STAGES and other in STAGES:
            assert other == own, (
                f"the stage {own} imports the stage {other}: {module} -> {imported}"
            )


def test_every_module_is_in_a_known_layer():
    assert {_part(m) for m in _modules()} <= set(RANK)


@pytest.mark.parametrize(
    "path", sorted([*PACKAGE.rglob("*.py"), *SCRIPTS.glob("*.py")]), ids=lambda p: p.name
)
def test_no_module_is_over_the_line_budget(path):
    lines = len(path.read_text().splitlines())
    assert lines <= LIMIT, f"{path.relative_to(ROOT)} has {lines} lines (budget {LIMIT}): split it"


def test_the_readme_layout_names_every_module_with_its_job():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout") :]
    for path in PACKAGE.rglob("*.py"):
        if path.name != "__init__.py" or path.parent == PACKAGE:
            folder = "heatssl/" if path.parent == PACKAGE else f"{path.parent.name}/"
            part = layout[layout.index(f"- `{folder}`") :].split("\n- ", 1)[0]
            assert re.search(rf"`{re.escape(path.name)}`\s", part), (
                f"README's Layout does not name {path} under {folder}"
            )
