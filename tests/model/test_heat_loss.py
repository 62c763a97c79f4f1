"""Tests for heatssl.model.heat_loss: the residual against a plain-loop reference, scale, shapes."""

from __future__ import annotations

import pytest
import torch

from heatssl.errors import ArgumentError
from heatssl.model.heat import HeatPredictor
from heatssl.model.heat_loss import HeatLoss
from tests.model.references import STEPS, _commuting_pair, reference_heat_loss

# --------------------------------------------------------------------------- HeatLoss


@pytest.mark.parametrize("step", STEPS)
def test_heat_loss_matches_loop_reference(step):
    torch.manual_seed(0)
    loss_fn = HeatLoss(dim=3, step=step)
    loss_fn.operators.A.data = torch.randn(3, 3) * 0.3
    loss_fn.operators.B.data = torch.randn(3, 3) * 0.3
    z = torch.randn(2, 3, 2, 3)
    expected = reference_heat_loss(z, loss_fn.operators.A, loss_fn.operators.B, step)
    assert loss_fn(z).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("shape", [(2, 4, 3, 5), (1, 4, 6, 2)])
def test_heat_loss_zero_on_exact_solution(shape):
    n, d, h, w = shape
    a, b = _commuting_pair(d, seed=1)
    torch.manual_seed(2)
    z = torch.empty(n, d, h, w, dtype=torch.float64)
    row = torch.randn(n, d, dtype=torch.float64)  # z(0, 0)
    eye = torch.eye(d, dtype=torch.float64)
    for y in range(h):
        v = row
        for x in range(w):
            z[:, :, y, x] = v
            v = v @ (eye + a).T
        row = row @ (eye + b).T
    loss_fn = HeatLoss(dim=d, step="euler")  # z + A z: the first-order equations' own steps
    loss_fn.operators.A.data, loss_fn.operators.B.data = a.float(), b.float()
    assert loss_fn(z).item() < 1e-6
    # swapping the axes' operators breaks the solution: the test can fail
    swapped = HeatLoss(dim=d)
    swapped.operators.A.data, swapped.operators.B.data = b.float(), a.float()
    assert swapped(z).item() > 1e-4


def test_heat_loss_positive_on_random_features():
    torch.manual_seed(0)
    loss = HeatLoss(dim=8)(torch.randn(2, 8, 4, 4))
    assert loss.ndim == 0 and loss.item() > 0.1


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("c", [0.1, 10.0, 100.0, 1e3])
def test_heat_loss_is_scale_free_for_both_step_rules(step, c):
    """Growing or shrinking the features cannot win (the normalized rule once lost 5.7 -> 0.81)."""
    torch.manual_seed(0)
    loss_fn = HeatLoss(dim=8, step=step)
    loss_fn.operators.A.data = torch.randn(8, 8) * 0.2
    loss_fn.operators.B.data = torch.randn(8, 8) * 0.2
    z = torch.randn(2, 8, 4, 5)
    assert loss_fn(c * z).item() == pytest.approx(loss_fn(z).item(), rel=5e-3)


@pytest.mark.parametrize("step", STEPS)
def test_a_constant_added_to_the_features_cannot_win(step):
    """A per-channel offset (a norm layer's bias) once took the loss 0.81 -> 0.0005 for free."""
    torch.manual_seed(0)
    loss_fn = HeatLoss(dim=8, step=step)  # A = B = 0: the loss sees only the map itself
    z = torch.randn(2, 8, 4, 5)
    offset = torch.randn(1, 8, 1, 1)
    base = loss_fn(z).item()
    for size in (3.0, 10.0, 100.0):
        assert loss_fn(z + size * offset).item() == pytest.approx(base, rel=1e-4)
    constant = offset.expand(2, 8, 4, 5) * 5.0
    assert loss_fn(constant).item() == pytest.approx(1.0, rel=1e-3)  # the worst score, not 0


@pytest.mark.parametrize("shape", [(2, 4, 1, 5), (2, 4, 5, 1), (4, 3, 3), (1, 2, 4, 3, 3)])
def test_heat_loss_rejects_bad_shapes(shape):
    with pytest.raises(ArgumentError, match=r"h, w >= 2"):
        HeatLoss(dim=4)(torch.randn(*shape))


def test_heat_loss_needs_dim_or_operators():
    with pytest.raises(ArgumentError, match="dim"):
        HeatLoss()


def test_heat_loss_shares_operators():
    predictor = HeatPredictor(4)
    loss_fn = HeatLoss(operators=predictor.operators)
    assert loss_fn.operators.A is predictor.operators.A
    assert loss_fn.operators.B is predictor.operators.B


def test_heat_loss_standalone_training_lowers_loss():
    torch.manual_seed(0)
    loss_fn = HeatLoss(dim=8)
    assert {name for name, p in loss_fn.named_parameters() if p.requires_grad} == {
        "operators.A",
        "operators.B",
    }
    z = torch.randn(2, 8, 5, 5)
    opt = torch.optim.Adam(loss_fn.parameters(), lr=0.05)
    losses = []
    for _ in range(15):
        loss = loss_fn(z)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
