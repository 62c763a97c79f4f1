"""Tests for heatssl.model.heat: extrapolation against a plain-loop reference, operators, commutator."""

from __future__ import annotations

import pytest
import torch

from heatssl.errors import ArgumentError
from heatssl.model.heat import (
    HeatOperators,
    HeatPredictor,
    MaskTokenPredictor,
    channel_standardize,
    commutator_penalty,
)
from heatssl.model.quadrants import QUADRANTS, crop_quadrant, quadrant_mask
from tests.model.references import STEPS, _commuting_pair, _predictor, reference_predict

# --------------------------------------------------------------------------- HeatPredictor


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("quadrant", [0, 1, 2, 3])
def test_predictor_matches_loop_reference(step, quadrant):
    predictor = _predictor(step, seed=quadrant)
    block = torch.randn(2, 3, 2, 3, dtype=torch.float64)
    out = predictor(block, quadrant)
    ref = reference_predict(
        block, [quadrant] * 2, predictor.operators.A, predictor.operators.B, step
    )
    assert out.shape == (2, 3, 4, 6)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("step", STEPS)
def test_predictor_mixed_quadrants_in_one_batch(step):
    predictor = _predictor(step, seed=7)
    block = torch.randn(5, 3, 2, 3, dtype=torch.float64)
    q = torch.tensor([3, 0, 2, 1, 1])
    out = predictor(block, q)
    ref = reference_predict(block, q.tolist(), predictor.operators.A, predictor.operators.B, step)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", QUADRANTS)
def test_predictor_accepts_quadrant_names(name):
    predictor = _predictor("euler", seed=3)
    block = torch.randn(2, 3, 3, 2, dtype=torch.float64)
    by_name = predictor(block, name)
    qid = QUADRANTS.index(name)
    ref = reference_predict(
        block, [qid, qid], predictor.operators.A, predictor.operators.B, "euler"
    )
    torch.testing.assert_close(by_name, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(by_name, predictor(block, torch.full((2,), qid)), rtol=0, atol=0)


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("quadrant", [0, 1, 2, 3])
def test_zero_operators_copy_the_border_outward(step, quadrant):
    torch.manual_seed(quadrant)
    h, w = 2, 3
    predictor = HeatPredictor(4, step=step, init="zeros")
    block = torch.randn(2, 4, h, w)
    out = predictor(block, quadrant)
    right, bottom = quadrant % 2 == 1, quadrant >= 2
    expected = torch.empty(2, 4, 2 * h, 2 * w)
    for y in range(2 * h):
        for x in range(2 * w):
            by = min(max(y - h, 0), h - 1) if bottom else min(y, h - 1)
            bx = min(max(x - w, 0), w - 1) if right else min(x, w - 1)
            expected[:, :, y, x] = block[:, :, by, bx]
    assert torch.equal(out, expected)


def test_kept_block_is_unchanged_in_its_quadrant():
    predictor = _predictor("normalized", seed=1, scale=1.0)
    block = torch.randn(4, 3, 2, 3, dtype=torch.float64)
    q = torch.tensor([0, 1, 2, 3])
    out = predictor(block, q)
    assert torch.equal(crop_quadrant(out, q), block)
    # and the other quadrants were really extrapolated (not copies) with these operators
    other = crop_quadrant(out, (q + 1) % 4)
    assert not torch.allclose(other, block)


def test_predictor_gradients_reach_operators_and_block():
    torch.manual_seed(0)
    predictor = HeatPredictor(3, init="random")
    block = torch.randn(2, 3, 2, 3, requires_grad=True)
    predictor(block, torch.tensor([1, 2])).pow(2).sum().backward()
    for g in (predictor.operators.A.grad, predictor.operators.B.grad, block.grad):
        assert g is not None and g.abs().sum() > 0


# --------------------------------------------------------------------------- HeatOperators


def test_operators_validate_arguments():
    with pytest.raises(ArgumentError, match="step"):
        HeatOperators(4, step="rk4")
    with pytest.raises(ArgumentError, match="init"):
        HeatOperators(4, init="ones")


def test_operators_init_and_trainable():
    torch.manual_seed(0)
    zeros = HeatOperators(4, init="zeros")
    assert torch.equal(zeros.A, torch.zeros(4, 4)) and torch.equal(zeros.B, torch.zeros(4, 4))
    assert zeros.A.requires_grad and zeros.B.requires_grad
    rand = HeatOperators(4, init="random")
    assert rand.A.abs().sum() > 0 and rand.B.abs().sum() > 0 and not torch.equal(rand.A, rand.B)
    frozen = HeatOperators(4, init="random", trainable=False)
    assert not frozen.A.requires_grad and not frozen.B.requires_grad


def test_channel_standardize_is_per_vector():
    torch.manual_seed(0)
    z = torch.randn(2, 5, 3, 4, dtype=torch.float64) * 3 + 1
    s = channel_standardize(z)
    torch.testing.assert_close(s.mean(dim=1), torch.zeros(2, 3, 4, dtype=torch.float64))
    var = s.var(dim=1, unbiased=False)
    expected = z.var(dim=1, unbiased=False) / (z.var(dim=1, unbiased=False) + 1e-5)
    torch.testing.assert_close(var, expected)


# --------------------------------------------------------------------------- commutator


def test_commutator_penalty_by_hand():
    torch.manual_seed(0)
    a, b = torch.randn(3, 3, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    total = 0.0
    for i in range(3):
        for j in range(3):
            ab = sum(a[i, k].item() * b[k, j].item() for k in range(3))
            ba = sum(b[i, k].item() * a[k, j].item() for k in range(3))
            total += (ab - ba) ** 2
    assert total > 1e-3
    assert commutator_penalty(a, b).item() == pytest.approx(total, rel=1e-12)
    ops = HeatOperators(3).double()
    ops.A.data, ops.B.data = a, b
    assert ops.commutator().item() == pytest.approx(total, rel=1e-12)
    assert HeatPredictor(3).commutator().item() == 0.0


def test_commutator_probe_estimate_is_unbiased():
    torch.manual_seed(0)
    a, b = torch.randn(64, 64) / 8, torch.randn(64, 64) / 8
    exact = commutator_penalty(a, b).item()
    estimates = torch.stack([commutator_penalty(a, b, probes=16) for _ in range(400)])
    assert estimates.mean().item() == pytest.approx(exact, rel=0.05)
    assert estimates.std().item() > 0  # it is an estimate, not the exact value again
    c, d = _commuting_pair(5)
    assert commutator_penalty(c, d, probes=8).item() < 1e-20


def test_commutator_probe_estimate_has_gradients():
    ops = HeatOperators(16, init="random")
    ops.commutator(probes=4).backward()
    assert ops.A.grad.abs().sum() > 0 and ops.B.grad.abs().sum() > 0


def test_commutator_penalty_zero_for_commuting():
    a, b = _commuting_pair(5)
    assert commutator_penalty(a, b).item() < 1e-20
    diag_a, diag_b = torch.diag(torch.randn(4)), torch.diag(torch.randn(4))
    assert commutator_penalty(diag_a, diag_b).item() == 0.0


# --------------------------------------------------------------------------- MaskTokenPredictor


def test_mask_token_cells_can_be_told_apart_on_any_grid():
    """One identical token everywhere left interior cells of grids > 2 x 2 indistinguishable."""
    predictor = MaskTokenPredictor(8)
    out = predictor(torch.randn(1, 8, 3, 3), 0)  # a 6 x 6 grid, 27 masked cells
    cells = out[0].flatten(1).T[quadrant_mask(torch.tensor([0]), 6, 6).flatten().bool()]
    assert len(cells) == 27 and len(torch.unique(cells, dim=0)) == 27


def test_mask_token_predictor():
    torch.manual_seed(0)
    predictor = MaskTokenPredictor(3)
    block = torch.randn(4, 3, 2, 3)
    q = torch.tensor([1, 3, 0, 2])
    out = predictor(block, q)
    assert out.shape == (4, 3, 4, 6)
    assert torch.equal(crop_quadrant(out, q), block)
    token = predictor.mask_token.detach().view(1, 3, 1, 1)
    fill = (token + predictor.positions(4, 6, block.device, block.dtype)).expand(4, 3, 4, 6)
    masked = quadrant_mask(q, 4, 6).bool().expand(4, 3, 4, 6)
    assert torch.equal(out[masked], fill[masked])
    assert torch.equal(predictor(block, "bottom_left"), predictor(block, torch.full((4,), 2)))
    out.sum().backward()
    # every sample has 3 masked quadrants of 2 x 3 cells, each holding the token once
    torch.testing.assert_close(predictor.mask_token.grad, torch.full((3,), 4 * 3 * 6.0))


@pytest.mark.parametrize("step", STEPS)
def test_predictor_is_homogeneous_for_both_step_rules(step):
    """Rescaled features extrapolate to the rescaled grid, as the scale-free heat loss assumes."""
    predictor = _predictor(step, d=4, seed=3)
    block = torch.randn(2, 4, 2, 3, dtype=torch.float64)
    q = torch.tensor([1, 2])
    for c in (0.5, 10.0, 100.0):  # (layer_norm's eps of 1e-5 bends it for far smaller maps)
        got, want = predictor(c * block, q), c * predictor(block, q)
        assert torch.allclose(got, want, rtol=2e-3, atol=2e-3 * c)
