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
