"""The heatssl command end to end, and its messages for bad input."""

import re
import subprocess
import sys

import yaml

from heatssl.cli import main
from heatssl.model.heads import LinearHead
from heatssl.runs.head_files import save_head
from tests.helpers import tiny_settings


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


def _one_line(args, capsys):
    """The error of a command that must stop with exit code 2 and one line, no traceback."""
    err = _fails(args, capsys)
    assert err.startswith("heatssl: error: ") and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err and "--trust-checkpoint" not in err
    return err


def test_damaged_or_wrong_files_end_in_one_line_for_export_probe_and_heatmaps(
    tiny_overrides, tmp_path, capsys
):
    assert main(["pretrain", "-c", "demo", *tiny_overrides]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    export = tmp_path / "b.safetensors"
    assert main(["export", str(ckpt), "-o", str(export)]) == 0
    head = save_head(LinearHead(8, 2), tmp_path / "linear_head.safetensors", ["a", "b"])
    capsys.readouterr()
    files = {
        "trunc.ckpt": ckpt.read_bytes()[:100_000],
        "empty.ckpt": b"",
        "text.ckpt": b"hello\n",
        "renamed.ckpt": export.read_bytes(),
        "trunc.safetensors": export.read_bytes()[:5000],
        "text.safetensors": b"hello\n",
        "trunc_head.safetensors": head.read_bytes()[:200],
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    out = ["-o", str(tmp_path / "out")]

    def bad(name):
        return str(tmp_path / name)

    for command in ("export", "probe"):
        err = _one_line([command, bad("trunc.ckpt"), *out], capsys)
        assert "trunc.ckpt is truncated: it ends before its zip directory: 100000 bytes" in err
        assert "cut short" in err and "Copy it again" in err
        err = _one_line([command, bad("empty.ckpt"), *out], capsys)
        assert "empty.ckpt is empty (0 bytes)" in err
        err = _one_line([command, bad("text.ckpt"), *out], capsys)
        assert "text.ckpt is not a PyTorch checkpoint: it is a text file (it starts 'hello')" in err
    err = _one_line(["export", bad("renamed.ckpt"), *out], capsys)
    assert "renamed.ckpt is not a PyTorch checkpoint but a heatssl backbone export" in err
    for name in ("trunc.safetensors", "text.safetensors"):
        err = _one_line(["export", bad(name), *out], capsys)  # export wants the .ckpt
        assert f"{name} is not a PyTorch checkpoint" in err
        assert "RUN/checkpoints/last.ckpt" in err
    err = _one_line(["probe", bad("trunc.safetensors"), *out], capsys)
    assert "trunc.safetensors is truncated: it ends after 5000 of the" in err
    assert "heatssl backbone export" in err
    err = _one_line(["probe", bad("text.safetensors"), *out], capsys)
    assert "is not a readable safetensors file: it is a text file" in err
    for name in ("trunc.ckpt", "trunc.safetensors"):  # a damaged backbone source
        err = _one_line(["heatmaps", bad(name), "--head", str(head), *out], capsys)
        assert f"{name} is truncated" in err
    err = _one_line(["heatmaps", str(ckpt), "--head", bad("trunc_head.safetensors"), *out], capsys)
    assert "trunc_head.safetensors is truncated: it ends after 200 of the" in err
    assert "probe head" in err
    assert not (tmp_path / "out").exists()  # nothing was written


def test_a_run_prints_heatssl_lines_not_the_libraries_chatter(tmp_path):
    """A real ``heatssl pretrain`` process: Lightning's accelerator lines, its tip for another
    product, the spurious "exists and is not empty" and deprecation warnings are gone; heatssl's
    start line (size, images, steps) and end lines (where everything is) are there."""
    settings = [o for o in tiny_settings(tmp_path / "run") if o != "trainer.max_epochs=1"]
    done = subprocess.run(
        [sys.executable, "-m", "heatssl.cli", "pretrain", "-c", "demo", *settings,
         "trainer.max_epochs=4"],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    noises = ("GPU available", "Tip:", "not empty", "LeafSpec", "Total params", "Trainer.fit")
    for noise in noises:
        assert noise not in out, noise
    assert re.search(
        r"M parameters; \d+ training images, 3 steps per epoch x 4 epochs = 12 steps", out
    )
    assert "s per step: about" in out
    assert f"checkpoint: {tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}" in out
    assert len(out.strip().splitlines()) <= 10


def test_heatssl_warnings_are_one_line():
    code = (
        "import warnings; from heatssl.console import one_line_warnings; "
        "from heatssl.errors import HeatSSLWarning; one_line_warnings(); "
        "warnings.warn('skipped 2 unreadable image file(s)', HeatSSLWarning)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stderr == "heatssl: warning: skipped 2 unreadable image file(s)\n"
