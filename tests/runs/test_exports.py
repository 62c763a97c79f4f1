"""Backbone export: a safetensors file plain timm loads with identical features, and nothing else."""

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from heatssl.errors import CheckpointError
from heatssl.model.backbone import Backbone
from heatssl.runs.exports import export_backbone
from heatssl.runs.files import describe_file
from heatssl.runs.sources import load_exported_backbone, read_export_metadata


@pytest.mark.parametrize(
    ("name", "kwargs", "size"),
    [("test_resnet", {"output_stride": 16}, 64), ("test_vit", {"patch_size": 8}, 64)],
)
def test_export_loads_in_plain_timm_with_identical_features(tmp_path, name, kwargs, size):
    torch.manual_seed(0)
    backbone = Backbone(name, image_size=size, **kwargs)
    with torch.no_grad():  # make the weights differ from any fresh initialisation
        for p in backbone.parameters():
            p.add_(0.01 * torch.randn_like(p))
    backbone.eval()
    path = export_backbone(backbone, tmp_path / "backbone.safetensors")
    meta = read_export_metadata(path)
    assert meta["model_name"] == name and meta["stage"] == backbone.stage

    plain = timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **meta["create_kwargs"]
    ).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ours = backbone(x)
        theirs = plain.forward_intermediates(
            x, indices=[backbone.stage], norm=backbone.is_last, intermediates_only=True
        )[0]
        reloaded = load_exported_backbone(path, image_size=size).eval()(x)
    torch.testing.assert_close(theirs, ours)
    torch.testing.assert_close(reloaded, ours)


def test_foreign_safetensors_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(1)}, str(path))
    with pytest.raises(CheckpointError, match="not a heatssl backbone export"):
        read_export_metadata(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_export_metadata(tmp_path / "nowhere.safetensors")
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_exported_backbone(tmp_path / "text.safetensors")


def test_a_pruned_backbone_exports_to_the_full_timm_model(tmp_path):
    backbone = Backbone("test_convnext", image_size=128).eval()  # head.norm pruned
    assert not any(n.startswith("model.head.norm") for n, _ in backbone.named_parameters())
    path = export_backbone(backbone, tmp_path / "b.safetensors")
    meta = read_export_metadata(path)
    plain = timm.create_model(
        "test_convnext", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))
    ).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        theirs = plain.forward_intermediates(x, indices=[backbone.stage], intermediates_only=True)
        ours = load_exported_backbone(path, image_size=128).eval()(x)
    torch.testing.assert_close(theirs[0], ours)
    assert meta["stage"] == backbone.stage


def test_a_cut_or_empty_export_is_refused_as_truncated(tmp_path):
    good = export_backbone(Backbone("test_resnet", image_size=128), tmp_path / "b.safetensors")
    data = good.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    for cut in (40, header_end + 100, len(data) - 1):  # inside the header, early data, last byte
        cut_file = tmp_path / "cut.safetensors"
        cut_file.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as caught:
            load_exported_backbone(cut_file)
        message = str(caught.value)
        assert f"cut.safetensors is truncated: it ends after {cut} of the " in message
        assert "cut short" in message and "heatssl export" in message
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty \(0 bytes\).*heatssl export"):
        read_export_metadata(tmp_path / "empty.safetensors")
    torch.save({"w": torch.zeros(2)}, tmp_path / "ckpt.safetensors")  # torch.save, wrong name
    with pytest.raises(CheckpointError, match=r"it is a PyTorch checkpoint \(torch.save\)"):
        read_export_metadata(tmp_path / "ckpt.safetensors")


def test_an_export_whose_weights_are_of_another_architecture_is_refused(tmp_path):
    resnet = export_backbone(Backbone("test_resnet", image_size=128), tmp_path / "r.safetensors")
    vit = export_backbone(Backbone("test_vit", image_size=64), tmp_path / "v.safetensors")
    with safe_open(str(resnet), framework="pt") as f:
        resnet_meta = f.metadata()
    save_file(load_file(str(vit)), str(tmp_path / "mixed.safetensors"), metadata=resnet_meta)
    with pytest.raises(CheckpointError) as caught:
        load_exported_backbone(tmp_path / "mixed.safetensors")
    message = str(caught.value)
    assert "mixed.safetensors: its weights do not fit the model its metadata names" in message
    assert "(test_resnet with " in message and "missing" in message
    assert "another architecture" in message


def test_describe_file_names_what_a_wrong_file_is(tmp_path):
    cases = {
        "page.bin": (b"<!DOCTYPE html><html>", "an HTML page"),
        "lfs.bin": (
            b"version https://git-lfs.github.com/spec/v1\noid sha256:ab",
            "Git LFS pointer",
        ),
        "data.bin": (b"\x00\x01\x02\x03\xfe", "binary data of another format"),
        "notes.txt": (b"epoch,loss\n0,1.5\n", "a text file (it starts 'epoch,loss')"),
    }
    for name, (content, expected) in cases.items():
        (tmp_path / name).write_bytes(content)
        assert expected in describe_file(tmp_path / name)
    export = export_backbone(Backbone("test_resnet", image_size=128), tmp_path / "b.safetensors")
    assert describe_file(export) == "a heatssl backbone export (safetensors, `heatssl export`)"


# ----- which encoder of a run with an EMA teacher ------------------------------------------------
@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A tiny run trained with loss.target=both (its checkpoint holds student and teacher)."""
    from heatssl.cli import main
    from tests.helpers import tiny_settings

    folder = tmp_path_factory.mktemp("teacher_run")
    settings = [*tiny_settings(folder), "loss.target=both", "loss.teacher_momentum=0.9"]
    assert main(["pretrain", "-c", "demo", *settings]) == 0
    return folder / "checkpoints" / "last.ckpt"


def _encoder_weights(ckpt, which):
    from heatssl.runs.checkpoints import safe_torch_load

    prefix = {"student": "qbheat.backbone.model.", "teacher": "qbheat.teacher.backbone.model."}
    state = safe_torch_load(ckpt)["state_dict"]
    return {
        k.removeprefix(prefix[which]): v for k, v in state.items() if k.startswith(prefix[which])
    }


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_export_writes_the_chosen_encoder_and_says_which(teacher_run, tmp_path, which):
    from heatssl.cli import main

    out = tmp_path / f"{which}.safetensors"
    assert main(["export", str(teacher_run), "-o", str(out), "--encoder", which]) == 0
    exported, expected = load_file(out), _encoder_weights(teacher_run, which)
    for k, v in expected.items():
        torch.testing.assert_close(exported[k], v, rtol=0, atol=0)
    assert read_export_metadata(out)["model_name"] == "test_resnet"
    with safe_open(out, "pt") as f:
        assert f.metadata()["encoder"] == which
    other = _encoder_weights(teacher_run, "teacher" if which == "student" else "student")
    assert any(not torch.equal(exported[k], other[k]) for k in expected)  # they differ


def test_the_runs_loss_encoder_is_the_default_and_a_pixel_run_has_no_teacher(tmp_path, capsys):
    from heatssl.cli import main
    from heatssl.runs.sources import backbone_from_checkpoint
    from tests.helpers import tiny_settings

    settings = [*tiny_settings(tmp_path / "t"), "loss.target=teacher", "loss.encoder=teacher"]
    assert main(["pretrain", "-c", "demo", *settings]) == 0
    ckpt = tmp_path / "t" / "checkpoints" / "last.ckpt"
    backbone = backbone_from_checkpoint(ckpt)  # what probe, heatmaps and fine-tuning get
    assert all(p.requires_grad for p in backbone.parameters())  # trainable, though EMA-made
    for k, v in _encoder_weights(ckpt, "teacher").items():
        torch.testing.assert_close(backbone.model.state_dict()[k], v, rtol=0, atol=0)
    assert main(["export", str(ckpt)]) == 0
    with safe_open(tmp_path / "t" / "backbone.safetensors", "pt") as f:
        assert f.metadata()["encoder"] == "teacher"

    assert main(["pretrain", "-c", "demo", *tiny_settings(tmp_path / "p")]) == 0
    pixels = tmp_path / "p" / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    assert main(["export", str(pixels), "--encoder", "teacher"]) == 2
    assert "has no EMA teacher" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="allowed: 'student'"):
        backbone_from_checkpoint(pixels, "teacher")


def test_a_teacher_encoder_without_a_teacher_is_refused_in_the_config():
    from heatssl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"loss.encoder='teacher' must be 'student' when"):
        load_config("demo", ["loss.encoder=teacher"])
    assert (
        load_config("demo", ["loss.target=both", "loss.encoder=teacher"]).loss.encoder == "teacher"
    )
