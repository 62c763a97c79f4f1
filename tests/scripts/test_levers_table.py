"""scripts/levers_table.py: compare.py runs gathered into one table the docs print."""

import json
import sys

import pytest

from tests.helpers import SCRIPTS

sys.path.insert(0, str(SCRIPTS))
import levers_table
import tables


def _run(path, results, overrides=()):
    args = {"data": "/x/imagenette-128", "image_size": 64, "minutes": 5.0, "overrides": overrides}
    path.write_text(json.dumps({"command": "python scripts/compare.py ...", "args": args,
                                "machine": {"cpu_model": "AMD"}, "results": results}))  # fmt: skip
    return path


def _method(probes, teacher=None, ips=100.0):
    export = {
        "images_seen": 3000,
        "probes": probes,
        **({"teacher_probes": teacher} if teacher else {}),
    }
    return {"images_per_second": ips, "exports": [export]}


def test_rows_per_run_and_teacher_with_the_mean_of_the_probes(tmp_path):
    both = _method({"linear": 50.0, "knn": 40.0}, {"linear": 48.0, "knn": 41.0})
    a = _run(tmp_path / "a.json", {"heatssl": both}, ["loss.target=both"])
    b = _run(tmp_path / "b.json", {"simclr": _method({"linear": 46.0, "knn": 40.5, "tran1": 50.0})})
    out = tmp_path / "levers.json"
    assert levers_table.main([f"both={a}", f"SimCLR={b}", "--out", str(out)]) == 0
    table = json.loads(out.read_text())
    rows = table["rows"]
    assert [r["row"] for r in rows] == ["both", "both (EMA teacher)", "SimCLR"]
    assert rows[0]["settings"] == "`loss.target=both`" and rows[2]["settings"] == "-"
    assert (rows[0]["mean"], rows[1]["mean"], rows[2]["mean"]) == ("45.0", "44.5", "45.5")
    assert rows[2]["tran1"] == "50.0" and rows[0]["tran1"] == "-"
    assert rows[0]["data"] == "imagenette-128, 64 px, 5 min" and rows[0]["images_seen"] == "3,000"
    text = tables.render(table)
    assert "| both (EMA teacher) |" in text and "45.5" in text


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(SystemExit):
        levers_table.main([f"x={tmp_path / 'none.json'}", "--out", str(tmp_path / "o.json")])


def test_a_run_of_several_methods_names_the_lightlyssl_rows_by_their_method(tmp_path):
    run = {"heatssl": _method({"linear": 50.0}), "simclr": _method({"linear": 49.0})}
    path = _run(tmp_path / "c.json", run, ["loss.target=both"])
    out = tmp_path / "c_table.json"
    assert levers_table.main([f"heatssl, teacher={path}", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["row"] for r in rows] == ["heatssl, teacher", "SimCLR (LightlySSL)"]
    assert rows[1]["settings"] == "-"  # --set changes the heatssl rows only


def test_the_lightlyssl_rows_of_a_seed_1_run_say_their_seed(tmp_path):
    run = {"heatssl": _method({"linear": 50.0}), "mocov2": _method({"linear": 49.0})}
    path = _run(tmp_path / "s.json", run)
    report = json.loads(path.read_text())
    report["args"]["seed"] = 1
    path.write_text(json.dumps(report))
    out = tmp_path / "s_table.json"
    assert levers_table.main([f"the recipe, seed 1={path}", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["row"] for r in rows] == ["the recipe, seed 1", "MoCo-v2 (LightlySSL), seed 1"]
