"""Tests for heatssl.model.heads: the linear head's folded weights (exact CAMs) and the tran-1 head."""

from __future__ import annotations

import pytest
import torch

from heatssl.errors import ArgumentError
from heatssl.model.heads import Tran1Head
from tests.probing.synthetic import trained_linear_head

# ------------------------------------------------------------------------------- LinearHead.folded


@pytest.fixture(scope="module")
def trained_linear():
    return trained_linear_head()


def test_folded_matches_eval_logits(trained_linear):
    head, x = trained_linear
    assert head.bn.running_mean.abs().max() > 1.0  # BN statistics are far from (0, 1)
    assert (head.bn.running_var - 1).abs().max() > 1.0
    weight, bias = head.folded()
    assert weight.shape == (3, 8) and bias.shape == (3,)
    head.eval()
    with torch.no_grad():
        logits = head(x)
        torch.testing.assert_close(x @ weight.T + bias, logits, rtol=1e-5, atol=1e-4)


def test_folded_class_map_spatial_mean_is_logit_minus_bias(trained_linear):
    head, x = trained_linear
    gen = torch.Generator().manual_seed(9)
    z = torch.randn(5, 8, 3, 4, generator=gen) * 2 + x[:5, :, None, None]
    weight, bias = head.folded()
    head.eval()
    with torch.no_grad():
        cam = torch.einsum("ck,nkyx->ncyx", weight, z)
        logits = head(z.mean((2, 3)))
    assert cam.shape == (5, 3, 3, 4)
    torch.testing.assert_close(cam.mean((2, 3)), logits - bias, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------------------- tran-1


def test_tran1_head_shape_and_heads():
    head = Tran1Head(32, 5, tokens=6)
    assert head.block.attn.num_heads == 1  # default d // 64, at least 1
    grid = torch.randn(4, 32, 2, 3)
    head.eval()
    with torch.no_grad():
        out = head(grid)
        assert out.shape == (4, 5)
        # The tokens pass through the block: with positions, their order matters ...
        head.pos.normal_()
        assert not torch.allclose(head(grid), head(grid.flip(-1)), atol=1e-3)
        # ... without positions, the block and the token mean are permutation invariant.
        head.pos.zero_()
        torch.testing.assert_close(head(grid), head(grid.flip(-1)), rtol=1e-4, atol=1e-5)
    assert Tran1Head(128, 2, tokens=4).block.attn.num_heads == 2
    assert Tran1Head(32, 2, tokens=4, heads=4).block.attn.num_heads == 4


@pytest.mark.parametrize("heads", [3, 5])
def test_tran1_heads_must_divide_width(heads):
    with pytest.raises(ArgumentError, match=rf"^heads={heads} must divide the feature width 16"):
        Tran1Head(16, 2, tokens=4, heads=heads)
