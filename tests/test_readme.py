"""The README stays true: its commands match CI, and every config key is documented."""

import dataclasses
import re
from pathlib import Path

from heatssl.config import CONFIG_DIR, Config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _keys(obj, prefix=""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _keys(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def test_every_config_key_is_in_the_readme_table():
    missing = [k for k in _keys(Config()) if f"| `{k}` |" not in README]
    assert not missing, f"undocumented config keys: {missing}"


def test_every_recipe_is_listed():
    missing = [p.stem for p in CONFIG_DIR.glob("*.yaml") if f"| `{p.stem}` |" not in README]
    assert not missing


def test_ci_runs_the_readme_test_command():
    ci_line = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in ln]
    assert len(ci_line) == 1
    assert f"\n{ci_line[0]}\n" in README


def test_every_test_named_in_the_fault_matrix_exists():
    section = README.split("## Faults", 1)[1].split("\n## ", 1)[0]
    named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", section)
    assert len(named) >= 7
    for path, name in named:
        source = (ROOT / path).read_text()
        assert f"def {name}(" in source, f"fault matrix names a missing test: {path}::{name}"
