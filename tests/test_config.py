"""Config loading: recipes, overrides, type checks and helpful errors."""

import pytest

from heatssl.config import (
    CONFIG_DIR,
    Config,
    DataConfig,
    DecoderConfig,
    OptimConfig,
    ProbeConfig,
    TrainerConfig,
    config_keys,
    load_config,
    save_config,
)
from heatssl.errors import ArgumentError, ConfigError

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
        ("heat.dim=0", "heat.dim=0 must be null .* or positive"),
        ("trainer.keep_checkpoints=-2", "keep_checkpoints=-2 must be >= 0 .* or -1 .all."),
        ("data.name=imagefolder", "needs data.root"),
        ("trainer.max_epochs", "key=value"),
        ("model.output_stride=12", "model.output_stride=12 is not allowed. Allowed values: null"),
        ("probe.output_stride=4", "probe.output_stride=4 is not allowed.*8, 16, 32"),
    ],
)
def test_bad_values_are_refused_with_the_fix(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("'", "'")):
        load_config("demo", [override])


@pytest.mark.parametrize(
    ("override", "fix"),
    [
        (
            "heat.heat_weight=-1",
            "fix: set heat.heat_weight in the YAML config or as heat.heat_weight=",
        ),
        ("loss.global_weight=1.0", "fix: loss.target=both"),  # the rule's own fix, not a second one
    ],
)
def test_range_errors_name_one_fix(override, fix):
    with pytest.raises(ConfigError) as err:
        load_config("demo", [override])
    assert fix in str(err.value) and str(err.value).count("fix:") == 1


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


@pytest.mark.parametrize(
    ("section", "changes", "key"),
    [
        (DataConfig, {"val_fraction": 1.0}, "data.val_fraction"),
        (DataConfig, {"crop_scale_min": 0.0}, "data.crop_scale_min"),
        (DataConfig, {"image_size": 0}, "data.image_size"),
        (DataConfig, {"num_workers": -1}, "data.num_workers"),
        (DataConfig, {"name": "synthetic", "synthetic_size": 5}, "data.synthetic_size"),
        (TrainerConfig, {"checkpoint_every_n_minutes": -1.0}, "trainer.checkpoint_every_n_minutes"),
        (TrainerConfig, {"checkpoint_every_n_steps": -2}, "trainer.checkpoint_every_n_steps"),
        (DecoderConfig, {"depth": -1}, "decoder.depth"),
        (OptimConfig, {"betas": (0.9, 1.5)}, "optim.betas"),
        (ProbeConfig, {"knn_temperature": 0.0}, "probe.knn_temperature"),
    ],
)
def test_each_section_checks_its_own_values(section, changes, key):
    with pytest.raises(ConfigError, match=rf"^{key}="):
        section(**changes).validate()
    section().validate()  # the defaults are valid


def test_load_config_validates_every_section():
    with pytest.raises(ConfigError, match=r"^trainer\.checkpoint_every_n_steps=-1 must be >= 0"):
        load_config("demo", ["trainer.checkpoint_every_n_steps=-1"])


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("data:\n  image_size: 64\n  name: [imagefolder\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml, line \d+, column \d+: not valid YAML"):
        load_config(path)


def test_config_keys_rewords_library_arguments():
    keys = config_keys(image_size="data.image_size", stage="model.stage")
    with pytest.raises(ConfigError) as err, keys:
        raise ArgumentError("image_size=50 is too small. Fix: image_size=64; or stage=-2.")
    assert (
        str(err.value)
        == "data.image_size=50 is too small. Fix: data.image_size=64; or model.stage=-2."
    )
    assert isinstance(err.value.__cause__, ArgumentError)


@pytest.mark.parametrize(
    "recipe", ["imagenet_resnet50", "imagenet_vit_small", "imagenet_mobilenetv3"]
)
def test_imagenet_recipes_probe_linear_and_knn_and_size_tran1(recipe):
    """Probing ImageNet with tran-1 on every image wrote about 350 GB of grids to the run folder:
    the ImageNet recipes probe linear + kNN, and tran-1 (when asked for) a subset on scratch."""
    cfg = load_config(recipe)
    assert cfg.probe.kinds == ["linear", "knn"]
    assert cfg.probe.tran1_max_images == 100_000 and cfg.probe.grid_dir == "tmp"
