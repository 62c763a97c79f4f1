"""The timm adapter: grids of CNNs and ViTs, size checks in the adapter's own words, re-striding."""

import copy

import pytest
import torch
from torch import nn

from heatssl.errors import ArgumentError
from heatssl.model.backbone import Backbone, CentreTapConv2d, restride, use_centre_taps


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
    with pytest.raises(ArgumentError, match=r"name='resnet19'.*Close names: .*resnet18"):
        Backbone("resnet19", image_size=64)


def test_size_not_divisible_names_nearest_sizes():
    with pytest.raises(ArgumentError, match=r"image_size=100.*multiple of 2 x 32 = 64.*128, 192"):
        Backbone("test_resnet", image_size=100)


def test_block_grid_too_small_names_the_fixes_in_argument_names():
    with pytest.raises(ArgumentError) as err:
        Backbone("test_resnet", image_size=64)
    msg = str(err.value)
    assert "1x1" in msg and "at least 2x2" in msg
    assert "Fix: image_size=128 or 192" in msg
    assert "; or output_stride=16" in msg
    assert "; or stage=-2" in msg
    assert "model." not in msg and "data." not in msg  # config keys are the config layer's words


def test_bad_stage_stride_and_unsupported_argument():
    with pytest.raises(ArgumentError, match=r"^stage=7 does not exist"):
        Backbone("test_resnet", stage=7)
    with pytest.raises(ArgumentError, match=r"^output_stride=12 is not allowed"):
        Backbone("test_resnet", output_stride=12)
    with pytest.raises(ArgumentError, match="output_stride"):
        Backbone("test_vit", image_size=32, output_stride=16)


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
    with pytest.raises(ArgumentError, match="output_stride"):
        restride(Backbone("test_vit", image_size=64), 8)


@pytest.mark.parametrize(
    ("name", "stage", "size"), [("test_convnext", -1, 64), ("test_resnet", -2, 64)]
)
def test_every_kept_parameter_reaches_the_grid(name, stage, size):
    """DDP refuses parameters no loss reaches: timm prunes what lies past the stage."""
    backbone = Backbone(name, stage=stage, image_size=size, check_size=False)
    backbone(torch.randn(2, 3, size // 2, size // 2)).float().square().mean().backward()
    unused = [n for n, p in backbone.named_parameters() if p.grad is None]
    assert not unused
    if stage == -2:
        assert not any(n.startswith("model.layer4") for n, _ in backbone.named_parameters())


def test_a_vit_s_kept_quarter_keeps_its_positions_in_the_whole_image():
    """The quarter's tokens (patches + positions, before the blocks) equal the same patches' tokens
    in the whole image; without the quadrant they get the squeezed whole table instead."""
    from heatssl.model.quadrants import crop_quadrant

    torch.manual_seed(0)
    backbone = Backbone("test_vit", image_size=32, patch_size=4).eval()
    seen = []
    backbone.model.norm_pre.register_forward_hook(lambda m, i, o: seen.append(o))
    images, q = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    prefix = backbone.model.num_prefix_tokens
    with torch.no_grad():
        backbone(images)
        backbone(crop_quadrant(images, q), quadrant=q)
        backbone(crop_quadrant(images, q))
    whole, own, squeezed = seen
    grid = whole[:, prefix:].reshape(4, 8, 8, -1)
    for i, quadrant in enumerate(q.tolist()):
        y0, x0 = 4 * (quadrant >= 2), 4 * (quadrant % 2)
        expected = grid[i, y0 : y0 + 4, x0 : x0 + 4].reshape(16, -1)
        torch.testing.assert_close(own[i, prefix:], expected)
        torch.testing.assert_close(own[i, :prefix], whole[i, :prefix])  # the class token
        assert (squeezed[i, prefix:] - expected).abs().max() > 1e-2
    assert backbone._quadrant is None  # the quadrant lasts one forward


def test_cnns_ignore_the_quadrant():
    torch.manual_seed(0)
    backbone = Backbone("test_resnet", image_size=64, output_stride=16).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(backbone(x), backbone(x, quadrant=torch.tensor([1, 3])))
    assert not backbone.has_position_table


@pytest.mark.parametrize(("stride", "size"), [(16, 32), (16, 64), (8, 32)])
def test_dilated_convs_run_as_centre_taps_with_the_same_numbers_and_gradients(stride, size):
    """Dilated convs on maps within their dilation skip the taps that read padding: exact."""
    torch.manual_seed(0)
    fast = Backbone("resnet18", output_stride=stride, check_size=False).train()
    swapped = [m for m in fast.modules() if isinstance(m, CentreTapConv2d)]
    assert swapped and all(max(m.dilation) > 1 for m in swapped)
    plain = copy.deepcopy(fast)
    for m in plain.modules():
        if isinstance(m, CentreTapConv2d):
            m.__class__ = nn.Conv2d
    x = torch.randn(4, 3, size, size)
    out_fast, out_plain = fast(x), plain(x)
    # 32 px at stride 16: a 2 x 2 grid in layer4 (dilation 2), every swapped conv on its short path
    assert out_fast.shape == out_plain.shape
    assert torch.allclose(out_fast, out_plain, atol=1e-4, rtol=1e-4)
    out_fast.pow(2).mean().backward()
    out_plain.pow(2).mean().backward()
    for (name, a), b in zip(fast.named_parameters(), plain.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-3), name
    assert fast.state_dict().keys() == plain.state_dict().keys()
    assert use_centre_taps(Backbone("resnet18", check_size=False)) == 0  # undilated: none


def test_centre_taps_save_the_work_on_a_two_by_two_grid():
    """The short path runs: a 3 x 3 conv with dilation 2 on 2 x 2 uses only its centre weights."""
    conv = torch.nn.Conv2d(4, 5, 3, padding=2, dilation=2)
    assert use_centre_taps(torch.nn.Sequential(conv)) == 1 and isinstance(conv, CentreTapConv2d)
    x = torch.randn(2, 4, 2, 2)
    with torch.no_grad():
        conv.weight[:, :, 0, 0] = float("nan")  # an off-centre tap: must never be read on 2 x 2
        assert torch.isfinite(conv(x)).all()
        assert not torch.isfinite(conv(torch.randn(2, 4, 3, 3))).all()  # 3 x 3: the full kernel
