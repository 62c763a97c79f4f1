"""Tests for heatssl.heat: extrapolation against a plain-loop reference, the heat loss, helpers."""

from __future__ import annotations

import math

import pytest
import torch

from heatssl.heat import (
    QUADRANTS,
    HeatLoss,
    HeatOperators,
    HeatPredictor,
    MaskTokenPredictor,
    channel_standardize,
    commutator_penalty,
    crop_quadrant,
    place_block,
    quadrant_ids,
    quadrant_mask,
)

STEPS = ["euler", "normalized"]


# --------------------------------------------------------------------------- plain-loop references


def _vec(t, n, y, x):
    """Feature vector at (n, :, y, x) as a list of Python floats."""
    return [float(t[n, c, y, x]) for c in range(t.shape[1])]


def _f(v, step):
    """The step rule's input: the vector itself (euler) or its standardisation over channels."""
    if step == "euler":
        return list(v)
    mean = sum(v) / len(v)
    var = sum((a - mean) ** 2 for a in v) / len(v)
    return [(a - mean) / math.sqrt(var + 1e-5) for a in v]


def _rows(m):
    """A matrix as nested lists of Python floats (independent of torch from here on)."""
    return [[float(e) for e in row] for row in m.detach().tolist()]


def _matvec(m, v):
    d = len(v)
    return [sum(m[i][j] * v[j] for j in range(d)) for i in range(d)]


def _step(v, m, sign, step):
    mv = _matvec(m, _f(v, step))
    return [v[i] + sign * mv[i] for i in range(len(v))]


def reference_predict(block, quadrants, a, b, step):
    """Extrapolate each sample cell by cell: first along x over the kept rows, then along y."""
    n_batch, d, h, w = block.shape
    a, b = _rows(a), _rows(b)
    out = torch.zeros(n_batch, d, 2 * h, 2 * w, dtype=torch.float64)
    grid = {}
    for n in range(n_batch):
        q = int(quadrants[n])
        right, bottom = q in (1, 3), q in (2, 3)
        x0, y0 = (w if right else 0), (h if bottom else 0)
        grid.clear()
        for i in range(h):
            for j in range(w):
                grid[(y0 + i, x0 + j)] = _vec(block, n, i, j)
        # along x, across the kept rows, moving away from the block
        for y in range(y0, y0 + h):
            if right:
                for x in range(w - 1, -1, -1):
                    grid[(y, x)] = _step(grid[(y, x + 1)], a, -1.0, step)
            else:
                for x in range(w, 2 * w):
                    grid[(y, x)] = _step(grid[(y, x - 1)], a, 1.0, step)
        # then along y, over the full width
        for x in range(2 * w):
            if bottom:
                for y in range(h - 1, -1, -1):
                    grid[(y, x)] = _step(grid[(y + 1, x)], b, -1.0, step)
            else:
                for y in range(h, 2 * h):
                    grid[(y, x)] = _step(grid[(y - 1, x)], b, 1.0, step)
        for (y, x), v in grid.items():
            for c in range(d):
                out[n, c, y, x] = v[c]
    return out


def reference_heat_loss(z, a, b, step, eps=1e-8):
    """Scale-free residual loss with explicit loops over samples, cells and channels."""
    n_batch, _, h, w = z.shape
    a, b = _rows(a), _rows(b)

    def sq(v):
        return sum(t * t for t in v)

    rx = dx = ry = dy = zz = 0.0
    for n in range(n_batch):
        for y in range(h):
            for x in range(w):
                v = _vec(z, n, y, x)
                zz += sq(v)
                if x + 1 < w:
                    diff = [p - q for p, q in zip(_vec(z, n, y, x + 1), v, strict=True)]
                    pred = _matvec(a, _f(v, step))
                    dx += sq(diff)
                    rx += sq([p - q for p, q in zip(diff, pred, strict=True)])
                if y + 1 < h:
                    diff = [p - q for p, q in zip(_vec(z, n, y + 1, x), v, strict=True)]
                    pred = _matvec(b, _f(v, step))
                    dy += sq(diff)
                    ry += sq([p - q for p, q in zip(diff, pred, strict=True)])
    n_x, n_y, n_z = n_batch * h * (w - 1), n_batch * (h - 1) * w, n_batch * h * w
    return (rx / n_x + ry / n_y) / (dx / n_x + dy / n_y + zz / n_z + eps)


def _predictor(step, d=3, seed=0, scale=0.3):
    torch.manual_seed(seed)
    predictor = HeatPredictor(d, step=step).double()
    predictor.operators.A.data = torch.randn(d, d, dtype=torch.float64) * scale
    predictor.operators.B.data = torch.randn(d, d, dtype=torch.float64) * scale
    return predictor


def _commuting_pair(d, seed=0):
    """A random A and B = 0.5 A + 0.3 A^2 - 0.1 I (a polynomial in A, so AB = BA)."""
    torch.manual_seed(seed)
    a = torch.randn(d, d, dtype=torch.float64) * (0.2 / math.sqrt(d))
    b = 0.5 * a + 0.3 * a @ a - 0.1 * torch.eye(d, dtype=torch.float64)
    return a, b


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
    with pytest.raises(ValueError, match="step"):
        HeatOperators(4, step="rk4")
    with pytest.raises(ValueError, match="init"):
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
    loss_fn = HeatLoss(dim=d)
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


@pytest.mark.parametrize("c", [1e-3, 1e3])
def test_euler_heat_loss_is_scale_free(c):
    torch.manual_seed(0)
    loss_fn = HeatLoss(dim=8)
    loss_fn.operators.A.data = torch.randn(8, 8) * 0.2
    loss_fn.operators.B.data = torch.randn(8, 8) * 0.2
    z = torch.randn(2, 8, 4, 5)
    assert loss_fn(c * z).item() == pytest.approx(loss_fn(z).item(), rel=1e-3)


def test_normalized_heat_loss_not_won_by_shrinking():
    torch.manual_seed(0)
    loss_fn = HeatLoss(dim=8, step="normalized")
    loss_fn.operators.A.data = torch.randn(8, 8) * 0.2
    loss_fn.operators.B.data = torch.randn(8, 8) * 0.2
    z = torch.randn(2, 8, 4, 5)
    base = loss_fn(z).item()
    for c in (0.1, 0.01):
        assert loss_fn(c * z).item() >= base - 1e-6


@pytest.mark.parametrize("shape", [(2, 4, 1, 5), (2, 4, 5, 1), (4, 3, 3), (1, 2, 4, 3, 3)])
def test_heat_loss_rejects_bad_shapes(shape):
    with pytest.raises(ValueError, match=r"h, w >= 2"):
        HeatLoss(dim=4)(torch.randn(*shape))


def test_heat_loss_needs_dim_or_operators():
    with pytest.raises(ValueError, match="dim"):
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
    with pytest.raises(ValueError, match="quadrant"):
        quadrant_ids(quadrant, batch, torch.device("cpu"))


def test_bad_quadrant_name_lists_allowed_names():
    with pytest.raises(ValueError, match="top_left"):
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


# --------------------------------------------------------------------------- MaskTokenPredictor


def test_mask_token_predictor():
    torch.manual_seed(0)
    predictor = MaskTokenPredictor(3)
    block = torch.randn(4, 3, 2, 3)
    q = torch.tensor([1, 3, 0, 2])
    out = predictor(block, q)
    assert out.shape == (4, 3, 4, 6)
    assert torch.equal(crop_quadrant(out, q), block)
    token = predictor.mask_token.detach().view(1, 3, 1, 1)
    masked = quadrant_mask(q, 4, 6).bool().expand(4, 3, 4, 6)
    assert torch.equal(out[masked], token.expand(4, 3, 4, 6)[masked])
    assert torch.equal(predictor(block, "bottom_left"), predictor(block, torch.full((4,), 2)))
    out.sum().backward()
    # every sample has 3 masked quadrants of 2 x 3 cells, each holding the token once
    torch.testing.assert_close(predictor.mask_token.grad, torch.full((3,), 4 * 3 * 6.0))
