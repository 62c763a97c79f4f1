"""The timm adapter: grids of CNNs and ViTs, size checks, and timm-loadable export."""

import pytest
import timm
import torch
from safetensors.torch import save_file

from heatssl.backbone import (
    Backbone,
    build_backbone,
    export_backbone,
    load_exported_backbone,
    read_export_metadata,
    restride,
)
from heatssl.config import CONFIG_DIR, ConfigError, load_config


@pytest.mark.parametrize(
    ("name", "kwargs", "size", "grid", "dim"),
    [
        ("test_resnet", {}, 128, (4, 4), 96),
        ("test_resnet", {"output_stride": 16}, 64, (4, 4), 96),
        ("test_vit", {"patch_size": 8}, 64, (8, 8), 64),
    ],
)
def test_grid_shape_and_reduction(name, kwargs, size, grid, dim):
    backbone = Backbone(name, image_size=size, **kwargs)
    assert backbone.num_features == dim
    assert backbone.reduction == size // grid[0]
    out = backbone(torch.randn(2, 3, size, size))
    assert out.shape == (2, dim, *grid)
    # the quarter block gives half the grid on each side
    assert backbone(torch.randn(2, 3, size // 2, size // 2)).shape[-2:] == (
        grid[0] // 2,
        grid[1] // 2,
    )
    assert backbone.pooled(torch.randn(2, 3, size, size)).shape == (2, dim)


def test_vit_takes_any_grid_from_the_model():
    backbone = Backbone("test_vit", image_size=32, patch_size=4)
    assert backbone.create_kwargs["dynamic_img_size"] is True
    assert backbone(torch.randn(1, 3, 16, 24)).shape == (1, 64, 4, 6)  # non-square


def test_earlier_stage_is_finer():
    backbone = Backbone("test_resnet", stage=-2, image_size=64)
    assert backbone.reduction == 16
    assert backbone(torch.randn(1, 3, 64, 64)).shape[-2:] == (4, 4)


def test_unknown_backbone_names_close_matches():
    with pytest.raises(ConfigError, match=r"resnet19.*Close names: .*resnet18"):
        Backbone("resnet19", image_size=64)


def test_size_not_divisible_names_nearest_sizes():
    with pytest.raises(ConfigError, match=r"image_size=100.*multiple of 2 x 32 = 64.*128, 192"):
        Backbone("test_resnet", image_size=100)


def test_block_grid_too_small_names_the_fixes():
    with pytest.raises(ConfigError) as err:
        Backbone("test_resnet", image_size=64)
    msg = str(err.value)
    assert "1x1" in msg and "at least 2x2" in msg
    assert "data.image_size=128 or 192" in msg
    assert "model.output_stride=16" in msg
    assert "model.stage=-2" in msg


def test_bad_stage_and_unsupported_argument():
    with pytest.raises(ConfigError, match=r"model\.stage=7"):
        Backbone("test_resnet", stage=7)
    with pytest.raises(ConfigError, match="output_stride"):
        Backbone("test_vit", image_size=32, output_stride=16)


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
    with pytest.raises(ConfigError, match="not a heatssl backbone export"):
        read_export_metadata(path)


@pytest.mark.parametrize("recipe", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_recipe_fits_its_backbone(recipe):
    cfg = load_config(recipe)
    with torch.device("meta"):
        backbone = build_backbone(cfg.model, cfg.data.image_size)  # raises on a size misfit
    block = cfg.data.image_size // 2 // backbone.reduction
    assert block >= 2


def test_restride_keeps_the_weights_and_refines_the_grid():
    torch.manual_seed(0)
    coarse = Backbone("test_resnet", output_stride=16).eval()
    fine = restride(coarse, 8)
    assert restride(coarse, 16) is coarse  # already at that stride
    assert not fine.training and fine.create_kwargs["output_stride"] == 8
    for key, value in coarse.model.state_dict().items():
        assert torch.equal(value, fine.model.state_dict()[key]), key
    x = torch.randn(2, 3, 32, 32)
    assert coarse(x).shape[-2:] == (2, 2) and fine(x).shape[-2:] == (4, 4)
    back = restride(fine, 16)
    assert torch.allclose(back(x), coarse(x), atol=1e-6)  # same weights, same stride: same grid


def test_restride_a_vit_is_refused():
    with pytest.raises(ConfigError, match="output_stride"):
        restride(Backbone("test_vit", image_size=64), 8)
