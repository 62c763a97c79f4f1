"""Reading one image file: every PIL mode becomes faithful RGB; unreadable files say why."""

import numpy as np
import pytest
from PIL import Image

from heatssl.data.images import read_image, to_rgb
from heatssl.errors import UnreadableImageError
from tests.helpers import ODD_READABLE, UNREADABLE, write_odd_and_bad_images


def test_odd_modes_are_read_as_rgb_and_bad_files_name_the_reason(tmp_path):
    write_odd_and_bad_images(tmp_path)
    for name in ODD_READABLE:
        path = next(tmp_path.glob(f"{name}.*"))
        assert read_image(path).mode == "RGB", name
    assert read_image(tmp_path / "tiny.png").size == (3, 2)
    for name in UNREADABLE:
        with pytest.raises(UnreadableImageError, match=name):
            read_image(tmp_path / name)
    with pytest.raises(UnreadableImageError, match="truncated"):
        read_image(tmp_path / "truncated.jpg")  # decoded in full, so the cut is found here


def test_sixteen_bit_is_scaled_not_clipped():
    deep = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))  # mid-grey in 16 bits
    value = to_rgb(deep).getpixel((0, 0))
    assert value == (128, 128, 128)  # clipping would give 255 (white)


def test_palette_transparency_and_alpha_land_on_white():
    pal = Image.new("P", (2, 2), 0)
    pal.putpalette([255, 0, 0] * 256)
    pal.info["transparency"] = 0
    assert to_rgb(pal).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("LA", (1, 1), (0, 255))).getpixel((0, 0)) == (0, 0, 0)  # opaque black


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (4, 2), (0, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert read_image(tmp_path / "rotated.jpg").size == (2, 4)
