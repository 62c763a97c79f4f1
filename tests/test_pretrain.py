"""The LightningModule: lr rule, schedule, optimiser groups, logged parts, pictures."""

import math

import pytest
import torch

from heatssl.config import load_config
from heatssl.pretrain import HeatPretrainModule


def test_lr_follows_batch_without_trainer(tiny_overrides):
    cfg = load_config("demo", [*tiny_overrides, "data.batch_size=128", "optim.base_lr=1e-3"])
    module = HeatPretrainModule(cfg)
    assert module.learning_rate() == pytest.approx(1e-3 * 128 / 256)


def test_checkpoint_hparams_are_plain_and_rebuild_the_model(tiny_overrides):
    cfg = load_config("demo", tiny_overrides)
    module = HeatPretrainModule(cfg)
    hp = dict(module.hparams)
    assert hp["config"] == cfg.to_dict()
    rebuilt = HeatPretrainModule(hp["config"])
    assert rebuilt.qbheat.backbone.name == "test_resnet"
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(
        p.numel() for p in module.parameters()
    )


def test_reconstruct_returns_pictures_in_unit_range(tiny_overrides):
    module = HeatPretrainModule(load_config("demo", tiny_overrides))
    images = torch.randn(4, 3, 32, 32)
    shown, mask, recon = module.reconstruct(images)
    assert shown.shape == recon.shape == (4, 3, 32, 32)
    assert mask.shape == (4, 1, 32, 32)
    # one quadrant of four kept per image, each image a different quadrant
    assert torch.allclose(mask.mean(dim=(1, 2, 3)), torch.full((4,), 0.75))
    assert len({tuple(m.flatten().tolist()) for m in mask}) == 4
    assert recon.min() >= 0 and recon.max() <= 1
    assert module.qbheat.training  # restored


def test_heat_operators_are_not_weight_decayed(tiny_overrides):
    module = HeatPretrainModule(load_config("demo", tiny_overrides))

    class _Trainer:
        estimated_stepping_batches = 10
        max_epochs = 2
        world_size = 1
        accumulate_grad_batches = 1

    module._trainer = _Trainer()  # the optimiser only needs these numbers
    opt = module.configure_optimizers()["optimizer"]
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    ops = module.qbheat.predictor.operators
    assert id(ops.A) not in decayed and id(ops.B) not in decayed
    assert any(p.ndim == 4 for p in opt.param_groups[0]["params"])  # conv weights are decayed
    assert opt.param_groups[0]["initial_lr"] == pytest.approx(module.learning_rate())
    assert math.isclose(opt.param_groups[0]["weight_decay"], 0.05)
