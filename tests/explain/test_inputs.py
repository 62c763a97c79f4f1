"""Image files for heat maps: every PIL mode converted, unreadable files skipped and named."""

import pytest
from PIL import Image

from heatssl.data.images import to_rgb
from heatssl.errors import BadImageError
from heatssl.explain.inputs import image_files, load_images
from tests.helpers import ODD_READABLE, UNREADABLE, write_odd_and_bad_images


def test_every_mode_becomes_rgb_and_bad_files_are_named(tmp_path):
    write_odd_and_bad_images(tmp_path)
    paths = image_files(tmp_path)
    assert "notes" not in {p.stem for p in paths}
    with pytest.warns(UserWarning, match="Skipped") as record:
        loaded = load_images(paths, size=32)
    message = str(record[0].message)
    assert "empty.jpg" in message and "text.jpg" in message
    assert set(ODD_READABLE) == set(loaded.names)
    assert loaded.inputs.shape[1:] == (3, 32, 32)
    assert len(loaded.inputs) == len(loaded.originals) == len(loaded.names)
    by_name = dict(zip(loaded.names, loaded.originals, strict=True))
    assert by_name["rgb"].shape == (20, 30, 3)  # originals keep their own size
    assert by_name["grey"].shape == (9, 7, 3)
    assert all(o.min() >= 0 and o.max() <= 1 for o in loaded.originals)
    skipped = sorted(s.split(" (")[0].rsplit("/", 1)[-1] for s in loaded.skipped)
    assert skipped == UNREADABLE


def test_transparency_is_composited_on_white():
    image = Image.new("RGBA", (2, 2), (255, 0, 0, 0))  # fully transparent red
    assert to_rgb(image).getpixel((0, 0)) == (255, 255, 255)


def test_nothing_readable_and_missing_folder(tmp_path):
    (tmp_path / "a.jpg").write_text("nope")
    with pytest.warns(UserWarning), pytest.raises(BadImageError, match="could be read"):
        load_images(image_files(tmp_path), 32)
    with pytest.raises(BadImageError, match="No image file or folder"):
        image_files(tmp_path / "missing")
