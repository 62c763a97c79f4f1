"""Nothing in a file exhausts the machine: YAML aliases, huge images, link loops, absurd settings."""

import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from heatssl.cli import main
from heatssl.config import load_config
from heatssl.data.datamodule import HeatDataModule
from heatssl.data.images import read_image, to_rgb
from heatssl.errors import ConfigError, HeatSSLWarning, UnreadableImageError
from heatssl.runs.sources import checkpoint_config
from tests.helpers import tiny_settings

LAUGHS = "\n".join(
    ["model:", "  kwargs:", '    a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    + [f"    a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 8)}]" for i in range(1, 9)]
)


def test_yaml_aliases_in_a_recipe_are_refused_before_they_expand(tmp_path):
    """Billion laughs under model.kwargs: 9.5 GB after 10 minutes on --print-config."""
    recipe = tmp_path / "laughs.yaml"
    recipe.write_text(LAUGHS)
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"alias"):
        load_config(str(recipe))
    with pytest.raises(ConfigError, match=r"alias"):
        load_config("demo", ["model.kwargs={a: &x [1, 2], b: [*x, *x]}"])
    assert time.monotonic() - start < 5


def test_a_checkpoints_nested_config_is_bounded(real_run, tmp_path):
    """The same structure as shared references in a 3.8 KB checkpoint: over 2.2 GB and 120 s."""
    data = torch.load(real_run[0], weights_only=True)
    node: list = ["lol"] * 8
    for _ in range(9):
        node = [node] * 8  # 8^9 leaves once expanded, a few kB pickled (shared references)
    data["hyper_parameters"]["config"]["model"]["kwargs"] = {"a": node}
    hostile = tmp_path / "laughs.ckpt"
    torch.save(data, hostile)
    assert hostile.stat().st_size < 10_000_000
    start = time.monotonic()
    with pytest.raises(Exception, match=r"too (large|deep)"):
        checkpoint_config(hostile)
    assert time.monotonic() - start < 10


def test_a_huge_16_bit_png_is_refused_by_its_header_and_16_bit_converts_without_float64(tmp_path):
    """A 280 KB 16-bit PNG of 12,000 x 12,000 px cost 20 s and 4.6 GB per read."""
    path = tmp_path / "huge.png"
    Image.fromarray(np.zeros((12_000, 12_000), dtype=np.uint16)).save(path)
    start = time.monotonic()
    with pytest.raises(UnreadableImageError, match=r"144,000,000 pixels.*data\.max_image_pixels"):
        read_image(path, max_pixels=50_000_000)
    assert time.monotonic() - start < 2
    deep = Image.fromarray(np.array([[0, 257, 65535]], dtype=np.uint16))
    assert np.asarray(to_rgb(deep))[0, :, 0].tolist() == [0, 1, 255]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.num_workers=100000", "data.num_workers"),
        ("data.image_size=200000", "data.image_size"),
        ("data.batch_size=100000000", "data.batch_size"),
    ],
)
def test_settings_this_machine_cannot_hold_are_refused_with_what_fits(override, key):
    cfg = load_config("demo", [override])
    with pytest.raises(ConfigError, match=rf"{key}=.*at most"):
        HeatDataModule(cfg.data)


def test_an_image_folder_with_link_loops_trains_on_each_image_once(tmp_path):
    """One loop repeated the data set 40 times silently; two hung the scan at 1.3 GB."""
    root = tmp_path / "data"
    for cls in ("a", "b"):
        for i in range(3):
            folder = root / "train" / cls
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (i * 40, 10, 10)).save(folder / f"{i}.png")
    os.symlink(root / "train", root / "train" / "a" / "loop1")
    os.symlink(root / "train" / "b", root / "train" / "b" / "loop2")
    args = ["data.name=imagefolder", f"data.root={root}", "data.val_fraction=0.34"]
    cfg = load_config("demo", [*tiny_settings(tmp_path / "run"), *args])
    with pytest.warns(HeatSSLWarning, match=r"loop1 .*loop2|loop2 .*loop1"):
        data = HeatDataModule(cfg.data)
        assert len(data.train_dataset) + len(data.val_dataset) == 6
    assert main(["pretrain", "-c", "demo", *tiny_settings(tmp_path / "run2"), *args]) == 0
