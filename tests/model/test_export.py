"""Backbone export: a safetensors file plain timm loads with identical features, and nothing else."""

import pytest
import timm
import torch
from safetensors.torch import save_file

from heatssl.errors import CheckpointError
from heatssl.model.backbone import Backbone
from heatssl.model.export import export_backbone, load_exported_backbone, read_export_metadata


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
