"""Tests for heatssl.model.pair: a second kept quadrant and the invariance term between the two
quadrants' pooled grids (``loss.pair_weight``), alone, inside QB-Heat, in a config and a run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from heatssl.config import ConfigError, load_config
from heatssl.errors import ArgumentError
from heatssl.model.pair import PairTerm, other_quadrants
from heatssl.model.quadrants import crop_quadrant
from heatssl.runs.build import build_qbheat
from tests.helpers import pretrain_logged
from tests.model.test_qbheat import RESNET_OS16, VIT, _model, with_and_without


def test_other_quadrants_differ_from_the_kept_one_and_cover_the_other_three():
    torch.manual_seed(0)
    q = torch.arange(4).repeat(300)
    other = other_quadrants(q)
    assert other.shape == q.shape and other.dtype == q.dtype
    assert not (other == q).any()
    for k in range(4):
        drawn = other[q == k].bincount(minlength=4).float() / 300
        assert drawn[k] == 0 and (drawn[torch.arange(4) != k] > 0.2).all()  # about 1/3 each


def test_pair_term_is_simsiams_symmetric_loss_with_stopped_targets():
    torch.manual_seed(0)
    term = PairTerm(6)
    a = torch.randn(5, 6, 2, 2, requires_grad=True)
    b = torch.randn(5, 6, 2, 2, requires_grad=True)
    loss = term(a, b)
    pa, pb = a.mean(dim=(-2, -1)), b.mean(dim=(-2, -1))
    by_hand = 1 - 0.5 * (
        F.cosine_similarity(term.predictor(pa), pb, dim=1).mean()
        + F.cosine_similarity(term.predictor(pb), pa, dim=1).mean()
    )
    torch.testing.assert_close(loss, by_hand)
    assert 0 < loss.item() < 2
    loss.backward()
    assert a.grad is not None and b.grad is not None
    assert all(p.grad is not None for p in term.predictor.parameters())
    same = PairTerm(6)
    same.predictor = nn.Identity()
    x = torch.randn(3, 6, 2, 2)
    assert same(x, x * 2.0).item() == pytest.approx(0.0, abs=1e-6)  # agreeing pools cost nothing
    assert same(x, -x).item() == pytest.approx(2.0, abs=1e-6)


def test_pair_term_detaches_the_target_pool_on_both_sides():
    term = PairTerm(4)
    term.predictor = nn.Identity()
    a = torch.randn(2, 4, 1, 1, requires_grad=True)
    b = torch.randn(2, 4, 1, 1, requires_grad=True)

    def one_sided(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        cos = F.cosine_similarity(pred.mean(dim=(-2, -1)), target.mean(dim=(-2, -1)), dim=1)
        return 0.5 * (1 - cos.mean())

    # each view is pulled only by its own prediction; the other side's pool is a constant target
    (a_by_hand,) = torch.autograd.grad(one_sided(a, b.detach()), a)
    (b_by_hand,) = torch.autograd.grad(one_sided(b, a.detach()), b)
    a_grad, b_grad = torch.autograd.grad(term(a, b), (a, b))
    torch.testing.assert_close(a_grad, a_by_hand)
    torch.testing.assert_close(b_grad, b_by_hand)
    # without the stop-gradient each view would also be pulled as the other's target
    (both_ways,) = torch.autograd.grad(one_sided(a, b) + one_sided(b, a), a)
    assert not torch.allclose(both_ways, a_by_hand)


@pytest.mark.parametrize("target", ["pixels", "both"])
@pytest.mark.parametrize("spec", [RESNET_OS16, VIT], ids=["cnn", "vit"])
def test_qbheat_encodes_a_second_quadrant_and_adds_the_term_while_training(spec, target):
    images, q, base, pair = with_and_without(spec, target, pair_weight=0.5)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    pair.backbone.register_forward_hook(
        lambda m, args, kwargs, out: seen.append((args[0], kwargs["quadrant"])), with_kwargs=True
    )
    base.train(), pair.train()
    a, b = base(images, quadrant=q), pair(images, quadrant=q)
    assert a.pair is None and 0 < b.pair.item() < 2
    torch.testing.assert_close(b.loss, a.loss + 0.5 * b.pair)
    assert len(seen) == 2  # the kept quadrant, then a second, different one of the same image
    (first, q1), (second, q2) = seen
    assert torch.equal(q1, q) and not (q2 == q).any()
    torch.testing.assert_close(first, crop_quadrant(images, q))
    torch.testing.assert_close(second, crop_quadrant(images, q2))
    b.loss.backward()
    assert all(p.grad is not None for p in pair.pair_term.parameters())
    pair.eval()  # pictures and evaluation: one quadrant, no term
    seen.clear()
    assert pair(images, quadrant=q).pair is None and len(seen) == 1


def test_bad_pair_weight_is_refused_in_the_model_and_the_config():
    with pytest.raises(ArgumentError, match=r"pair_weight=-1\.0 must be >= 0"):
        _model(pair_weight=-1.0)
    with pytest.raises(ConfigError, match=r"loss\.pair_weight"):
        load_config("demo", ["loss.pair_weight=-0.5"])
    cfg = load_config("demo", ["loss.pair_weight=0.5"])
    model = build_qbheat(cfg)
    assert model.pair_weight == 0.5 and isinstance(model.pair_term, PairTerm)
    assert build_qbheat(load_config("demo")).pair_term is None


def test_pretrain_with_the_pair_term_logs_it(tmp_path):
    pairs = pretrain_logged(tmp_path / "run", "loss.pair_weight=1.0", "train/pair")
    assert pairs and all(0 <= p <= 2 for p in pairs)
