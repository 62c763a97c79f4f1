"""Run folders: pretraining end to end, resume, export from a checkpoint."""

import csv

import pytest
import timm
import torch

from heatssl import run
from heatssl.backbone import read_export_metadata
from heatssl.config import ConfigError, load_config
from heatssl.data import build_datamodule


def test_pretrain_writes_a_complete_run_folder(tiny_overrides):
    cfg = load_config("demo", tiny_overrides)
    result = run.pretrain(cfg)
    folder = result.run_dir
    train_images = len(build_datamodule(cfg.data).train_dataset)
    assert result.global_step == train_images // 8  # one optimiser step per full batch
    assert load_config(folder / "config.yaml").to_dict() == cfg.to_dict()  # repeatable
    assert (folder / "checkpoints" / "last.ckpt").is_file()
    assert (folder / "pictures" / "reconstruction_epoch001.png").stat().st_size > 1000
    rows = list(csv.DictReader((folder / "metrics.csv").open()))
    logged = {k for row in rows for k, v in row.items() if v}
    assert {"train/loss", "train/rec", "train/heat", "train/commute"} <= logged
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert all(torch.isfinite(torch.tensor(losses)))


def test_resume_continues_the_step_count(tiny_overrides):
    first = run.pretrain(load_config("demo", tiny_overrides))
    resumed = run.pretrain(
        load_config("demo", [*tiny_overrides, "trainer.max_epochs=2"]), resume="last"
    )
    assert resumed.global_step == 2 * first.global_step
    assert (resumed.run_dir / "checkpoints" / "epoch001.ckpt").is_file()


def test_resume_without_checkpoint_is_refused(tiny_overrides):
    with pytest.raises(ConfigError, match="no checkpoint"):
        run.pretrain(load_config("demo", tiny_overrides), resume="last")


def test_export_from_checkpoint_matches_the_trained_backbone(tiny_overrides, tmp_path):
    result = run.pretrain(load_config("demo", tiny_overrides))
    out = run.export(result.last_checkpoint, tmp_path / "b.safetensors")
    trained = run.backbone_from_checkpoint(result.last_checkpoint).eval()
    meta = read_export_metadata(out)
    plain = timm.create_model(
        "test_resnet",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(out)),
        **meta["create_kwargs"],
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = trained(x)
        got = plain.forward_intermediates(x, indices=[-1], intermediates_only=True)[0]
    torch.testing.assert_close(got, ref)
    # training changed the weights: a fresh model gives other features
    fresh = timm.create_model("test_resnet", **meta["create_kwargs"]).eval()
    with torch.no_grad():
        assert not torch.allclose(
            fresh.forward_intermediates(x, indices=[-1], intermediates_only=True)[0], ref
        )


def test_online_probe_is_logged_and_checkpoints_still_load(tiny_overrides):
    cfg = load_config("demo", [*tiny_overrides, "probe.online=true", "trainer.max_epochs=2"])
    result = run.pretrain(cfg)
    rows = list(csv.DictReader((result.run_dir / "metrics.csv").open()))
    val = [float(r["online/val_top1"]) for r in rows if r.get("online/val_top1")]
    train = [float(r["online/train_top1"]) for r in rows if r.get("online/train_top1")]
    assert len(val) == 2 and len(train) == 2  # once per epoch each
    assert all(0.0 <= v <= 1.0 for v in val + train)
    backbone = run.backbone_from_checkpoint(result.last_checkpoint)  # online head in the state
    assert backbone.name == "test_resnet"
