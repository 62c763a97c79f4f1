"""The README and docs/ stay true: commands parse, keys and recipes are documented, named tests exist.

Every ``heatssl ...`` command in the docs parses with the CLI's own parser and its overrides load as a
config; every ``python scripts/X.py ...`` command parses with that script's own options; every test,
script, recipe and relative link the docs name exists.
"""

import dataclasses
import importlib
import re
import shlex

import pytest

from heatssl.cli import build_parser
from heatssl.config import CONFIG_DIR, Config, load_config, resolve_config_path
from heatssl.errors import ConfigError
from tests.helpers import ROOT, SCRIPTS

README = (ROOT / "README.md").read_text()
DOCS = {p.relative_to(ROOT).as_posix(): p.read_text() for p in sorted(ROOT.glob("docs/*.md"))}
ALL_DOCS = {"README.md": README, **DOCS}
README_LIMIT = 15_000  # bytes: the README is the door, the docs hold the rest


def _keys(obj, prefix=""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _keys(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def _is_command(span: str) -> bool:
    """An inline span is a command (not a mention such as `heatssl probe`) when it sets something."""
    return any(mark in span for mark in ("=", "/", " -c ", " -o ", ".ckpt", ".safetensors"))


def _commands(text: str) -> list[str]:
    """Command lines of fenced bash blocks (continuations joined) and of inline code spans."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        lines += [ln.strip() for ln in block.replace("\\\n", " ").splitlines()]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    spans = [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]
    lines += [span for span in spans if _is_command(span)]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def _commands_starting(prefix: str) -> list[tuple[str, str]]:
    """``(doc, command)`` for every command (or ``&&`` part of one) that starts with ``prefix``."""
    found = []
    for name, text in ALL_DOCS.items():
        for line in _commands(text):
            found += [(name, p.strip()) for p in line.split("&&") if p.strip().startswith(prefix)]
    return found


def test_readme_is_short_and_links_the_docs():
    assert len(README.encode()) < README_LIMIT, "move detail from README.md into docs/"
    for page in ("method", "configuration", "gpu", "faults", "benchmarks"):
        assert f"(docs/{page}.md)" in README


def test_ci_runs_the_readme_test_command():
    ci_line = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in ln]
    assert len(ci_line) == 1
    assert f"\n{ci_line[0]}\n" in README


def test_every_config_key_and_recipe_is_in_the_configuration_doc():
    doc = DOCS["docs/configuration.md"]
    missing = [k for k in _keys(Config()) if f"| `{k}` |" not in doc]
    assert not missing, f"undocumented config keys: {missing}"
    recipes = [p.stem for p in CONFIG_DIR.glob("*.yaml") if f"| `{p.stem}` |" not in doc]
    assert not recipes, f"undocumented recipes: {recipes}"


def test_every_test_the_docs_name_exists():
    named = [
        (doc, path, test)
        for doc, text in ALL_DOCS.items()
        for path, test in re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", text)
    ]
    matrix = DOCS["docs/faults.md"].split("## Faults and what heatssl does", 1)[1]
    assert len(re.findall(r"`tests/[\w/]+\.py::\w+`", matrix)) >= 12
    for doc, path, test in named:
        source = ROOT / path
        assert source.is_file(), f"{doc} names a missing test file: {path}"
        assert f"def {test}(" in source.read_text(), f"{doc} names a missing test: {path}::{test}"


@pytest.mark.parametrize(("doc", "command"), _commands_starting("heatssl "))
def test_every_heatssl_command_in_the_docs_parses(doc, command, monkeypatch):
    monkeypatch.chdir(ROOT)  # configs/... paths are relative to the repository
    args, extra = build_parser().parse_known_args(shlex.split(command, comments=True)[1:])
    overrides = [*getattr(args, "overrides", []), *extra]
    assert all("=" in o and not o.startswith("-") for o in overrides), f"{doc}: {command}"
    source = getattr(args, "config", None)
    try:
        source = resolve_config_path(source) if source else None
    except ConfigError:
        source = None  # a placeholder (CONFIG) or a run's own config.yaml
    load_config(source, overrides)  # every key and value the command sets is valid


@pytest.mark.parametrize(("doc", "command"), _commands_starting("python scripts/"))
def test_every_script_command_in_the_docs_parses(doc, command, monkeypatch):
    words = shlex.split(command, comments=True)
    script = ROOT / words[1]
    assert script.is_file(), f"{doc} names a missing script: {words[1]}"
    monkeypatch.syspath_prepend(str(SCRIPTS))
    module = importlib.import_module(script.stem)
    module.parse_args(words[2:])


def test_every_launcher_and_relative_link_exists():
    for doc, text in ALL_DOCS.items():
        for script in re.findall(r"(?<![\w/])scripts/[\w.]+\.(?:sh|sbatch|py)", text):
            assert (ROOT / script).is_file(), f"{doc} names a missing script: {script}"
        base = (ROOT / doc).parent
        for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", text):
            assert (base / target).exists(), f"{doc} links a missing file: {target}"


def test_no_file_points_at_workspace_notes():
    notes = ("METHOD" + ".md", "DESIGN" + ".md")
    folders = ("heatssl", "docs", "scripts", "tests", ".ci")
    files = [ROOT / "README.md", ROOT / "pyproject.toml"]
    files += [p for f in folders for p in (ROOT / f).rglob("*") if p.is_file()]
    for path in files:
        if path.suffix in (".png", ".pyc"):
            continue
        text = path.read_text(errors="replace")
        for note in notes:
            assert note not in text, f"{path.relative_to(ROOT)} refers to {note}"


def test_readme_python_imports_are_the_public_api():
    import heatssl

    for block in re.findall(r"```python\n(.*?)```", README, flags=re.S):
        for names in re.findall(r"^from heatssl import (.+)$", block, flags=re.M):
            for name in (n.strip() for n in names.split(",")):
                assert name in heatssl.__all__, f"README imports {name}, not in the public API"
