"""scripts/bench_flops.py: exact FLOP budgets whose parts add up to the whole QB-Heat step."""

import json
import sys

import torch
from torch import nn

from tests.helpers import SCRIPTS

sys.path.insert(0, str(SCRIPTS))
import bench_flops


def test_grouped_convolution_backward_costs_twice_its_forward():
    """torch's own formula counts a depthwise conv's weight gradient 64x; ours does not."""
    for groups in (1, 8, 64):
        conv = nn.Conv2d(64, 64, 3, padding=1, groups=groups)
        x = torch.randn(2, 64, 8, 8, requires_grad=True)
        forward = bench_flops.count(lambda conv=conv, x=x: conv(x))
        assert forward == 2 * 2 * 64 * 8 * 8 * (64 // groups) * 9
        both = bench_flops.count(lambda conv=conv, x=x: conv(x).sum().backward())
        assert both == 3 * forward, groups


def test_budget_parts_add_up_and_the_projection_shrinks_the_heat_parts(tmp_path):
    out = tmp_path / "flops.json"
    assert bench_flops.main(["--recipes", "demo", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["raw"]
    assert row["check_sum_equals_step"] == {"forward": True, "forward_backward": True}
    parts = row["parts"]
    assert parts["encoder"]["forward"] > 0 and parts["loss"]["forward"] == 0
    assert parts["projection"]["forward"] == 0  # heat.dim null: no projection
    assert row["full_standard"]["forward"] > 0 and row["ratio_standard"]["forward"] > 0

    small = tmp_path / "small.json"
    bench_flops.main(["--recipes", "demo", "--override", "heat.dim=32", "--out", str(small)])
    (projected,) = json.loads(small.read_text())["raw"]
    assert projected["check_sum_equals_step"]["forward_backward"]
    assert projected["parts"]["projection"]["forward"] > 0
    for part in ("predictor", "heat_loss", "decoder"):
        assert projected["parts"][part]["forward"] < parts[part]["forward"], part


def test_the_teacher_forward_and_the_latent_heads_are_in_the_budget(tmp_path):
    """The EMA teacher's forward on the whole image is real compute: counted, forward only."""
    out = tmp_path / "teacher.json"
    overrides = ["loss.target=both", "loss.latent_head=16", "loss.global_weight=1.0"]
    args = ["--recipes", "demo", "--out", str(out)]
    assert bench_flops.main([*args, *(f"--override={o}" for o in overrides)]) == 0
    (row,) = json.loads(out.read_text())["raw"]
    assert row["check_sum_equals_step"] == {"forward": True, "forward_backward": True}
    parts = row["parts"]
    teacher = parts["teacher"]
    assert teacher["forward"] == teacher["forward_backward"] == row["full_same"]["forward"]
    assert parts["latent_head"]["forward_backward"] > parts["latent_head"]["forward"] > 0
    assert parts["global_head"]["forward"] > 0
    plain = tmp_path / "plain.json"
    bench_flops.main(["--recipes", "demo", "--out", str(plain)])
    (pixels,) = json.loads(plain.read_text())["raw"]
    assert pixels["parts"]["teacher"]["forward"] == 0
    gap = row["qbheat"]["forward_backward"] - pixels["qbheat"]["forward_backward"]
    assert gap >= teacher["forward"]

    half = tmp_path / "half.json"
    args = ["--recipes", "demo", "--out", str(half), "--override=loss.teacher_resolution=half"]
    bench_flops.main([*args, *(f"--override={o}" for o in overrides)])
    (small,) = json.loads(half.read_text())["raw"]
    assert small["check_sum_equals_step"] == {"forward": True, "forward_backward": True}
    assert 0 < small["parts"]["teacher"]["forward"] <= teacher["forward"] / 3  # a quarter's pixels


def test_the_second_quadrant_costs_one_more_encoder_pass(tmp_path):
    """loss.pair_weight: a second quarter through the encoder, forward and backward, counted."""
    rows = {}
    for name, extra in (("plain", []), ("pair", ["--override=loss.pair_weight=1.0"])):
        out = tmp_path / f"{name}.json"
        assert bench_flops.main(["--recipes", "demo", "--out", str(out), *extra]) == 0
        (rows[name],) = json.loads(out.read_text())["raw"]
    pair, plain = rows["pair"], rows["plain"]
    assert pair["check_sum_equals_step"] == {"forward": True, "forward_backward": True}
    assert plain["parts"]["pair"]["forward"] == 0
    encoder = plain["parts"]["encoder"]["forward_backward"]
    assert encoder <= pair["parts"]["pair"]["forward_backward"] <= 1.1 * encoder
    gap = pair["qbheat"]["forward_backward"] - plain["qbheat"]["forward_backward"]
    assert gap == pair["parts"]["pair"]["forward_backward"]


def test_the_json_is_a_docs_table_whose_columns_are_the_parts_some_row_has(tmp_path):
    sys.path.insert(0, str(SCRIPTS))
    import tables

    plain, teacher = tmp_path / "plain.json", tmp_path / "teacher.json"
    bench_flops.main(["--recipes", "demo", "--out", str(plain)])
    bench_flops.main(["--recipes", "demo", "--out", str(teacher), "--override=loss.target=both"])
    for path, has_teacher in ((plain, False), (teacher, True)):
        report = json.loads(path.read_text())
        assert "python scripts/bench_flops.py" in report["provenance"]["command"]
        keys = [c["key"] for c in report["columns"]]
        assert ("teacher" in keys) is has_teacher and "projection" not in keys
        (row,) = report["rows"]
        assert row["recipe"] == "`demo` (resnet18, `output_stride: 8`)"
        assert row["ratio"] == f"{report['raw'][0]['ratio_standard']['forward_backward']:.2f}x"
        assert "| `demo` (resnet18" in tables.render(report)
