"""Building from a config: every recipe fits its backbone, QB-Heat follows its sections, errors name
config keys, and the effective batch and lr are one rule everywhere."""

import pytest
import torch

from heatssl.config import CONFIG_DIR, Config, effective_batch, load_config
from heatssl.errors import ConfigError
from heatssl.model.heat import HeatPredictor
from heatssl.runs.build import build_backbone, build_qbheat
from heatssl.runs.trainer import scale_line


@pytest.mark.parametrize("recipe", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_recipe_fits_its_backbone(recipe):
    cfg = load_config(recipe)
    with torch.device("meta"):
        backbone = build_backbone(cfg.model, cfg.data.image_size)  # raises on a size misfit
    block = cfg.data.image_size // 2 // backbone.reduction
    assert block >= 2


def test_size_errors_name_the_config_keys():
    cfg = load_config(None, ["model.backbone=test_resnet", "data.image_size=64"])
    with pytest.raises(ConfigError) as err:
        build_backbone(cfg.model, cfg.data.image_size)
    msg = str(err.value)
    assert msg.startswith("data.image_size=64 gives a kept-block grid of 1x1")
    assert "Fix: data.image_size=128 or 192" in msg
    assert "; or model.output_stride=16" in msg and "; or model.stage=-2" in msg


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("model.backbone=resnet19", r"^model\.backbone='resnet19' is not a timm model"),
        ("model.stage=7", r"^model\.stage=7 does not exist on test_resnet"),
    ],
)
def test_model_errors_name_the_config_keys(override, needle):
    cfg = load_config(None, ["model.backbone=test_resnet", override])
    with pytest.raises(ConfigError, match=needle):
        build_backbone(cfg.model, 128)


def test_qbheat_follows_the_config_sections():
    cfg = Config()
    cfg.model.backbone, cfg.model.output_stride = "test_resnet", 16
    cfg.data.image_size = 64
    cfg.heat.predictor, cfg.heat.step, cfg.heat.quadrant = "heat", "normalized", "bottom_left"
    cfg.heat.heat_weight, cfg.heat.commute_weight = 0.25, 0.0
    cfg.decoder.width, cfg.decoder.depth, cfg.decoder.min_width = 16, 2, 8
    cfg.loss.region, cfg.loss.norm_pix = "full", False
    torch.manual_seed(0)
    model = build_qbheat(cfg)
    assert isinstance(model.predictor, HeatPredictor)
    assert model.predictor.operators.step_rule == "normalized"
    assert (model.quadrant, model.heat_weight, model.commute_weight) == ("bottom_left", 0.25, 0.0)
    assert (model.region, model.norm_pix) == ("full", False)
    assert model.decoder.layers[0].out_channels == 16
    out = model(torch.randn(2, 3, 64, 64))
    assert out.quadrant.tolist() == [2, 2] and out.commute is None


def test_effective_batch_and_lr_follow_one_rule():
    cfg = load_config(
        None,
        ["data.batch_size=32", "trainer.accumulate_grad_batches=2", "optim.base_lr=1e-3"],
    )
    assert effective_batch(cfg, processes=8) == 512
    line = scale_line(cfg, devices=4, nodes=2, base_lr=cfg.optim.base_lr)
    assert "effective batch 512 = 32 per device x 4 devices x 2 nodes x 2 accumulation" in line
    assert "lr 0.002 = base_lr 0.001 x 512 / 256" in line
