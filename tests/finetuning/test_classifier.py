import warnings

import pytest
import torch

from heatssl.config import ConfigError, load_config
from heatssl.finetuning.classifier import FinetuneModule
from heatssl.finetuning.data import TimmTrainTransform
from heatssl.finetuning.recipe import family, resolve
from heatssl.runs.build import build_backbone
from heatssl.runs.timm_folder import timm_classifier
from tests.helpers import tiny_settings

VIT = ["model.backbone=test_vit", "model.output_stride=null", "model.kwargs={patch_size: 4}"]


def _module(tmp_path, extra=(), classes=10):
    cfg = load_config("demo", [*tiny_settings(tmp_path / "run"), *extra])
    backbone = build_backbone(cfg.model, cfg.data.image_size, check_size=False)
    recipe = resolve(cfg.finetune, backbone)
    model = timm_classifier(backbone, classes, drop_path_rate=recipe.drop_path)
    return FinetuneModule(model, cfg, recipe, classes), backbone, recipe


def test_family_picks_the_recipe_and_every_null_takes_its_default(tmp_path):
    _, cnn, recipe = _module(tmp_path)
    assert family(cnn) == "cnn" and recipe.recipe == "cnn" and recipe.layer_decay == 0.8
    _, vit, recipe = _module(tmp_path, [*VIT, "finetune.mixup=0.3"])
    assert (
        family(vit) == "vit" and recipe.mixup == 0.3 and recipe.auto_augment.startswith("rand-m9")
    )
    assert None not in vars(recipe).values() or recipe.out_dir is None


@pytest.mark.parametrize(
    "override", ["finetune.layer_decay=0", "finetune.re_prob=2", "finetune.ema_decay=1"]
)
def test_bad_recipe_values_are_refused_by_name(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config("demo", [override])


def test_the_classifier_starts_from_the_backbone_weights(tmp_path):
    module, backbone, _ = _module(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    feats = module.model.eval().forward_head(module.model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(feats, backbone.eval().pooled(x), rtol=1e-4, atol=1e-5)


def test_layer_decay_gives_early_layers_smaller_learning_rates(tmp_path):
    module, _, recipe = _module(tmp_path)
    trainer = type("T", (), {"world_size": 1, "accumulate_grad_batches": 1})()
    trainer.estimated_stepping_batches, trainer.max_epochs = 100, 10
    module._trainer = trainer  # what configure_optimizers reads
    opt = module.configure_optimizers()["optimizer"]
    lrs = {id(p): g["initial_lr"] for g in opt.param_groups for p in g["params"]}  # pre-warm-up
    stem = lrs[id(next(module.model.parameters()))]  # the stem's first convolution
    head = lrs[id(module.model.fc.weight)]
    assert head == pytest.approx(module.learning_rate())
    assert stem < head * recipe.layer_decay  # several layers down, each x layer_decay
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(module.model.fc.bias) in no_decay and id(module.model.fc.weight) not in no_decay


def test_a_training_step_mixes_erases_and_falls_back_to_smoothing_on_odd_batches(tmp_path):
    module, _, _ = _module(tmp_path, ["finetune.re_prob=0.5"])
    module.log = lambda *a, **k: None
    labels = torch.arange(4) % 10
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    loss = module.training_step((images, labels, []), 0)
    assert torch.isfinite(loss) and loss.requires_grad
    odd = module.training_step((images[:3], labels[:3], []), 0)  # timm's Mixup needs pairs
    assert torch.isfinite(odd)


def test_the_training_transform_is_timm_randaugment_with_uint8_out():
    from PIL import Image

    tf = TimmTrainTransform(32, "rand-m9-mstd0.5-inc1")
    names = [type(t).__name__ for t in tf.timm.transforms]
    assert "RandAugment" in names and "RandomResizedCropAndInterpolation" in names
    out = tf(Image.new("L", (50, 40), 128))
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
    assert "ColorJitter" not in names


@pytest.mark.parametrize("extra", [[], VIT])
def test_an_lr_above_the_recipes_ceiling_is_warned_with_the_base_lr_that_fits(tmp_path, extra):
    """4 nodes x 8 GPUs x 256: the scaled lr is 8x what the recipe was set for (batch 1024)."""
    from heatssl.errors import HeatSSLWarning
    from heatssl.finetuning.recipe import RECIPE_BATCH, check_scale, lr_ceiling

    _, _, recipe = _module(tmp_path, extra)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_scale(recipe, RECIPE_BATCH) == pytest.approx(lr_ceiling(recipe.recipe))
    with pytest.warns(HeatSSLWarning, match=rf"above .* {recipe.recipe} recipe .*base_lr=") as got:
        lr = check_scale(recipe, 4 * 8 * 256)
    assert lr == pytest.approx(8 * lr_ceiling(recipe.recipe))
    assert f"finetune.base_lr={recipe.base_lr / 8:.3g}" in str(got[0].message)
