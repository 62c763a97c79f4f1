"""Tests for heatssl.model.qbheat: pixel targets, masked loss, the QB-Heat objective end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from heatssl.errors import ArgumentError
from heatssl.model.backbone import Backbone
from heatssl.model.heat import MaskTokenPredictor
from heatssl.model.heat_loss import HeatLoss
from heatssl.model.pixels import patch_normalize, reconstruction_loss
from heatssl.model.qbheat import QBHeat, QBHeatOutput
from heatssl.model.quadrants import crop_quadrant

# (Backbone kwargs, image size): the smallest sizes whose kept quarter gives a >= 2 x 2 grid.
RESNET = (dict(name="test_resnet", image_size=128), 128)  # reduction 32: 64 px block -> 2 x 2
RESNET_OS16 = (dict(name="test_resnet", image_size=64, output_stride=16), 64)  # 32 px -> 2 x 2
VIT = (dict(name="test_vit", image_size=32, patch_size=4), 32)  # 16 px block -> 4 x 4
SMALL = dict(decoder_width=16, decoder_min_width=8, commute_probes=0)  # exact commutator


def _model(spec=RESNET_OS16, seed=0, **kwargs):
    torch.manual_seed(seed)
    return QBHeat(Backbone(**spec[0]), **{**SMALL, **kwargs})


def _images(n, size, seed=0):
    """Smooth random images (upsampled 4 x 4 noise): something a tiny model can learn."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, 4, 4, generator=g)
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def with_and_without(spec, target, **term):
    """Four images one per quadrant, and two QB-Heats with the same weights: without and with
    the optional ``term`` (e.g. ``pair_weight=0.5``), for tests of what the term adds."""
    images, q = _images(4, spec[1]), torch.tensor([0, 1, 2, 3])
    base = _model(spec, target=target, heat_dim=8)
    other = _model(spec, target=target, heat_dim=8, **term)
    other.load_state_dict(base.state_dict(), strict=False)  # the term's own parameters stay
    return images, q, base, other


def _masked_mse_by_hand(pred, target, q):
    """Mean over the three masked quadrants' pixels of the channel-mean squared error."""
    _, _, h, w = pred.shape
    total, count = 0.0, 0
    for n, qid in enumerate(q.tolist()):
        y0, x0 = (h // 2 if qid >= 2 else 0), (w // 2 if qid % 2 else 0)
        err = (pred[n] - target[n]).pow(2).mean(dim=0)
        keep = torch.zeros(h, w, dtype=torch.bool)
        keep[y0 : y0 + h // 2, x0 : x0 + w // 2] = True
        total += err[~keep].sum().item()
        count += int((~keep).sum())
    return total / count


# --------------------------------------------------------------------------- pixel targets


def test_patch_normalize_statistics_and_inverse():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 8, 12) * 2.5 + 0.7
    normed, mean, std = patch_normalize(images, 4)
    assert normed.shape == mean.shape == std.shape == images.shape
    for n in range(2):
        for py in range(2):
            for px in range(3):
                cell = (slice(py * 4, py * 4 + 4), slice(px * 4, px * 4 + 4))
                patch = normed[n, :, cell[0], cell[1]]
                assert abs(patch.mean().item()) < 1e-5
                assert patch.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
                raw = images[n, :, cell[0], cell[1]]
                m = mean[n, :, cell[0], cell[1]]
                assert torch.allclose(m, raw.mean().expand_as(m))
    torch.testing.assert_close(normed * std + mean, images, rtol=1e-5, atol=1e-5)


def test_patch_normalize_constant_patch_is_finite():
    normed, _, _ = patch_normalize(torch.ones(1, 3, 4, 4), 2)
    assert torch.isfinite(normed).all() and normed.abs().max() == 0


def test_reconstruction_loss_counts_only_masked_pixels():
    torch.manual_seed(0)
    pred, target = torch.randn(3, 3, 4, 6), torch.randn(3, 3, 4, 6)
    weight = torch.zeros(3, 1, 4, 6)
    weight[:, :, :, 3:] = 1.0
    loss = reconstruction_loss(pred, target, weight)
    expected = (pred - target).pow(2).mean(dim=1)[:, :, 3:].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    changed = pred.clone()
    changed[:, :, :, :3] += 100.0  # unmasked pixels: no effect
    assert reconstruction_loss(changed, target, weight).item() == pytest.approx(
        loss.item(), rel=1e-6
    )
    changed[:, :, :, 3:] += 1.0  # masked pixels: the loss moves
    assert reconstruction_loss(changed, target, weight).item() > loss.item() + 0.5
    full = reconstruction_loss(pred, target, None)
    assert full.item() == pytest.approx((pred - target).pow(2).mean().item(), rel=1e-6)


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("spec", [RESNET, RESNET_OS16, VIT], ids=["resnet", "resnet_os16", "vit"])
def test_forward_loss_is_sum_of_parts(spec):
    model = _model(spec, init="random", heat_weight=0.3, commute_weight=0.5)
    size = spec[1]
    images = _images(4, size)
    q = torch.tensor([0, 1, 2, 3])
    out = model(images, q)
    assert isinstance(out, QBHeatOutput)
    assert out.pred.shape == (4, 3, size, size)
    assert torch.equal(out.quadrant, q)
    for t in (out.loss, out.rec, out.heat, out.commute):
        assert t.ndim == 0 and torch.isfinite(t)
    assert out.heat.item() > 0 and out.commute.item() > 0
    expected = out.rec + 0.3 * out.heat + 0.5 * out.commute
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # each part recomputed independently
    target = patch_normalize(images, model.backbone.reduction)[0]
    rec = _masked_mse_by_hand(out.pred.detach(), target, q)
    assert out.rec.item() == pytest.approx(rec, rel=1e-5)
    with torch.no_grad():
        block = model.backbone(crop_quadrant(images, q), quadrant=q)
        heat = HeatLoss(operators=model.predictor.operators)(block)
    assert out.heat.item() == pytest.approx(heat.item(), rel=1e-4)
    a, b = model.predictor.operators.A, model.predictor.operators.B
    assert out.commute.item() == pytest.approx((a @ b - b @ a).pow(2).sum().item(), rel=1e-5)


@pytest.mark.parametrize("init", ["random", "zeros"])
def test_gradients_reach_operators_backbone_and_decoder(init):
    model = _model(init=init)
    out = model(_images(4, 64), torch.tensor([3, 2, 1, 0]))
    out.loss.backward()
    ops = model.predictor.operators
    assert ops.A.grad is not None and ops.A.grad.abs().sum() > 0
    assert ops.B.grad is not None and ops.B.grad.abs().sum() > 0
    stem = next(p for p in model.backbone.parameters() if p.ndim == 4)
    assert stem.grad is not None and stem.grad.abs().sum() > 0
    for name, p in model.decoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_copy_predictor_has_frozen_zero_operators_and_a_heat_loss_of_its_own():
    """copy differs from heat only in the extrapolation: its heat loss learns its own A and B
    (on the frozen zeros it would be a smoothness penalty, a second change in the ablation)."""
    model = _model(predictor="copy", init="random", commute_weight=1.0)
    ops = model.predictor.operators
    assert not ops.A.requires_grad and not ops.B.requires_grad
    assert torch.equal(ops.A, torch.zeros_like(ops.A)) and torch.equal(
        ops.B, torch.zeros_like(ops.B)
    )
    own = model.heat_loss.operators
    assert own is not ops and own.A.requires_grad and own.B.requires_grad
    out = model(_images(2, 64), torch.tensor([0, 3]))
    assert out.heat is not None and out.commute is not None
    expected = out.rec + 0.1 * out.heat + 1.0 * out.commute
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    out.loss.backward()
    assert ops.A.grad is None and ops.B.grad is None
    assert own.A.grad is not None and own.A.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.decoder.parameters())


def test_copy_without_heat_loss_has_no_operators_to_train():
    model = _model(predictor="copy", heat_weight=0.0)
    assert model.heat_loss is None
    out = model(_images(2, 64), torch.tensor([0, 3]))
    assert out.heat is None and out.commute is None and out.loss.item() == out.rec.item()


def test_mask_token_without_heat_loss():
    model = _model(predictor="mask_token", heat_weight=0.0)
    assert isinstance(model.predictor, MaskTokenPredictor)
    out = model(_images(2, 64), torch.tensor([1, 2]))
    assert out.heat is None and out.commute is None
    assert out.loss.item() == out.rec.item()
    out.loss.backward()
    assert model.predictor.mask_token.grad.abs().sum() > 0


def test_mask_token_with_heat_loss():
    model = _model(predictor="mask_token", heat_weight=0.5)
    assert isinstance(model.heat_loss, HeatLoss)
    out = model(_images(2, 64), torch.tensor([1, 2]))
    assert out.heat is not None and torch.isfinite(out.heat) and out.heat.item() > 0
    assert out.commute is not None  # the heat loss trains A and B: they must commute too
    assert out.loss.item() == pytest.approx(
        out.rec.item() + 0.5 * out.heat.item() + model.commute_weight * out.commute.item(),
        rel=1e-6,
    )
    out.loss.backward()
    assert model.heat_loss.operators.A.grad.abs().sum() > 0
    assert model.predictor.mask_token.grad.abs().sum() > 0


def test_zero_weights_drop_their_terms():
    model = _model(heat_weight=0.0, commute_weight=0.0, init="random")
    out = model(_images(2, 64), torch.tensor([0, 1]))
    assert out.heat is None and out.commute is None
    assert out.loss.item() == out.rec.item()
    only_commute = _model(heat_weight=0.0, commute_weight=2.0, init="random")
    out = only_commute(_images(2, 64), torch.tensor([0, 1]))
    assert out.heat is None and out.commute is not None
    assert out.loss.item() == pytest.approx((out.rec + 2.0 * out.commute).item(), rel=1e-6)


def test_fixed_quadrant_is_used_for_every_sample():
    model = _model(quadrant="top_right")
    images = _images(3, 64)
    out = model(images)
    assert out.quadrant.tolist() == [1, 1, 1]
    again = model(images, torch.ones(3, dtype=torch.long))
    assert out.loss.item() == pytest.approx(again.loss.item(), rel=1e-6)
    other = model(images, torch.zeros(3, dtype=torch.long))
    assert other.loss.item() != pytest.approx(out.loss.item(), rel=1e-6)


def test_random_quadrants_cover_all_four():
    model = _model()
    torch.manual_seed(0)
    q = model.sample_quadrants(400, torch.device("cpu"))
    assert q.dtype == torch.long and q.shape == (400,)
    assert sorted(q.unique().tolist()) == [0, 1, 2, 3]


def test_region_full_vs_masked():
    images, q = _images(2, 64), torch.tensor([0, 3])
    masked = _model(region="masked")(images, q)
    full = _model(region="full")(images, q)
    torch.testing.assert_close(masked.pred, full.pred)  # same seed: same network
    target = patch_normalize(images, 16)[0]
    assert full.rec.item() == pytest.approx((full.pred - target).pow(2).mean().item(), rel=1e-5)
    assert masked.rec.item() == pytest.approx(_masked_mse_by_hand(masked.pred, target, q), rel=1e-5)
    assert masked.rec.item() != pytest.approx(full.rec.item(), rel=1e-4)


def test_norm_pix_off_scores_raw_pixels():
    images, q = _images(2, 64), torch.tensor([2, 1])
    model = _model(norm_pix=False, region="full")
    assert torch.equal(model.target(images), images)
    out = model(images, q)
    assert out.rec.item() == pytest.approx((out.pred - images).pow(2).mean().item(), rel=1e-5)


@pytest.mark.parametrize("spec", [RESNET_OS16, VIT], ids=["resnet_os16", "vit"])
def test_heat_dim_projects_the_grid_and_everything_after_works_on_it(spec):
    """heat_dim: A and B are heat_dim wide, the heat loss and the predictor see P z, all train."""
    model = _model(spec, init="random", heat_dim=6, heat_weight=0.3, commute_weight=0.5)
    size, width = spec[1], model.backbone.num_features
    assert model.predictor.operators.A.shape == (6, 6) and model.heat_loss.operators is (
        model.predictor.operators
    )
    assert model.project.weight.shape == (6, width, 1, 1)
    images, q = _images(4, size), torch.tensor([0, 1, 2, 3])
    out = model(images, q)
    assert out.block.shape[1] == width  # the encoder's own grid (the online probe reads it)
    with torch.no_grad():
        z = model.project(model.backbone(crop_quadrant(images, q), quadrant=q))
        heat = HeatLoss(operators=model.predictor.operators)(z)
        pred = model.decoder(model.predictor(z, q))
    assert out.heat.item() == pytest.approx(heat.item(), rel=1e-4)
    assert torch.allclose(out.pred, pred, atol=1e-5)
    out.loss.backward()
    for name in ("project.weight", "predictor.operators.A", "decoder.layers.0.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    plain = _model(spec)
    assert isinstance(plain.project, torch.nn.Identity)
    assert plain.predictor.operators.A.shape == (width, width)
    with pytest.raises(ArgumentError, match="heat_dim=0"):
        _model(spec, heat_dim=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(quadrant="middle"), "quadrant"),
        (dict(predictor="linear"), "predictor"),
        (dict(step="rk4"), "step"),
        (dict(init="ones"), "init"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ArgumentError, match=match):
        _model(**kwargs)


def test_bad_region_raises():
    with pytest.raises(ArgumentError, match="region"):
        _model(region="maskd")


def test_bad_quadrant_tensor_raises():
    model = _model()
    with pytest.raises(ArgumentError, match=r"ids 0\.\.3"):
        model(torch.randn(2, 3, 64, 64), quadrant=torch.tensor([0, 4]))


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("spec", [RESNET_OS16, VIT], ids=["resnet_os16", "vit"])
def test_few_adam_steps_lower_the_loss(spec):
    model = _model(spec, init="random")
    images = _images(6, spec[1])
    q = torch.tensor([0, 1, 2, 3, 0, 1])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        out = model(images, q)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0]
