"""Careless input gets one line and exit code 2, never a traceback."""

import json
import math
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from heatssl.cli import main
from heatssl.config import load_config
from heatssl.errors import CheckpointError, ConfigError
from heatssl.runs.head_files import load_head
from heatssl.runs.sources import load_exported_backbone
from tests.helpers import tiny_settings


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.max_time=.inf", "trainer.max_time"),
        ("trainer.checkpoint_every_n_minutes=.inf", "trainer.checkpoint_every_n_minutes"),
        ("trainer.limit_train_batches=-1", "trainer.limit_train_batches"),
        ("seed=-1", "seed"),
        ("trainer.precision=banana", "trainer.precision"),
        ("trainer.devices=-7", "trainer.devices"),
        ("data.num_workers=[1", "data.num_workers=[1"),  # a YAML error in an override
    ],
)
def test_bad_values_are_one_line_naming_the_key(override, key, capsys):
    assert main(["pretrain", "-c", "demo", override, "--print-config"]) == 2
    assert key in _one_line(capsys)


def test_limit_train_batches_1_means_one_batch():
    assert load_config("demo", ["trainer.limit_train_batches=1"]).trainer.limit_train_batches == 1
    assert isinstance(
        load_config(None, ["trainer.limit_train_batches=1"]).trainer.limit_train_batches, int
    )
    assert load_config(None, ["trainer.limit_train_batches=0.5"]).trainer.limit_train_batches == 0.5


def test_a_yaml_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("run_dir: caf\xe9\n".encode("latin-1"))
    assert main(["pretrain", "-c", str(recipe), "--print-config"]) == 2
    assert "UTF-8" in _one_line(capsys)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04cut", b"\x80\x04K\x01."])
def test_finetune_resume_from_a_broken_file_is_one_line(tmp_path, capsys, content):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(content)
    settings = [*tiny_settings(tmp_path / "run"), f"finetune.out_dir={tmp_path / 'ft'}"]
    assert main(["finetune", "test_resnet", "-c", "demo", *settings, f"--resume={bad}"]) == 2
    assert "bad.ckpt" in _one_line(capsys)


def test_an_export_whose_header_nests_deep_is_one_line(tmp_path, capsys):
    header = b'{"__metadata__": {"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    assert main(["probe", str(path), "-c", "demo", "probe.kinds=[knn]"]) == 2
    _one_line(capsys)


def test_a_head_whose_class_names_do_not_match_its_classes_is_refused(real_run, tmp_path):
    ckpt, _ = real_run
    out = tmp_path / "probe"
    assert main(["probe", str(ckpt), "probe.kinds=[linear]", "probe.epochs=1", "-o", str(out)]) == 0
    head = out / "linear_head.safetensors"
    from safetensors import safe_open

    with safe_open(str(head), framework="pt") as f:
        meta = dict(f.metadata())
    info = json.loads(meta["heatssl"])
    info["class_names"] = info["class_names"][:3]
    save_file(load_file(str(head)), str(head), metadata={"heatssl": json.dumps(info)})
    with pytest.raises(CheckpointError, match=r"3 class names.*10 classes"):
        load_head(head)


@pytest.mark.parametrize("poison", ["nan", "inf", "int"])
def test_exports_with_non_finite_or_integer_weights_are_refused(real_run, tmp_path, poison):
    from safetensors import safe_open

    _, export = real_run
    with safe_open(str(export), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(export))
    name = next(k for k, v in tensors.items() if v.is_floating_point() and v.dim() == 4)
    if poison == "int":
        tensors[name] = tensors[name].to(torch.int32)
    else:
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = math.nan if poison == "nan" else math.inf
    path = tmp_path / "poisoned.safetensors"
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match=name):
        load_exported_backbone(path)


def test_run_dir_must_be_a_folder_name():
    with pytest.raises(ConfigError, match=r"run_dir"):
        load_config("demo", ["run_dir= "])
