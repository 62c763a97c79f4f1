"""The heatssl command end to end, and its messages for bad input."""

import yaml

from heatssl.cli import main


def test_pretrain_then_export(tiny_overrides, tmp_path, capsys):
    assert main(["pretrain", "-c", "demo", *tiny_overrides]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    assert main(["export", str(ckpt), "-o", str(tmp_path / "b.safetensors")]) == 0
    assert (tmp_path / "b.safetensors").is_file()
    assert "effective batch 8" in capsys.readouterr().out


def test_demo_runs_the_chain(tiny_overrides, tmp_path, capsys):
    assert main(["demo", *tiny_overrides, "probe.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "heatssl demo" in out
    assert "| QB-Heat |" in out and "| random init |" in out
    run_dir = tmp_path / "run"
    assert (run_dir / "backbone.safetensors").is_file()
    assert list((run_dir / "pictures").glob("*.png"))
    assert (run_dir / "probe" / "linear_head.safetensors").is_file()
    assert (run_dir / "probe_random" / "metrics.json").is_file()
    assert "heat maps:" in out
    assert (run_dir / "heatmaps" / "cam_sheet.png").is_file()
    assert (run_dir / "heatmaps" / "gradcam_sheet.png").is_file()


def test_print_config_shows_the_resolved_values(capsys):
    assert main(["pretrain", "-c", "imagenette", "--print-config", "trainer.max_epochs=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["max_epochs"] == 3
    assert printed["model"]["backbone"] == "resnet18"


def _fails(args, capsys):
    assert main(args) == 2
    return capsys.readouterr().err


def test_bad_inputs_stop_before_training(tiny_overrides, tmp_path, capsys):
    run_dir = tmp_path / "run"
    err = _fails(["pretrain", "-c", "demo", *tiny_overrides, "data.image_size=40"], capsys)
    assert "data.image_size=40" in err and "Nearest sizes that work: 32, 48" in err
    err = _fails(["pretrain", "-c", "demo", *tiny_overrides, "model.backbone=resnet_18"], capsys)
    assert "model.backbone='resnet_18' is not a timm model" in err and "resnet18" in err
    err = _fails(["pretrain", "-c", "demo", *tiny_overrides, "trainer.max_epoch=2"], capsys)
    assert "Did you mean 'max_epochs'" in err
    missing = tmp_path / "nowhere"
    err = _fails(
        [
            "pretrain",
            "-c",
            "demo",
            *tiny_overrides,
            "data.name=imagefolder",
            f"data.root={missing}",
        ],
        capsys,
    )
    assert str(missing) in err
    no_stride = [*tiny_overrides, "model.output_stride=null", "data.image_size=64"]
    err = _fails(["pretrain", "-c", "demo", *no_stride], capsys)
    assert "grid of 1x1" in err and "at least 2x2" in err and "model.output_stride=16" in err
    err = _fails(["pretrain", *tiny_overrides], capsys)
    assert "needs a config" in err
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: {backbone: resnet18\n")
    err = _fails(["pretrain", "-c", str(broken)], capsys)
    assert "broken.yaml, line" in err and "not valid YAML" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1  # one line, no trace
    assert not (run_dir / "checkpoints").exists()  # nothing started
