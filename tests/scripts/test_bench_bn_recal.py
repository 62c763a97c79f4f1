"""scripts/bench_bn_recal.py: the statistics it re-estimates, and the table it writes."""

import json
import sys

import pytest
import torch

from heatssl.config import load_config
from heatssl.data.transforms import to_model_input
from heatssl.runs.sources import resolve_backbone
from tests.helpers import SCRIPTS, write_image_folder

sys.path.insert(0, str(SCRIPTS))
import bench_bn_recal
import tables

TINY = [
    "model.backbone=test_resnet",
    "model.output_stride=8",
    "data.image_size=32",
    "data.batch_size=8",
    "data.num_workers=0",
    "probe.epochs=2",
]


def test_recalibrate_stores_the_batches_statistics_and_keeps_the_weights():
    cfg = load_config("imagenette", TINY)
    backbone = resolve_backbone("test_resnet", cfg)
    weights = {k: v.clone() for k, v in backbone.named_parameters()}
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    ratios = bench_bn_recal.recalibrate(backbone, [(images, torch.zeros(6))], batches=1)
    with torch.no_grad():
        first = backbone.model.conv1[0](to_model_input(images.clone()))  # test_resnet's deep stem
    bn = backbone.model.conv1[1]
    torch.testing.assert_close(bn.running_mean, first.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(bn.running_var, first.var(dim=(0, 2, 3)))  # unbiased, as BatchNorm
    assert ratios["model.conv1.1"] == pytest.approx(float(first.var(dim=(0, 2, 3)).median()))
    assert not backbone.training
    for name, value in backbone.named_parameters():
        assert torch.equal(value, weights[name]), name


def test_recalibrate_uses_only_the_batches_asked_for():
    cfg = load_config("imagenette", TINY)
    backbone = resolve_backbone("test_resnet", cfg)
    dark = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    bright = torch.full((4, 3, 32, 32), 255, dtype=torch.uint8)
    bench_bn_recal.recalibrate(backbone, [(dark, None), (bright, None)], batches=1)
    with torch.no_grad():
        first = backbone.model.conv1[0](to_model_input(dark.clone()))
    torch.testing.assert_close(backbone.model.conv1[1].running_mean, first.mean(dim=(0, 2, 3)))


def test_main_probes_before_and_after_and_writes_a_table(tmp_path):
    data = write_image_folder(tmp_path / "images", train=8, val=3)
    out = tmp_path / "bn.json"
    args = ["random=test_resnet", f"--data={data}", "--batches=2", f"--out={out}", "--set", *TINY]
    assert bench_bn_recal.main(args) == 0
    table = tables.load(out)
    (row,) = table["rows"]
    assert row["label"] == "random" and row["source"] == "test_resnet"
    for key in ("as_written", "recalibrated"):
        top1 = row["top1"][key]
        assert set(top1) == {"linear", "knn"} and all(0 <= v <= 100 for v in top1.values())
        assert row[key] == [f"{top1['linear']:.1f}", f"{top1['knn']:.1f}"]
    before, after = row["top1"]["as_written"], row["top1"]["recalibrated"]
    assert row["change"] == [f"{after[k] - before[k]:+.1f}" for k in ("linear", "knn")]
    # a fresh model's stored variances are 1: whole images give others
    assert any(abs(r - 1.0) > 1e-3 for r in row["var_ratio_per_layer"].values())
    assert "2 batches of 8" in table["provenance"]["statistics_from"]
    assert "| random |" in tables.render(json.loads(out.read_text()))


def test_bad_arguments_are_refused_with_the_fix(capsys):
    with pytest.raises(SystemExit):
        bench_bn_recal.parse_args(["backbone.safetensors"])
    assert "qbheat=backbone.safetensors" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_bn_recal.parse_args(["a=b.safetensors", "--batches=0"])
    assert "--batches=0" in capsys.readouterr().err
