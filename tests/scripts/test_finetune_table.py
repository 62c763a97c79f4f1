"""scripts/finetune_table.py: bench_finetune.py runs gathered into one table the docs print."""

import json
import sys

import pytest

from tests.helpers import SCRIPTS

sys.path.insert(0, str(SCRIPTS))
import finetune_table
import tables


def _run(start, fraction, seed, top1, source, resumed=False):
    return {"start": start, "source": source, "label_fraction": fraction, "seed": seed,
            "best_top1": top1, "minutes": 10.0 + seed, "resumed": resumed}  # fmt: skip


def _write(path, results):
    path.write_text(json.dumps({"args": {"epochs": 8}, "results": results}))
    return path


def test_seeds_means_probes_and_bold(tmp_path):
    runs = _write(
        tmp_path / "ft.json",
        [
            _run("qbheat", 1.0, 0, 58.0, "r/heatssl/b.safetensors"),
            _run("simclr", 1.0, 0, 57.0, "r/simclr/b.safetensors"),
            _run("qbheat", 0.1, 0, 55.0, "r/heatssl/b.safetensors"),
            _run("simclr", 0.1, 0, 56.5, "r/simclr/b.safetensors", resumed=True),
            _run("qbheat", 1.0, 1, 57.0, "r/heatssl/b.safetensors"),
            _run("simclr", 1.0, 1, 57.4, "r/simclr/b.safetensors"),
        ],
    )
    export = {"path": "r/heatssl/b.safetensors", "images_seen": 1234,
              "probes": {"linear": 53.71, "tran1": 57.1, "knn": 43.3}}  # fmt: skip
    compare = tmp_path / "cmp.json"
    compare.write_text(json.dumps({"results": {"heatssl": {"exports": [export]}}}))
    out = tmp_path / "table.json"
    code = finetune_table.main(
        [str(runs), "--compare", str(compare), "--out", str(out), "--label", "qbheat=QB-Heat"]
    )
    assert code == 0
    table = json.loads(out.read_text())
    qb, sim = table["rows"]
    assert qb["start"] == "QB-Heat" and sim["start"] == "simclr"
    assert qb["labels_1"] == {
        "figures": "58.0 / 57.0",
        "mean": "57.5",
        "format": "{figures} (mean {mean}; seed 0 / 1)",
    }
    assert sim["labels_1"]["mean"] == "57.2"
    assert qb["bold"] == ["labels_1"] and "bold" not in sim  # one seed at 10%: no mean to bold
    assert sim["labels_0.1"]["figures"] == "56.5*"  # resumed runs are marked
    assert qb["probes"] == ["53.7", "57.1", "43.3"] and qb["pretraining"] == "1,234"
    assert sim["probes"] == ["-", "-", "-"] and sim["compare_file"] is None
    assert qb["minutes"] == "10.0-11.0"
    text = tables.render(tables.load(out))
    assert "| QB-Heat | **58.0 / 57.0 (mean 57.5; seed 0 / 1)** | 55.0 (seed 0) |" in text
    assert [c["header"] for c in table["columns"]][1:3] == [
        "fine-tuned, 100% labels",
        "fine-tuned, 10% labels",
    ]


def test_refuses_a_missing_file_and_a_bad_label(tmp_path):
    with pytest.raises(SystemExit):
        finetune_table.main([str(tmp_path / "nope.json")])
    runs = _write(tmp_path / "ft.json", [_run("a", 1.0, 0, 50.0, "x")])
    with pytest.raises(SystemExit):
        finetune_table.main([str(runs), "--label", "no-equals-sign"])
    assert finetune_table.main([str(_write(tmp_path / "empty.json", []))]) == 2


def test_benchmark_json_provenance_names_the_command_and_commit():
    import benchlib

    p = benchlib.provenance("scripts/bench_finetune.py", ["--start", "q=a b.safetensors"])
    assert p["command"] == "python scripts/bench_finetune.py --start 'q=a b.safetensors'"
    assert p["date"].endswith(" UTC") and len(p["date"]) == len("2026-12-07 17:10 UTC")
    assert len(p["heatssl_commit"].split()[0]) == 40  # a full git sha: the tests run in a checkout
