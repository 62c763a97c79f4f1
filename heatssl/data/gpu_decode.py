"""``data.backend=torchvision``: JPEGs decoded in the training process, on its GPU (nvJPEG) or CPU.

Loader workers only read a file's bytes and header and draw its crop box and flip as the PIL path
does (:meth:`~heatssl.data.transforms.CropResize.box_and_flip`: the same draws from torch's
generator, in the same order), so with the same seeds the crops and flips equal
``data.backend=pil``'s. Plain JPEGs (:func:`plain_jpeg`: 8-bit Huffman, RGB or grey, complete, not
EXIF-rotated, within ``data.max_image_pixels``) travel encoded; every other file takes the PIL path
in the worker (:class:`~heatssl.data.datasets.ImageFiles`: same modes, bad-image policy and report)
and travels decoded. :func:`decode_batch`, run by the data module's ``on_before_batch_transfer``
hook, decodes a batch's JPEGs with one ``torchvision.io.decode_jpeg`` call on the device, then crops,
resizes (bilinear, antialiased, as PIL) and flips each: the usual uint8 ``[N, 3, S, S]`` batch. A
JPEG the decoder rejects is read by PIL there instead; one PIL cannot read either is named in the
batch's skipped files and left out (``data.on_bad_image=error``: stops the run, naming it).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from heatssl.data.datasets import Batch, ImageFiles, _bad_image_fix, _stack, collate_batch
from heatssl.data.encoded import _jpeg_verdict
from heatssl.data.images import DECODE_ERRORS, EXIF_ORIENTATION, read_image
from heatssl.data.transforms import Box, CropResize
from heatssl.errors import BadImageError, UnreadableImageError

PLAIN_MODES = ("RGB", "L")  # JPEG modes decode_jpeg turns into the RGB read_image gives


@dataclass
class Jpeg:
    """A plain JPEG as a worker read it: its bytes and its opened, undecoded header."""

    path: str
    data: bytes
    header: Image.Image


@dataclass
class EncodedImage:
    """One JPEG on its way to the decoder: bytes, crop box (full-size pixels) and flip."""

    path: str
    data: bytes
    box: Box
    flip: bool


def plain_jpeg(path: Any, max_pixels: int | None) -> Jpeg | None:
    """The file at ``path`` if ``decode_jpeg`` decodes it as :func:`read_image` would, else None
    (not a path, unreadable, not JPEG, CMYK, 12-bit, lossless, truncated, EXIF-rotated, too big)."""
    if not isinstance(path, str):
        return None
    try:
        with open(path, "rb") as file:
            data = file.read()
        if not data.startswith(b"\xff\xd8") or _jpeg_verdict(data) != "dali":
            return None
        header = Image.open(io.BytesIO(data))  # the header only: nothing is decoded
        width, height = header.size
        if (
            header.mode not in PLAIN_MODES
            or header.getexif().get(EXIF_ORIENTATION, 1) != 1
            or (max_pixels is not None and width * height > max_pixels)
        ):
            return None
    except DECODE_ERRORS:
        return None  # the PIL path reads it again and names the problem
    return Jpeg(path, data, header)


class _Plan:
    """The worker's transform: a :class:`Jpeg` -> :class:`EncodedImage`, a PIL image -> uint8."""

    def __init__(self, crop: CropResize) -> None:
        self.crop, self.draft = crop, crop.draft

    def __call__(self, image: Jpeg | Image.Image) -> EncodedImage | Tensor:
        if isinstance(image, Jpeg):
            return EncodedImage(image.path, image.data, *self.crop.box_and_flip(image.header))
        return self.crop(image)


class JpegFiles(ImageFiles):
    """``files`` with its plain JPEGs left encoded: items ``(EncodedImage | uint8 [3, S, S], label,
    skipped)``, with :class:`ImageFiles`' walk over unreadable files and the same random draws."""

    def __init__(self, files: ImageFiles) -> None:
        super().__init__(files.samples, _Plan(files.transform), files.on_bad, files.fill)
        self.max_pixels = files.max_pixels

    def read(self, index: int, draft: Any = None) -> Any:
        """A :class:`Jpeg` for a plain JPEG, else the RGB image PIL decodes (or its error)."""
        jpeg = plain_jpeg(self.source(index), self.max_pixels)
        return jpeg if jpeg is not None else super().read(index, draft)


@dataclass
class EncodedBatch:
    """A batch's images as they leave the workers: JPEG bytes in one tensor, PIL's images stacked."""

    data: Tensor  # every JPEG's bytes, one after another (uint8, 1-D)
    ends: list[int]  # where each JPEG's bytes end in data
    decoded: Tensor  # uint8 [M, 3, S, S]: the files PIL decoded in the workers
    jpeg: list[bool]  # per image, in batch order: encoded (True) or in decoded (False)
    paths: list[str] = field(default_factory=list)  # per JPEG
    boxes: list[Box] = field(default_factory=list)
    flips: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.jpeg)


def stack_encoded(images: list[EncodedImage | Tensor]) -> EncodedBatch:
    """One :class:`EncodedBatch` of a batch's worker outputs."""
    jpegs = [x for x in images if isinstance(x, EncodedImage)]
    blob = b"".join(j.data for j in jpegs)
    return EncodedBatch(
        data=torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        if blob
        else torch.empty(0, dtype=torch.uint8),
        ends=np.cumsum([len(j.data) for j in jpegs]).tolist(),
        decoded=_stack([x for x in images if not isinstance(x, EncodedImage)]),
        jpeg=[isinstance(x, EncodedImage) for x in images],
        paths=[j.path for j in jpegs],
        boxes=[j.box for j in jpegs],
        flips=[j.flip for j in jpegs],
    )


def collate_encoded(items: list[tuple[Any, ...]]) -> tuple[EncodedBatch, Tensor, list[str]]:
    """:func:`~heatssl.data.datasets.collate_batch` with the images left as an :class:`EncodedBatch`."""
    return collate_batch(items, stack_encoded)


def _decode_jpegs(pieces: list[Tensor], device: torch.device) -> list[Tensor | None]:
    """Every JPEG decoded to uint8 RGB on ``device`` in one call; if that fails, one by one (None:
    this one failed)."""
    if not pieces:
        return []
    try:
        return list(decode_jpeg(pieces, mode=ImageReadMode.RGB, device=device))
    except (RuntimeError, ValueError):
        pass
    out: list[Tensor | None] = []
    for piece in pieces:
        try:
            out.append(decode_jpeg(piece, mode=ImageReadMode.RGB, device=device))
        except (RuntimeError, ValueError):
            out.append(None)
    return out


def _pil_decode(data: Tensor, path: str, on_bad: str, skipped: list[str]) -> Tensor | None:
    """A JPEG the decoder rejected, read by PIL; None (named in ``skipped``) if PIL cannot either."""
    try:
        image = read_image(io.BytesIO(data.numpy().tobytes()), max_pixels=None, name=path)
    except UnreadableImageError as err:
        if on_bad == "error":
            raise BadImageError(_bad_image_fix(str(err))) from err
        skipped.append(str(err))
        return None
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def crop_resize(image: Tensor, box: Box, flip: bool, size: int) -> Tensor:
    """uint8 ``[3, H, W]`` -> uint8 ``[3, size, size]``: ``box`` (rounded to whole pixels), resized
    bilinear with antialiasing (as PIL's resize), mirrored if ``flip``."""
    left, top, right, bottom = (round(v) for v in box)
    part = image[None, :, top:bottom, left:right].float()
    out = F.interpolate(
        part, size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    out = out[0].round_().clamp_(0, 255).to(torch.uint8)
    return out.flip(-1) if flip else out


def decode_batch(batch: Any, device: torch.device, size: int, on_bad: str = "skip") -> Any:
    """A loader's batch with an :class:`EncodedBatch` -> ``(uint8 [N, 3, size, size] on device,
    labels, skipped)``; any other batch passes unchanged.

    Images keep their batch order. A JPEG neither the decoder nor PIL can read is left out (its
    label too) and named in ``skipped``; with ``on_bad="error"`` it raises :class:`BadImageError`.
    """
    if not isinstance(batch, tuple | list) or not batch or not isinstance(batch[0], EncodedBatch):
        return batch
    encoded, labels, skipped = batch[0], batch[1], list(batch[2])
    starts = [0, *encoded.ends[:-1]]
    pieces = [encoded.data[a:b] for a, b in zip(starts, encoded.ends, strict=True)]
    pictures = _decode_jpegs(pieces, device)
    decoded = encoded.decoded.to(device, non_blocking=True)
    images: list[Tensor] = []
    keep: list[int] = []
    jpegs, plain = iter(range(len(pieces))), iter(decoded)
    for i, is_jpeg in enumerate(encoded.jpeg):
        if not is_jpeg:
            images.append(next(plain))
            keep.append(i)
            continue
        j = next(jpegs)
        picture = pictures[j]
        if picture is None:
            picture = _pil_decode(pieces[j], encoded.paths[j], on_bad, skipped)
            if picture is None:
                continue
            picture = picture.to(device)
        images.append(crop_resize(picture, encoded.boxes[j], encoded.flips[j], size))
        keep.append(i)
    if len(keep) < len(encoded):
        labels = labels[keep]
    if not images:
        return torch.empty(0, dtype=torch.uint8, device=device), labels, skipped
    out: Batch = (torch.stack(images), labels, skipped)
    return out
