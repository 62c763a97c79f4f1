"""Reading one image file into RGB, whatever its mode, or saying exactly why it cannot be read.

The lowest layer of image handling: datasets (:mod:`heatssl.data.datasets`) and heat-map inputs
(:mod:`heatssl.explain.inputs`) both read files through :func:`read_image`, so a CMYK JPEG or a
16-bit PNG looks the same everywhere and an unreadable file raises one exception type with the reason.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from heatssl.errors import HeatSSLWarning, UnreadableImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}

# What PIL raises for files it cannot decode: unknown format (UnidentifiedImageError is an OSError),
# truncated data (OSError), corrupt headers (SyntaxError, ValueError), short reads (EOFError).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB for any PIL mode: grey, 1-bit, 16/32-bit integer, float, palette, alpha, CMYK, YCbCr.

    16-bit integers are scaled (65535 -> 255, rounded) instead of clipped, so a 16-bit PNG is not
    white, in integer arithmetic (4 bytes a pixel, not float64's 8); transparent pixels are
    composited on white, the usual background of cut-out photos.
    """
    if image.mode.startswith("I;16"):
        arr = np.asarray(image).astype(np.uint32)
        image = Image.fromarray(((arr * 255 + 32767) // 65535).astype(np.uint8))
    elif image.mode.startswith("I") or image.mode == "F":
        arr = np.asarray(image, dtype=np.float32)
        if image.mode == "F" and arr.size and float(np.nanmax(arr)) <= 1.0:
            arr = arr * 255.0  # float images in [0, 1]
        elif arr.size and float(arr.max()) > 255.0:
            arr = arr / 257.0  # 16-bit range onto 8 bits
        image = Image.fromarray(np.nan_to_num(arr).clip(0, 255).round().astype(np.uint8))
    if image.mode == "P" or image.mode == "PA":
        image = image.convert("RGBA")  # palette transparency becomes a real alpha channel
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image if image.mode == "RGB" else image.convert("RGB")


EXIF_ORIENTATION = 0x0112
MAX_IMAGE_PIXELS = 64_000_000
"""Default of ``data.max_image_pixels``: larger images are refused from their header, undecoded."""


def check_pixels(size: tuple[int, int], path: str | Path, max_pixels: int | None) -> None:
    """Raise :class:`UnreadableImageError` for an image of more than ``max_pixels`` pixels."""
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise UnreadableImageError(
            f"{path}: {width}x{height} = {width * height:,} pixels, over "
            f"data.max_image_pixels={max_pixels:,} (decoding it would take "
            f"{width * height * 3 / 1e9:.1f} GB or more); raise that key to read such images"
        )


def read_image(
    path: str | Path | BinaryIO,
    draft: Callable[[Image.Image], None] | None = None,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
    name: str | None = None,
) -> Image.Image:
    """The image at ``path`` (a file, or an open binary file such as a shard member's bytes), fully
    decoded, upright (EXIF orientation) and RGB.

    Decoding happens here, not lazily later, so a truncated file fails in this call. Raises
    :class:`UnreadableImageError` naming the file (``name`` where ``path`` is not one) and the
    reason for anything PIL cannot decode, and for an image of more than ``max_pixels`` pixels
    (judged from its header, before decoding). ``draft`` sees the opened, not yet decoded image
    (its size is known) and may ask for a reduced decode (``Image.draft``); it is skipped for files
    whose EXIF orientation rotates them.
    """
    label = name or path
    try:
        with Image.open(path) as image:
            check_pixels(image.size, label, max_pixels)
            if draft is not None and image.getexif().get(EXIF_ORIENTATION, 1) == 1:
                draft(image)
            image.load()
            upright = ImageOps.exif_transpose(image)
            return to_rgb(upright)
    except DECODE_ERRORS as err:
        reason = str(err) or type(err).__name__
        raise UnreadableImageError(f"{label}: {type(err).__name__}: {reason}") from err


def warn_unreadable(skipped: list[str], what: str = "Skipped", first: int = 10) -> None:
    """One warning naming how many files could not be read and the first ``first`` of them."""
    if skipped:
        names = "; ".join(skipped[:first])
        warnings.warn(
            f"{what} {len(skipped)} unreadable image file(s): {names}", HeatSSLWarning, stacklevel=3
        )
