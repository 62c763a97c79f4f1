"""Nothing is written outside the run: output folders come from the command line and the run folder,
a foreign folder is not overwritten, links are replaced, not written through."""

import json
import os
import shutil

import pytest
import torch

from heatssl.cli import main
from heatssl.config import load_config
from heatssl.errors import ConfigError
from heatssl.runs.sources import source_config
from heatssl.writing import UnsafePathError, make_folder, write_text
from tests.helpers import tiny_settings


def test_a_checkpoints_stored_output_folders_are_not_used(real_run, tmp_path):
    """``probe.out_dir=/abs/path`` inside a checkpoint made `heatssl probe x.ckpt` write there."""
    ckpt, _ = real_run
    data = torch.load(ckpt, weights_only=True)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "label_subset.json").write_text("keep me")
    config = data["hyper_parameters"]["config"]
    config["probe"]["out_dir"] = str(victim)
    config["probe"]["grid_dir"] = str(victim)
    config["finetune"]["out_dir"] = str(victim)
    hostile = tmp_path / "run" / "checkpoints" / "x.ckpt"
    hostile.parent.mkdir(parents=True)
    torch.save(data, hostile)
    cfg = source_config(str(hostile), None, ["probe.kinds=[linear]", "probe.epochs=1"])
    assert cfg.probe.out_dir is None and cfg.finetune.out_dir is None and cfg.probe.grid_dir is None
    assert main(["probe", str(hostile), "probe.kinds=[linear]", "probe.epochs=1"]) == 0
    assert sorted(p.name for p in victim.iterdir()) == ["label_subset.json"]
    assert (victim / "label_subset.json").read_text() == "keep me"
    assert (tmp_path / "run" / "probe" / "metrics.json").is_file()


def test_a_checkpoint_outside_a_checkpoints_folder_probes_beside_itself(real_run, tmp_path):
    """`cd dl; heatssl probe model.ckpt` wrote ../probe."""
    folder = tmp_path / "dl"
    folder.mkdir()
    shutil.copy(real_run[0], folder / "model.ckpt")
    args = ["probe", str(folder / "model.ckpt"), "probe.kinds=[linear]", "probe.epochs=1"]
    assert main(args) == 0
    assert (folder / "probe" / "metrics.json").is_file()
    assert not (tmp_path / "probe").exists()


def test_an_empty_run_dir_is_refused():
    with pytest.raises(ConfigError, match=r"run_dir=''"):
        load_config("demo", ["run_dir=''"])  # wrote the run into the current folder


def test_export_refuses_a_folder_it_did_not_write(real_run, tmp_path, capsys):
    foreign = tmp_path / "project"
    foreign.mkdir()
    (foreign / "README.md").write_text("my project")
    (foreign / "config.json").write_text('{"mine": true}')
    assert main(["export", str(real_run[0]), "--format", "timm", "-o", str(foreign)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (foreign / "README.md").read_text() == "my project"
    assert json.loads((foreign / "config.json").read_text()) == {"mine": True}
    ours = tmp_path / "ours"
    assert main(["export", str(real_run[0]), "--format", "timm", "-o", str(ours)]) == 0
    assert main(["export", str(real_run[0]), "--format", "timm", "-o", str(ours)]) == 0  # again
    assert (
        main(["export", str(real_run[0]), "--format", "timm", "-o", str(foreign), "--force"]) == 0
    )
    assert (foreign / "model.safetensors").is_file()


def test_links_in_an_output_folder_are_replaced_not_written_through(tmp_path):
    target = tmp_path / "elsewhere.txt"
    target.write_text("precious")
    link = tmp_path / "out" / "config.json"
    link.parent.mkdir()
    os.symlink(target, link)
    write_text(link, "new")
    assert target.read_text() == "precious" and not link.is_symlink()
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, tmp_path / "out" / "cam")
    with pytest.raises(UnsafePathError, match="is a link"):
        make_folder(tmp_path / "out" / "cam", inside=tmp_path / "out")


def test_a_linked_heat_map_overlay_does_not_write_through(real_run, tmp_path):
    ckpt, _ = real_run
    probe_dir = tmp_path / "probe"
    assert (
        main(["probe", str(ckpt), "probe.kinds=[linear]", "probe.epochs=1", "-o", str(probe_dir)])
        == 0
    )
    out = tmp_path / "maps"
    (out / "cam").mkdir(parents=True)
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"precious")
    os.symlink(victim, out / "cam" / "val_0000.png")
    head = probe_dir / "linear_head.safetensors"
    args = ["heatmaps", str(ckpt), "--head", str(head), "--num", "2", "-o", str(out)]
    assert main(args) == 0
    assert victim.read_bytes() == b"precious"
    assert not (out / "cam" / "val_0000.png").is_symlink()


def test_a_control_character_in_run_dir_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"run_dir"):
        load_config("demo", [*tiny_settings(tmp_path), "run_dir=runs/a\x1b[2Jb"])
