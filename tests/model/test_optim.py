"""Optimisation rules: warm-up + cosine, the lr scaling rule, weight-decay groups."""

import itertools

import pytest

from heatssl.model.backbone import Backbone
from heatssl.model.heads import LinearHead, Tran1Head
from heatssl.model.optim import (
    clock_warmup_cosine,
    epoch_warmup_cosine,
    scaled_lr,
    warmup_cosine,
    weight_decay_groups,
)
from heatssl.model.qbheat import QBHeat


def test_warmup_then_cosine():
    assert warmup_cosine(0, warmup=10, total=100) == pytest.approx(0.1)
    assert warmup_cosine(9, warmup=10, total=100) == pytest.approx(1.0)
    assert warmup_cosine(10, warmup=10, total=100) == pytest.approx(1.0)
    assert warmup_cosine(55, warmup=10, total=100) == pytest.approx(0.5)
    assert warmup_cosine(100, warmup=10, total=100, min_ratio=0.1) == pytest.approx(0.1)
    mids = [warmup_cosine(s, 10, 100) for s in range(10, 100)]
    assert all(a >= b for a, b in itertools.pairwise(mids))  # never rises after warm-up


def test_epoch_schedule_warms_up_over_its_epochs_and_ends_at_the_floor():
    factor = epoch_warmup_cosine(total_steps=100, epochs=10, warmup_epochs=2, min_ratio=0.1)
    ramp = [factor(s) for s in range(20)]  # 2 epochs of 10 steps
    assert ramp == pytest.approx([(s + 1) / 20 for s in range(20)])
    assert factor(20) == pytest.approx(1.0)
    assert factor(100) == pytest.approx(0.1)
    assert all(factor(s) >= factor(s + 1) for s in range(20, 100))
    assert epoch_warmup_cosine(total_steps=7, epochs=10, warmup_epochs=0)(0) == pytest.approx(1.0)


def test_clock_schedule_follows_the_elapsed_time_not_the_steps():
    """trainer.max_time: warm-up over the first 10% of the budget, cosine to the floor at its end,
    whatever step the optimiser is at (a slow step cannot leave the lr high at the end)."""
    now = [0.0]
    factor = clock_warmup_cosine(lambda: now[0], budget_s=100.0, warmup=0.1, min_ratio=0.05)
    seen = []
    for t in (0.0, 5.0, 10.0, 55.0, 100.0, 250.0):
        now[0] = t
        seen.append(factor(3))  # the same step each time: only the clock moves
    assert seen[0] < 0.01 and seen[1] == pytest.approx(0.5, abs=0.01)
    assert seen[2] == pytest.approx(1.0)
    assert seen[3] == pytest.approx(0.05 + 0.95 * 0.5, abs=0.01)
    assert seen[4] == pytest.approx(0.05) and seen[5] == pytest.approx(0.05)  # past the budget
    with pytest.raises(ValueError, match="budget_s=0"):
        clock_warmup_cosine(lambda: 0.0, budget_s=0)


def test_lr_scales_with_batch():
    assert scaled_lr(1.5e-4, 256) == pytest.approx(1.5e-4)
    assert scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)


def test_weight_decay_groups_spare_biases_norms_and_the_heat_operators():
    model = QBHeat(Backbone("test_resnet", image_size=64, output_stride=16), decoder_width=16)
    decayed, spared = weight_decay_groups(model, 0.05)
    assert decayed["weight_decay"] == 0.05 and spared["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    spared_names = {names[id(p)] for p in spared["params"]}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    assert {"predictor.operators.A", "predictor.operators.B"} <= spared_names
    assert all(p.ndim >= 2 for p in decayed["params"])
    assert any(n.startswith("backbone.") for n in decayed_names)
    assert not any(n.endswith(".bias") for n in decayed_names)
    assert len(decayed_names) + len(spared_names) == len(list(model.parameters()))


def test_a_vit_s_positions_and_class_token_are_not_decayed():
    """timm's and MAE's rule: what ``model.no_weight_decay()`` names gets no decay."""
    backbone = Backbone("test_vit", image_size=32, patch_size=4)
    model = QBHeat(backbone, decoder_width=16)
    decayed, spared = weight_decay_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    spared_names = {names[id(p)] for p in spared["params"]}
    assert {"backbone.model.pos_embed", "backbone.model.cls_token"} <= spared_names
    assert any(names[id(p)].endswith("qkv.weight") for p in decayed["params"])


def test_tran1_positions_norms_and_biases_are_not_decayed():
    head = Tran1Head(16, 3, tokens=4, heads=2)
    decayed, spared = weight_decay_groups(head, 0.05)
    names = {id(p): n for n, p in head.named_parameters()}
    spared_names = {names[id(p)] for p in spared["params"]}
    assert "pos" in spared_names and "norm.weight" in spared_names
    assert all(names[id(p)].endswith("weight") for p in decayed["params"])
    assert all(p.ndim == 2 for p in decayed["params"])


def test_weight_decay_groups_keep_their_layout_with_no_decay():
    model = LinearHead(4, 2)
    decayed, spared = weight_decay_groups(model, 0.0)  # timm puts all in one group here
    assert [p.shape for p in decayed["params"]] == [(2, 4)]
    assert len(spared["params"]) == 1 and decayed["weight_decay"] == 0.0
