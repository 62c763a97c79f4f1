"""The benchmark tables in the docs are the ones their ``results/*.json`` give.

``scripts/tables.py`` generates every table between its markers from the JSON the marker names; these
tests fail when a table in the docs differs from it, when a marker names a missing file, when a
README figure is in none of the files its row names, and when a results file says nothing of where
its figures came from.
"""

import importlib.util
import json

import pytest

from tests.helpers import ROOT, SCRIPTS

_spec = importlib.util.spec_from_file_location("tables_script", SCRIPTS / "tables.py")
tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tables)

RESULTS = sorted((ROOT / "results").glob("*.json"))
MARKERS = [
    (doc, m["name"], m["file"])
    for doc in tables.DOCS
    for m in tables.MARKER.finditer((ROOT / doc).read_text())
]


def _table(value="1.0") -> dict:
    return {
        "provenance": {"command": "python scripts/bench_x.py"},
        "columns": [{"key": "what", "header": "what"}, {"key": "figure", "header": "figure"}],
        "rows": [{"what": "a", "figure": value}],
    }


def _block(name: str, table: dict) -> str:
    """A marked table as the docs hold it."""
    return (
        f"<!-- table: {name} (results/{name}.json) -->\n{tables.render(table)}\n\n<!-- /table -->\n"
    )


def _docs(root, text: str) -> None:
    (root / "results").mkdir()
    (root / "README.md").write_text(text)


def test_every_table_in_the_docs_equals_its_json():
    problems = tables.check()
    assert not problems, "\n".join([*problems, "run: python scripts/tables.py"])


def test_the_docs_mark_their_tables():
    assert len(MARKERS) >= 20
    assert {doc for doc, _, _ in MARKERS} == set(tables.DOCS)


@pytest.mark.parametrize(("doc", "name", "file"), MARKERS)
def test_every_marker_names_a_results_file(doc, name, file):
    assert (ROOT / file).is_file(), f"{doc}: table {name} names {file}, which does not exist"


@pytest.mark.parametrize("path", RESULTS, ids=[p.name for p in RESULTS])
def test_every_results_file_says_where_its_figures_came_from(path):
    data = json.loads(path.read_text())
    assert "provenance" in data or "command" in data, f"{path.name}: no provenance or command"


def test_every_results_table_is_in_the_docs():
    shown = {file for _, _, file in MARKERS}
    tabled = [p for p in RESULTS if "rows" in json.loads(p.read_text())]
    assert [p.name for p in tabled if f"results/{p.name}" not in shown] == []


def test_a_marker_naming_a_missing_file_fails(tmp_path):
    _docs(tmp_path, "<!-- table: gone (results/gone.json) -->\n| a |\n\n<!-- /table -->\n")
    assert tables.check(tmp_path) == ["README.md: table gone: results/gone.json does not exist"]


def test_a_marker_without_its_end_or_outside_results_fails(tmp_path):
    _docs(tmp_path, "<!-- table: t (other/t.json) -->\n| a |\n\n<!-- /table -->\n")
    assert len(tables.check(tmp_path)) == 1
    (tmp_path / "README.md").write_text(_block("t", _table()).replace("<!-- /table -->", ""))
    assert len(tables.check(tmp_path)) == 1


def test_a_changed_figure_fails_the_check_until_the_tables_are_written(tmp_path):
    _docs(tmp_path, "x\n\n" + _block("t", _table("1.0")))
    (tmp_path / "results" / "t.json").write_text(json.dumps(_table("1.1")))
    assert tables.check(tmp_path) == ["README.md: table t (results/t.json) differs from its JSON"]
    tables.write(tmp_path)
    assert tables.check(tmp_path) == []
    assert "| a | 1.1 |" in (tmp_path / "README.md").read_text()


def test_a_figure_in_none_of_its_rows_files_fails(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "src.json").write_text(json.dumps(_table("52.0")))
    summary = _table("52.1")
    summary["rows"][0]["figures_from"] = ["results/src.json"]
    (tmp_path / "results" / "sum.json").write_text(json.dumps(summary))
    (tmp_path / "README.md").write_text(_block("sum", summary))
    assert tables.check(tmp_path) == [
        "README.md: table sum: 52.1 is in no file of its row's figures_from"
    ]


def test_cells_marks_and_bold_are_written_as_the_docs_print_them():
    table = {
        "columns": [
            {"key": "variant", "header": "variant"},
            {"key": "seeds", "header": "seed 0 / 1"},
            {"key": "runs", "header": "before ; after"},
            {"key": "auc", "header": "AUC", "format": "{mean} ± {sem}"},
        ],
        "rows": [
            {
                "variant": "copy",
                "seeds": ["52.0", "53.3"],
                "runs": [["1", "2"], ["3", "4"]],
                "auc": {"mean": "0.243", "sem": "0.014"},
                "bold": ["seeds.1", "runs"],
                "run": {"mark": "run of 2026-11-24"},
            }
        ],
    }
    assert tables.render(table).splitlines()[2] == (
        "| copy (run of 2026-11-24) | 52.0 / **53.3** | **1 / 2 ; 3 / 4** | 0.243 ± 0.014 |"
    )
