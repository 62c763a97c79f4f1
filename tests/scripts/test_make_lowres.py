"""scripts/make_lowres.py: a low-resolution copy of an ImageFolder, the layout kept."""

import sys

import numpy as np
import pytest
from PIL import Image

from tests.helpers import SCRIPTS

sys.path.insert(0, str(SCRIPTS))
import make_lowres


def test_the_copy_keeps_the_layout_and_loses_the_detail(tmp_path):
    rng = np.random.default_rng(0)
    for split, cls in (("train", "a"), ("train", "b"), ("val", "a")):
        folder = tmp_path / "src" / split / cls
        folder.mkdir(parents=True)
        noise = rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)  # all fine detail
        Image.fromarray(noise).save(folder / "x.jpg")
    (tmp_path / "src" / "train" / "notes.txt").write_text("not an image")
    dst = tmp_path / "dst"
    assert make_lowres.main([str(tmp_path / "src"), str(dst), "--low", "8", "--show", "32"]) == 0
    written = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*.png"))
    assert written == ["train/a/x.png", "train/b/x.png", "val/a/x.png"]
    pixels = np.asarray(Image.open(dst / "val" / "a" / "x.png"), dtype=float)
    assert pixels.shape == (32, 32, 3)
    src = np.asarray(Image.open(tmp_path / "src" / "val" / "a" / "x.jpg"), dtype=float)
    assert pixels.std() < 0.5 * src.std()  # 8 px of noise average out


def test_a_copy_inside_its_source_is_refused(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(SystemExit):
        make_lowres.main([str(tmp_path / "src"), str(tmp_path / "src" / "low")])
