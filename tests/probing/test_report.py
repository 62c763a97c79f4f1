"""Tests for heatssl.probing.report: the markdown tables of probe metrics."""

from heatssl.probing.report import metrics_markdown, top1_table
from heatssl.runs.markdown import markdown_table


def test_metrics_markdown_row_per_probe():
    metrics = {
        "linear": {"top1": 71.234, "top5": 90.5, "seconds": 12.34, "epochs": 100},
        "tran1": {"top1": 75.0, "top5": 92.0, "seconds": 60.0},
        "knn": {"top1": 60.129, "top5": 80.0, "seconds": 1.0, "k": 20},
    }
    text = metrics_markdown(metrics, "resnet18 on synthetic")
    lines = text.splitlines()
    assert lines[0] == "### resnet18 on synthetic"
    rows = [line for line in lines if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| probe |")
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["linear", "tran1", "knn"]
    assert "| linear | 71.23 | 90.50 | 12.3 |" in lines
    assert "| knn | 60.13 | 80.00 | 1.0 |" in lines
    assert text.endswith("\n")


def test_markdown_table_and_top1_table():
    assert markdown_table(["a", "b"], [[1, "x"]]) == "| a | b |\n|---|---|\n| 1 | x |"
    results = {"QB-Heat": {"linear": {"top1": 52.04}, "knn": {"top1": 39.96}}}
    table = top1_table(results, ["linear", "knn"], first="variant", extra={"pretrain min": [2.9]})
    assert table.splitlines() == [
        "| variant | linear top-1 | knn top-1 | pretrain min |",
        "|---|---|---|---|",
        "| QB-Heat | 52.0 | 40.0 | 2.9 |",
    ]
