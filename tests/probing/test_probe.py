"""Probe runs end to end: timm names, checkpoints and exported files; their outputs and errors."""

import json

import pytest

from heatssl.cli import main
from heatssl.config import load_config
from heatssl.errors import CheckpointError, ConfigError
from heatssl.explain.maps import run_heatmaps
from heatssl.probing import probe as probing
from heatssl.runs.exports import export_checkpoint
from heatssl.runs.head_files import load_head
from heatssl.runs.sources import source_config, source_kind
from heatssl.train import pretrain as run

FAST_PROBE = ["probe.epochs=5", "probe.tran1_epochs=2", "probe.batch_size=16"]


@pytest.fixture
def probe_overrides(tiny_overrides):
    return [*tiny_overrides, *FAST_PROBE]


def test_random_init_baseline_writes_everything(probe_overrides, tmp_path):
    cfg = load_config("demo", [*probe_overrides, "probe.kinds=[linear, tran1, knn]"])
    result = probing.probe("test_resnet", cfg, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["backbone"] == "test_resnet" and report["dataset"] == "synthetic"
    assert list(report["probes"]) == ["linear", "tran1", "knn"]
    for metrics in report["probes"].values():
        assert 0.0 <= metrics["top1"] <= metrics["top5"] <= 100.0
    assert report["train_images"] + report["val_images"] == 40
    assert "| linear |" in (tmp_path / "out" / "metrics.md").read_text()
    head, info = load_head(tmp_path / "out" / "linear_head.safetensors")
    assert info["num_classes"] == 10 and info["backbone"] == "test_resnet"
    assert (tmp_path / "out" / "tran1_head.safetensors").is_file()
    assert (tmp_path / "out" / "config.yaml").is_file()
    assert result.cache.train.grid_shape[0] == head.fc.in_features


def test_checkpoint_source_uses_its_own_config(probe_overrides):
    pretrained = run.pretrain(load_config("demo", probe_overrides))
    ckpt = str(pretrained.last_checkpoint)
    cfg = source_config(ckpt, None, ["probe.kinds=[knn]"])
    assert cfg.data.name == "synthetic" and cfg.model.backbone == "test_resnet"
    result = probing.probe(ckpt, cfg)
    assert result.out_dir == pretrained.run_dir.resolve() / "probe"
    assert "knn" in result.metrics["probes"]


def test_exported_source_and_model_mismatch(probe_overrides, tmp_path):
    pretrained = run.pretrain(load_config("demo", probe_overrides))
    exported = str(export_checkpoint(pretrained.last_checkpoint, tmp_path / "b.safetensors"))
    cfg = load_config("demo", [*probe_overrides, "probe.kinds=[linear]"])
    result = probing.probe(exported, cfg, tmp_path / "probe_export")
    assert result.metrics["backbone"] == "test_resnet"
    named = load_config("demo", [*probe_overrides, "model.backbone=resnet18"])
    with pytest.raises(ConfigError, match=r"holds a 'test_resnet' backbone.*resnet18"):
        probing.probe(exported, named, tmp_path / "x", named={"backbone"})


def test_missing_backbone_file_is_refused():
    with pytest.raises(CheckpointError, match="does not exist"):
        source_kind("nowhere/last.ckpt")


def test_cli_probe(probe_overrides, tmp_path, capsys):
    out = tmp_path / "cli_probe"
    args = ["probe", "test_resnet", "-c", "demo", *probe_overrides, "-o", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| linear |" in printed and str(out) in printed
    assert (out / "metrics.json").is_file()
    bad = ["probe", "nowhere.safetensors", "-c", "demo", *probe_overrides]
    assert main(bad) == 2
    assert "does not exist" in capsys.readouterr().err


def test_probe_output_stride_redilates_a_checkpoint_and_heatmaps_follow(probe_overrides, tmp_path):
    pretrained = run.pretrain(load_config("demo", probe_overrides))  # output_stride 8
    ckpt = str(pretrained.last_checkpoint)
    own = probing.probe(ckpt, source_config(ckpt, None, ["probe.kinds=[linear]"]))
    assert own.metrics["output_stride"] == 8 and own.metrics["feature_grid"][1:] == [4, 4]
    cfg = source_config(ckpt, None, ["probe.kinds=[linear]", "probe.output_stride=16"])
    result = probing.probe(ckpt, cfg, tmp_path / "os16")
    assert result.metrics["output_stride"] == 16 and result.metrics["feature_grid"][1:] == [2, 2]
    head = tmp_path / "os16" / "linear_head.safetensors"
    assert load_head(head)[1]["output_stride"] == 16
    # heat maps of that head come from the backbone as it was probed: a 2 x 2 raw map at stride 16
    maps = run_heatmaps(ckpt, head, load_config(cfg.to_dict()), tmp_path / "maps", ["cam"], num=2)
    assert maps.results["cam"].raw.shape[-2:] == (2, 2)


def test_model_output_stride_cannot_change_a_trained_backbone(probe_overrides, capsys):
    ckpt = str(run.pretrain(load_config("demo", probe_overrides)).last_checkpoint)  # stride 8
    assert main(["probe", ckpt, "model.output_stride=8", "probe.kinds=[knn]"]) == 0  # its own
    capsys.readouterr()
    assert main(["probe", ckpt, "model.output_stride=16"]) == 2
    err = capsys.readouterr().err
    assert "model.output_stride=16 cannot change" in err and "probe.output_stride=16" in err


def test_the_plan_is_printed_before_any_extraction_and_grids_go_to_grid_dir(
    probe_overrides, tmp_path, capsys, monkeypatch
):
    """The cost (images, time, memory, grid bytes and where) is said first; probe.grid_dir=tmp
    puts the grids in the system's temporary folder (node-local scratch), removed at the end."""
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    seen: dict[str, str] = {}
    real = probing.build_cache

    def build_cache(*args, **kwargs):
        seen["before"] = capsys.readouterr().err
        seen["grid_dir"] = str(kwargs["grid_dir"])
        return real(*args, **kwargs)

    monkeypatch.setattr(probing, "build_cache", build_cache)
    cfg = load_config(
        "demo",
        [*probe_overrides, "probe.kinds=[tran1]", "probe.grid_dir=tmp", "probe.tran1_max_images=7"],
    )
    probing.probe("test_resnet", cfg, tmp_path / "probe")
    line = seen["before"]
    assert "probe plan: extract 30 train + 10 val images" in line
    assert "tran-1 on 7 train images" in line and f"in {scratch}" in line and "free" in line
    assert seen["grid_dir"].startswith(str(scratch / "heatssl-grids-"))
    assert list(scratch.iterdir()) == []  # removed at the end


def test_grids_that_do_not_fit_the_disk_are_refused_before_extraction(
    probe_overrides, tmp_path, monkeypatch
):
    import shutil

    from heatssl.probing import plan

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(plan.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    monkeypatch.setattr(probing, "build_cache", lambda *a, **k: pytest.fail("extracted"))
    cfg = load_config("demo", [*probe_overrides, "probe.kinds=[linear,tran1]"])
    with pytest.raises(ConfigError, match=r"grids need .* 1\.0 kB free.*probe\.tran1_max_images="):
        probing.probe("test_resnet", cfg, tmp_path / "probe")
    assert not list((tmp_path / "probe").glob("heatssl-grids-*"))
