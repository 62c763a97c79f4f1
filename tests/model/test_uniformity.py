"""Tests for heatssl.model.uniformity: Wang and Isola's uniformity of the pooled features
(``loss.uniform_weight``), alone, inside QB-Heat, in a config and a run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from heatssl.config import ConfigError, load_config
from heatssl.errors import ArgumentError
from heatssl.model.uniformity import UniformityLoss
from heatssl.runs.build import build_qbheat
from tests.helpers import pretrain_logged
from tests.model.test_qbheat import RESNET_OS16, VIT, _model, with_and_without


def _by_hand(x: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """log of the mean over pairs i < j of exp(-t ||u_i - u_j||^2), u the unit rows."""
    u = x / x.norm(dim=1, keepdim=True)
    terms = [
        math.exp(-t * float((u[i] - u[j]).pow(2).sum()))
        for i in range(len(u))
        for j in range(i + 1, len(u))
    ]
    return torch.tensor(math.log(sum(terms) / len(terms)))


def test_uniformity_is_wang_and_isolas_log_mean_gaussian_potential():
    torch.manual_seed(0)
    x = torch.randn(7, 5)
    torch.testing.assert_close(UniformityLoss()(x), _by_hand(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(UniformityLoss(t=0.5)(x), _by_hand(x, 0.5), rtol=1e-5, atol=1e-5)
    # scale-free: the length of a feature vector does not count, only its direction
    torch.testing.assert_close(UniformityLoss()(x * 3.0), UniformityLoss()(x))


def test_uniformity_is_zero_when_collapsed_and_minus_2t_for_orthogonal_rows():
    same = torch.ones(6, 4) * torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert UniformityLoss()(same).item() == pytest.approx(0.0, abs=1e-5)
    # orthogonal unit rows are all sqrt(2) apart: log exp(-2 * 2) = -4
    assert UniformityLoss()(torch.eye(8)).item() == pytest.approx(-4.0, abs=1e-5)
    # antipodal pairs are as far as rows can be; a spread batch scores between the two
    spread = UniformityLoss()(torch.randn(64, 128))
    assert -4.0 < spread.item() < -3.0


def test_a_gradient_step_on_the_uniformity_spreads_the_features_apart():
    torch.manual_seed(0)
    x = (torch.ones(16, 8) + 0.1 * torch.randn(16, 8)).requires_grad_()  # nearly collapsed
    term = UniformityLoss()
    before = term(x)
    before.backward()
    with torch.no_grad():
        after = term(x - 0.5 * x.grad)
    u0 = F.normalize(x.detach(), dim=1)
    u1 = F.normalize(x.detach() - 0.5 * x.grad, dim=1)
    assert after < before
    assert (u1 @ u1.T).mean() < (u0 @ u0.T).mean()  # the mean cosine between images drops


def test_uniformity_of_one_image_is_zero_and_bad_input_is_refused():
    x = torch.randn(1, 4, requires_grad=True)
    one = UniformityLoss()(x)
    assert one.item() == 0.0 and one.requires_grad  # still in the graph (DDP: every param used)
    with pytest.raises(ArgumentError, match=r"shape \(2, 4, 3, 3\).*expected \(N, d\)"):
        UniformityLoss()(torch.randn(2, 4, 3, 3))
    with pytest.raises(ArgumentError, match=r"t=0\.0 must be > 0"):
        UniformityLoss(t=0.0)


@pytest.mark.parametrize("target", ["pixels", "both"])
@pytest.mark.parametrize("spec", [RESNET_OS16, VIT], ids=["cnn", "vit"])
def test_qbheat_adds_the_uniformity_of_the_pooled_backbone_grids(spec, target):
    images, q, base, unif = with_and_without(spec, target, uniform_weight=0.5)
    assert unif.state_dict().keys() == base.state_dict().keys()  # no parameters of its own
    for mode in (True, False):  # training and evaluation alike: the term is cheap
        base.train(mode), unif.train(mode)
        a, b = base(images, quadrant=q), unif(images, quadrant=q)
        assert a.uniform is None
        # on the backbone's grid (what the probes pool), not the heat_dim projection
        by_hand = UniformityLoss()(b.block.float().mean(dim=(-2, -1)))
        torch.testing.assert_close(b.uniform, by_hand)
        assert -8.0 <= b.uniform.item() < 0.0  # -4t is the floor
        torch.testing.assert_close(b.loss, a.loss + 0.5 * b.uniform)
    unif.train()
    out = unif(images, quadrant=q)
    (grad,) = torch.autograd.grad(out.uniform, out.block)
    assert grad.abs().sum() > 0  # the term reaches the encoder


def test_bad_uniform_weight_is_refused_in_the_model_and_the_config():
    with pytest.raises(ArgumentError, match=r"uniform_weight=-1\.0 must be >= 0"):
        _model(uniform_weight=-1.0)
    with pytest.raises(ConfigError, match=r"loss\.uniform_weight"):
        load_config("demo", ["loss.uniform_weight=-0.5"])
    model = build_qbheat(load_config("demo", ["loss.uniform_weight=0.5"]))
    assert model.uniform_weight == 0.5 and isinstance(model.uniformity, UniformityLoss)
    assert build_qbheat(load_config("demo")).uniformity is None


def test_pretrain_with_the_uniformity_logs_it(tmp_path):
    values = pretrain_logged(tmp_path / "run", "loss.uniform_weight=0.5", "train/uniform")
    assert values and all(-8.0 <= v <= 0.0 for v in values)


def test_uniformity_is_computed_in_float32_under_bf16_autocast():
    torch.manual_seed(0)
    x = torch.randn(32, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = UniformityLoss()(x.bfloat16())
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, UniformityLoss()(x.bfloat16().float()))
