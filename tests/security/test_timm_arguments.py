"""Nothing in a file reaches timm.create_model but architecture arguments, and a timm folder's
weights come from its model.safetensors only: no pickle, no download, no path of the file's choosing."""

import json
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from heatssl.cli import main
from heatssl.config import load_config
from heatssl.errors import ArgumentError, CheckpointError, ConfigError
from heatssl.model.backbone import Backbone
from heatssl.runs.sources import load_exported_backbone
from heatssl.runs.timm_folder import export_timm


class Boom:
    def __reduce__(self):
        return (print, ("heatssl-test: pickled code ran",))


def _export_with(export, tmp_path, **meta_changes):
    tensors = load_file(str(export))
    from safetensors import safe_open

    with safe_open(str(export), framework="pt") as f:
        meta = dict(f.metadata())
    kwargs = json.loads(meta["create_kwargs"])
    kwargs.update(meta_changes.pop("create_kwargs", {}))
    meta["create_kwargs"] = json.dumps(kwargs)
    meta.update(meta_changes)
    path = tmp_path / "hostile.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize(
    "kwargs",
    [
        {"checkpoint_path": "PICKLE"},
        {"pretrained": True},
        {"pretrained_cfg_overlay": {"file": "PICKLE"}},
        {"cache_dir": "/tmp/x"},
    ],
)
def test_an_exports_metadata_cannot_name_files_downloads_or_pickles(real_run, tmp_path, kwargs):
    pickle = tmp_path / "evil.pth"
    torch.save({"state_dict": Boom()}, pickle)
    kwargs = json.loads(json.dumps(kwargs).replace("PICKLE", str(pickle)))
    path = _export_with(real_run[1], tmp_path, create_kwargs=kwargs)
    start = time.monotonic()
    with pytest.raises(
        (ArgumentError, CheckpointError), match=rf"{next(iter(kwargs))}.*not allowed"
    ):
        load_exported_backbone(path)
    assert time.monotonic() - start < 10  # never tried the Hub


def test_create_kwargs_that_is_not_a_mapping_is_one_line(real_run, tmp_path, capsys):
    path = _export_with(real_run[1], tmp_path)
    tensors = load_file(str(path))
    save_file(tensors, str(path), metadata={**_meta(path), "create_kwargs": "[1, 2]"})
    assert main(["probe", str(path), "-c", "demo", "probe.kinds=[knn]"]) == 2
    assert "create_kwargs" in capsys.readouterr().err


def _meta(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


@pytest.mark.parametrize(
    "override", ["model.kwargs.checkpoint_path=/tmp/x.pth", "model.kwargs.pretrained_cfg={}"]
)
def test_a_configs_model_kwargs_are_architecture_arguments_only(override):
    """A YAML recipe or a checkpoint's stored config (loaded through the same function)."""
    with pytest.raises(ConfigError, match=r"model\.kwargs\..*not allowed.*Allowed"):
        load_config("demo", [override])
    with pytest.raises(ArgumentError, match=r"not allowed"):
        Backbone("test_resnet", checkpoint_path="/tmp/x.pth")


@pytest.fixture
def timm_folder(real_run, tmp_path):
    return export_timm(real_run[0], tmp_path / "folder")


def test_a_timm_folder_without_model_safetensors_is_refused(timm_folder, tmp_path, capsys):
    """timm falls back to pytorch_model.bin, a pickle."""
    (timm_folder / "model.safetensors").unlink()
    torch.save({"x": Boom()}, timm_folder / "pytorch_model.bin")
    assert main(["probe", f"local-dir:{timm_folder}", "-c", "demo", "probe.kinds=[knn]"]) == 2
    err = capsys.readouterr()
    assert "model.safetensors" in err.err and "pickled code ran" not in err.out


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda c: "{not json", "not valid JSON"),
        (lambda c: {**c, "architecture": "resnet18"}, "do not fit"),
        (lambda c: {**c, "model_args": {**c["model_args"], "checkpoint_path": "x"}}, "not allowed"),
        (lambda c: {**c, "architecture": "no_such_model"}, "not a timm model"),
    ],
)
def test_a_timm_folders_config_json_is_checked(timm_folder, change, expected, capsys):
    config = json.loads((timm_folder / "config.json").read_text())
    changed = change(config)
    text = changed if isinstance(changed, str) else json.dumps(changed)
    (timm_folder / "config.json").write_text(text)
    assert main(["probe", f"local-dir:{timm_folder}", "-c", "demo", "probe.kinds=[knn]"]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_missing_local_dir_in_an_exports_model_name_is_one_line(real_run, tmp_path, capsys):
    path = _export_with(real_run[1], tmp_path, model_name=f"local-dir:{tmp_path / 'gone'}")
    assert main(["probe", str(path), "-c", "demo", "probe.kinds=[knn]"]) == 2
    err = capsys.readouterr().err
    assert "model_name" in err and "Traceback" not in err
    shutil.rmtree(tmp_path / "gone", ignore_errors=True)
