"""Config loading: recipes, overrides, type checks and helpful errors."""

import pytest

from heatssl.config import CONFIG_DIR, Config, ConfigError, load_config, save_config

RECIPES = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def test_defaults_and_overrides():
    cfg = load_config(
        "demo", ["trainer.max_epochs=3", "heat.step=normalized", "optim.base_lr=2e-4"]
    )
    assert cfg.trainer.max_epochs == 3
    assert cfg.heat.step == "normalized"
    assert cfg.optim.base_lr == pytest.approx(2e-4)
    assert cfg.data.name == "digits"  # from the recipe, not touched by overrides


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config("demo", ["model.kwargs={drop_path_rate: 0.1}", "optim.betas=[0.9, 0.99]"])
    path = save_config(cfg, tmp_path / "config.yaml")
    again = load_config(path)
    assert again.to_dict() == cfg.to_dict()
    assert again.optim.betas == (0.9, 0.99)


def test_dict_source_round_trip():
    cfg = Config()
    assert load_config(cfg.to_dict()).to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("trainer.max_epoch=3", "Did you mean 'max_epochs'"),
        ("heat.stepp=euler", "Did you mean 'step'"),
        ("modle.backbone=resnet18", "Did you mean 'model'"),
        ("heat.step=rk4", "Allowed values: 'euler', 'normalized'"),
        ("trainer.max_epochs=three", "expected an integer"),
        ("loss.norm_pix=maybe", "expected true or false"),
        ("data.image_size=0", "must be positive"),
        ("heat.heat_weight=-1", "must be >= 0"),
        ("data.name=imagefolder", "needs data.root"),
        ("trainer.max_epochs", "key=value"),
        ("model.output_stride=12", "model.output_stride=12 is not allowed. Allowed values: null"),
        ("probe.output_stride=4", "probe.output_stride=4 is not allowed.*8, 16, 32"),
    ],
)
def test_bad_values_are_refused_with_the_fix(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("'", "'")):
        load_config("demo", [override])


def test_unknown_recipe_lists_the_bundled_ones():
    with pytest.raises(ConfigError) as err:
        load_config("no_such_recipe")
    assert "demo" in str(err.value) and "imagenette" in str(err.value)


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  image_sise: 64\n")
    with pytest.raises(ConfigError, match=r"data\.image_sise.*Did you mean 'image_size'"):
        load_config(path)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_bundled_recipe_is_valid(recipe):
    cfg = load_config(recipe)
    assert cfg.run_dir.startswith("runs/")
