"""Tests for heatssl.model.decoder: output shapes, widths and argument checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from heatssl.errors import ArgumentError
from heatssl.model.decoder import ConvDecoder


def _convs(decoder, kernel):
    return [m for m in decoder.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == kernel]


@pytest.mark.parametrize("reduction", [1, 2, 8, 32])
@pytest.mark.parametrize("grid", [(2, 3), (3, 2), (1, 1)])
def test_output_shape(reduction, grid):
    torch.manual_seed(0)
    h, w = grid
    decoder = ConvDecoder(in_dim=6, reduction=reduction, width=16, depth=1, min_width=4)
    out = decoder(torch.randn(2, 6, h, w))
    assert out.shape == (2, 3, h * reduction, w * reduction)
    assert torch.isfinite(out).all()
    assert decoder.reduction == reduction


def test_out_channels_option():
    decoder = ConvDecoder(in_dim=4, reduction=4, width=8, out_channels=1)
    assert decoder(torch.randn(2, 4, 2, 3)).shape == (2, 1, 8, 12)


@pytest.mark.parametrize("reduction", [0, -2, 3, 6, 12, 24])
def test_reduction_must_be_power_of_two(reduction):
    with pytest.raises(ArgumentError, match="power of two"):
        ConvDecoder(in_dim=4, reduction=reduction)


@pytest.mark.parametrize("depth", [0, 1, 3])
@pytest.mark.parametrize("blocks", [0, 1, 3, 9])
def test_width_depth_upsampling_and_min_width(depth, blocks):
    decoder = ConvDecoder(
        in_dim=10, reduction=32, width=64, depth=depth, upsample_blocks=blocks, min_width=16
    )
    (proj, to_pixels) = _convs(decoder, (1, 1))
    assert (proj.in_channels, proj.out_channels) == (10, 64)
    convs = _convs(decoder, (3, 3))
    used = min(blocks, 5)  # log2(32) factors of two at most
    assert len(convs) == depth + used  # depth blocks at grid resolution + one per upsampling
    assert [c.out_channels for c in convs[depth:]] == [32, 16, 16, 16, 16][:used]
    assert all(c.out_channels == 64 for c in convs[:depth])
    width = [64, 32, 16, 16, 16, 16][used]
    shuffle = 2 ** (5 - used)  # the pixel shuffle does the factors the blocks did not
    assert (to_pixels.in_channels, to_pixels.out_channels) == (width, 3 * shuffle * shuffle)
    ups = [m for m in decoder.modules() if isinstance(m, nn.Upsample)]
    assert len(ups) == used
    assert decoder(torch.randn(2, 10, 1, 2)).shape == (2, 3, 32, 64)


def test_negative_sizes_are_refused():
    with pytest.raises(ArgumentError, match=">= 0"):
        ConvDecoder(in_dim=4, reduction=4, upsample_blocks=-1)


def test_gradients_reach_input_and_all_parameters():
    torch.manual_seed(0)
    decoder = ConvDecoder(in_dim=4, reduction=4, width=8, depth=1, min_width=4)
    grid = torch.randn(2, 4, 2, 3, requires_grad=True)
    decoder(grid).pow(2).mean().backward()
    assert grid.grad is not None and grid.grad.abs().sum() > 0
    for name, p in decoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    ("norm", "independent"), [("group", True), ("none", True), ("batch", False)]
)
def test_norm_choice_decides_batch_independence(norm, independent):
    torch.manual_seed(0)
    dec = ConvDecoder(in_dim=8, reduction=4, width=16, norm=norm).train()
    grid = torch.randn(4, 8, 2, 2)
    whole = dec(grid)
    halves = torch.cat([dec(grid[:2]), dec(grid[2:])])
    assert torch.allclose(whole, halves, atol=1e-5) == independent


def test_unknown_norm_is_refused():
    with pytest.raises(ArgumentError, match=r"norm='layer'.*'batch', 'group', 'none'"):
        ConvDecoder(in_dim=8, reduction=4, norm="layer")
