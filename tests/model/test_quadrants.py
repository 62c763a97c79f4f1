"""Tests for heatssl.model.quadrants: ids from names and tensors, crops, placement and masks."""

from __future__ import annotations

import pytest
import torch

from heatssl.errors import ArgumentError
from heatssl.model.heat import HeatPredictor
from heatssl.model.quadrants import (
    crop_quadrant,
    place_block,
    quadrant_ids,
    quadrant_mask,
)

# --------------------------------------------------------------------------- quadrant helpers


def test_quadrant_ids_forms():
    assert quadrant_ids(2, 3, torch.device("cpu")).tolist() == [2, 2, 2]
    assert quadrant_ids("bottom_right", 2, torch.device("cpu")).tolist() == [3, 3]
    assert quadrant_ids("top_right", 1, torch.device("cpu")).dtype == torch.long
    q = quadrant_ids(torch.tensor([0, 3, 1]), 3, torch.device("cpu"))
    assert q.tolist() == [0, 3, 1] and q.dtype == torch.long


@pytest.mark.parametrize(
    "quadrant, batch",
    [
        ("top", 2),
        ("TOP_LEFT", 2),
        (4, 2),
        (-1, 2),
        (torch.tensor([0, 5]), 2),
        (torch.tensor([0, 1]), 3),
    ],
)
def test_quadrant_ids_reject_bad_values(quadrant, batch):
    with pytest.raises(ArgumentError, match="quadrant"):
        quadrant_ids(quadrant, batch, torch.device("cpu"))


def test_bad_quadrant_name_lists_allowed_names():
    with pytest.raises(ArgumentError, match="top_left"):
        HeatPredictor(2)(torch.randn(1, 2, 2, 2), "middle")


def test_crop_quadrant_and_place_block():
    torch.manual_seed(0)
    x = torch.randn(4, 2, 4, 6)
    q = torch.tensor([2, 0, 3, 1])
    crops = crop_quadrant(x, q)
    assert crops.shape == (4, 2, 2, 3)
    for n, qid in enumerate(q.tolist()):
        y0, x0 = (2 if qid >= 2 else 0), (3 if qid % 2 else 0)
        assert torch.equal(crops[n], x[n, :, y0 : y0 + 2, x0 : x0 + 3])
    block = torch.randn(4, 2, 2, 3)
    placed = place_block(block, q, x)
    for n, qid in enumerate(q.tolist()):
        expected = x[n].clone()
        y0, x0 = (2 if qid >= 2 else 0), (3 if qid % 2 else 0)
        expected[:, y0 : y0 + 2, x0 : x0 + 3] = block[n]
        assert torch.equal(placed[n], expected)
    assert torch.equal(crop_quadrant(placed, q), block)


def test_quadrant_mask():
    q = torch.tensor([0, 1, 2, 3])
    mask = quadrant_mask(q, 4, 6)
    assert mask.shape == (4, 1, 4, 6) and mask.dtype == torch.float32
    for n, qid in enumerate(q.tolist()):
        y0, x0 = (2 if qid >= 2 else 0), (3 if qid % 2 else 0)
        expected = torch.ones(1, 4, 6)
        expected[:, y0 : y0 + 2, x0 : x0 + 3] = 0
        assert torch.equal(mask[n], expected)
