"""An NVIDIA DALI input pipeline for image folders, with the meaning of the PIL loader's batches.

Why: with a fast GPU step, decoding JPEGs with PIL in loader workers becomes the bottleneck. DALI
decodes on the GPU with nvJPEG (``device_id`` set) and crops, resizes and flips there, so the loader
keeps up; without a GPU (``device_id=None``) the same graph runs on CPU ops, which is how it is
tested. :class:`DaliLoader` yields what the PIL path's ``DataLoader`` yields: ``(images, labels,
skipped)`` with uint8 ``[N, 3, S, S]`` images (RGB, 0..255, normalised later on the device), int64
labels and the unreadable files met (``path: reason``).

What stays in Python, so that it behaves exactly like the PIL path: the order (the
:class:`~heatssl.data.sampler.EpochSampler`'s, so epochs, DDP shards and mid-epoch resume match),
reading the files, and the bad-image policy of :class:`~heatssl.data.datasets.ImageFiles`. Each file
is checked before DALI sees it (:func:`encoded_image`), because DALI fails a whole batch at a file it
cannot decode, so it could neither skip the file nor fill its slot. Files DALI might decode
differently from :func:`~heatssl.data.images.read_image` (transparency, which PIL composites on
white; 16-bit or odd modes; formats other than JPEG, PNG and WebP, such as GIF, TIFF or BMP) are
decoded by PIL in the feeding step and handed to DALI as uncompressed PPM: rare, and slower.
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import weakref
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from heatssl.data.datasets import MAX_CONSECUTIVE_BAD, Batch, _bad_image_fix
from heatssl.data.images import DECODE_ERRORS, read_image
from heatssl.data.sampler import EpochSampler
from heatssl.data.transforms import CROP_RATIO
from heatssl.errors import ArgumentError, BadImageError, ConfigError, UnreadableImageError

DALI_INSTALL_HINT = (
    "data.backend=dali needs NVIDIA DALI: pip install -e '.[dali]' (nvidia-dali-cuda120 from "
    "PyPI; it decodes on the GPU and runs CPU-only without one); or set data.backend=pil"
)
JPEG_SOF_DALI = (0xC0, 0xC1, 0xC2)  # baseline, extended and progressive Huffman JPEGs
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DALI_MODES = ("RGB", "L", "1", "P")  # PIL modes DALI turns into the same RGB as read_image
NAMED_FILES = 8  # files named in a message about a whole batch

_LIVE_PIPELINES: weakref.WeakSet[Any] = weakref.WeakSet()  # every pipeline this process built
_INHERITED_PIPELINES: list[Any] = []  # in a forked child: the parent's, never destroyed


def _keep_inherited_pipelines() -> None:
    """In a forked child (a PIL loader worker, say), keep the parent's DALI pipelines alive.

    Their threads do not come along with a fork, so destroying one in the child, as the garbage
    collector does with a pipeline left in a reference cycle, crashes the child (SIGSEGV). Kept
    here, they are never destroyed: loader workers leave with ``os._exit``.
    """
    _INHERITED_PIPELINES.extend(_LIVE_PIPELINES)


os.register_at_fork(after_in_child=_keep_inherited_pipelines)


def dali_available() -> bool:
    """Whether NVIDIA DALI can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):  # no ``nvidia`` package at all, or a broken one
        return False


def require_dali() -> None:
    """Raise :class:`ConfigError` with the install command when DALI is missing."""
    if not dali_available():
        raise ConfigError(DALI_INSTALL_HINT + ".")


# ----- checking files before DALI sees them ---------------------------------------------------
def _jpeg_verdict(data: bytes) -> str:
    """``"dali"`` for a JPEG DALI decodes like PIL, ``"truncated"``, or ``"pil"`` (let PIL decide).

    Walks the marker segments up to the first scan (so an EXIF thumbnail's end marker is not taken
    for the image's), checks the frame type and precision, then looks for the end-of-image marker
    after the scan: a truncated file lacks it.
    """
    pos, size, dali_frame = 2, len(data), False
    while pos + 4 <= size:
        if data[pos] != 0xFF:
            return "pil"  # not a marker where one belongs: a corrupt header
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        if marker == 0xDA:  # start of scan: the compressed image follows
            if not dali_frame:
                return "pil"
            return "dali" if data.rfind(b"\xff\xd9") > pos else "truncated"
        if marker == 0xD9:
            return "pil"  # image ends before any scan
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a frame header
            if marker not in JPEG_SOF_DALI or pos + 4 >= size or data[pos + 4] != 8:
                return "pil"  # lossless, arithmetic-coded or 12-bit: whatever PIL makes of it
            dali_frame = True
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return "truncated"


def _header_verdict(data: bytes) -> bool:
    """Whether DALI decodes this PNG or WebP as :func:`read_image` would (opaque, complete)."""
    if data.startswith(PNG_MAGIC):
        if data.rfind(b"IEND", max(0, len(data) - 64)) < 0:
            return False  # truncated: PIL names the problem
    elif int.from_bytes(data[4:8], "little") + 8 > len(data):
        return False  # truncated WebP
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.mode in DALI_MODES and "transparency" not in image.info
    except DECODE_ERRORS:
        return False


def _ppm(image: Image.Image) -> bytes:
    """An RGB PIL image as PPM bytes: a format DALI decodes exactly and at no cost."""
    width, height = image.size
    return f"P6\n{width} {height}\n255\n".encode() + image.tobytes()


def encoded_image(path: str) -> np.ndarray:
    """The bytes to hand DALI for the file at ``path``, or :class:`UnreadableImageError` with why.

    JPEGs, and opaque PNGs and WebPs, go to DALI as they are once they look complete; anything else
    is decoded by :func:`~heatssl.data.images.read_image` (PIL: its modes, transparency on white,
    its errors) and handed over as PPM, so every file means what it means on the PIL path.
    """
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as err:
        raise UnreadableImageError(f"{path}: {type(err).__name__}: {err.strerror or err}") from err
    if not data:
        raise UnreadableImageError(f"{path}: empty file")
    if data.startswith(b"\xff\xd8"):
        verdict = _jpeg_verdict(data)
        if verdict == "truncated":
            raise UnreadableImageError(f"{path}: truncated JPEG (no end marker)")
        if verdict == "dali":
            return np.frombuffer(data, dtype=np.uint8)
    elif (data.startswith(PNG_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")) and (
        _header_verdict(data)
    ):
        return np.frombuffer(data, dtype=np.uint8)
    return np.frombuffer(_ppm(read_image(path)), dtype=np.uint8)


# ----- the loader -----------------------------------------------------------------------------
@dataclass
class _Slot:
    """One batch as handed to DALI: what DALI decodes and what stays in Python beside it."""

    files: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    data: list[np.ndarray] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    error: BaseException | None = None  # raised when the consumer reaches this batch


class _Feed:
    """DALI's ``external_source``: the next non-empty batch of the epoch, ``StopIteration`` at its end.

    Every batch it hands out (and every empty or failed one it passes over) joins ``fifo`` in feed
    order; DALI returns outputs in the same order, so the consumer pairs them with their labels and
    skipped files however far DALI prefetches.
    """

    def __init__(self) -> None:
        self.slots: Iterator[_Slot] = iter(())
        self.fifo: deque[_Slot] = deque()

    def __call__(self) -> list[np.ndarray]:
        for slot in self.slots:
            self.fifo.append(slot)
            if slot.error is not None:
                self.slots = iter(())  # the epoch ends at an error; the consumer raises it
                break
            if slot.data:
                return slot.data
        raise StopIteration


class DaliLoader:
    """Batches ``(uint8 [N, 3, S, S], int64 [N], skipped)`` of image files, decoded by NVIDIA DALI.

    The meaning of the PIL path's ``DataLoader`` over :class:`~heatssl.data.datasets.ImageFiles`
    with :class:`~heatssl.data.transforms.CropResize`: training (``train=True``) takes a random
    resized crop (area in ``[crop_scale_min, 1]``, aspect ratio in ``[3/4, 4/3]``), resizes it to
    ``image_size`` (linear, antialiased) and flips it with probability 1/2; evaluation resizes the
    centred square to ``image_size``. The order is ``sampler``'s (set ``sampler.set_epoch`` and
    ``sampler.skip_next`` as for a DataLoader); bad files follow ``on_bad`` and ``fill`` like
    ImageFiles. ``device_id=None`` runs CPU ops (images on the CPU), otherwise nvJPEG and GPU ops
    with images on ``cuda:device_id``. The DALI pipeline is built on the first pass and reused;
    one pass at a time (a new ``iter`` ends an unfinished one).
    """

    def __init__(
        self,
        samples: list[tuple[str, int]],
        *,
        image_size: int,
        train: bool,
        batch_size: int,
        sampler: EpochSampler,
        drop_last: bool,
        num_threads: int,
        device_id: int | None,
        seed: int,
        crop_scale_min: float = 0.35,
        on_bad: str = "skip",
        fill: bool = True,
        prefetch: int = 2,
    ) -> None:
        require_dali()
        if image_size <= 0 or batch_size <= 0 or num_threads <= 0 or prefetch <= 0:
            raise ArgumentError(
                f"image_size={image_size}, batch_size={batch_size}, num_threads={num_threads}, "
                f"prefetch={prefetch}: all must be > 0."
            )
        if not 0.0 < crop_scale_min <= 1.0:
            raise ArgumentError(f"crop_scale_min={crop_scale_min} must be in (0, 1].")
        if on_bad not in ("skip", "error"):
            raise ArgumentError(f"on_bad={on_bad!r} is not allowed. Allowed: 'skip', 'error'.")
        self.samples = list(samples)
        self.image_size, self.train = image_size, train
        self.batch_size, self.sampler, self.drop_last = batch_size, sampler, drop_last
        self.num_workers = num_threads  # the name throughput reports read
        self.batch_sampler = None  # Lightning looks here first, then at ``sampler`` (set_epoch)
        self.device_id, self.seed = device_id, seed
        self.crop_scale_min, self.on_bad, self.fill = crop_scale_min, on_bad, fill
        self.prefetch = prefetch
        self.device = torch.device("cpu" if device_id is None else f"cuda:{device_id}")
        self._feed = _Feed()
        self._pipe: Any = None  # built on the first pass
        self._unfinished = False  # a pass stopped before its end: drain DALI before the next

    def __len__(self) -> int:
        """Batches per epoch for this process, as a DataLoader counts them (``skip_next`` aside)."""
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    # ----- Python side: order, reading, bad files -----------------------------------------------
    def _read_slot(self, indices: list[int]) -> _Slot:
        """Read and check the files of one batch, applying the bad-image policy."""
        slot, count = _Slot(), len(self.samples)
        for index in indices:
            met: list[str] = []
            for step in range(min(MAX_CONSECUTIVE_BAD, count)):
                path, label = self.samples[(index + step) % count]
                try:
                    data = encoded_image(path)
                except UnreadableImageError as err:
                    if self.on_bad == "error":
                        raise BadImageError(_bad_image_fix(str(err))) from err
                    met.append(str(err))
                    if not self.fill:
                        break  # left out: no image is counted twice in evaluation
                    continue
                slot.files.append(path)
                slot.labels.append(int(label))
                slot.data.append(data)
                break
            else:
                raise BadImageError(
                    f"{len(met)} unreadable image files in a row from {self.samples[index][0]} "
                    f"(last: {met[-1]}): the dataset looks broken. Check the files under that folder."
                )
            slot.skipped.extend(met)
        return slot

    def _slots(self, indices: Iterator[int]) -> Iterator[_Slot]:
        """The pass's batches; an error becomes a slot, raised when the consumer reaches it."""
        batch: list[int] = []
        try:
            for index in indices:
                batch.append(index)
                if len(batch) == self.batch_size:
                    yield self._read_slot(batch)
                    batch = []
            if batch and not self.drop_last:
                yield self._read_slot(batch)
        except Exception as err:
            yield _Slot(error=err)

    # ----- DALI side ------------------------------------------------------------------------------
    def _build(self) -> Any:
        """The DALI pipeline: decode, crop, resize, flip; CPU ops or nvJPEG plus GPU ops."""
        from nvidia.dali import Pipeline, fn, types
        from nvidia.dali import math as dmath

        gpu = self.device_id is not None
        decoder, ops = ("mixed", "gpu") if gpu else ("cpu", "cpu")
        size = [self.image_size, self.image_size]
        pipe = Pipeline(
            batch_size=self.batch_size,
            num_threads=self.num_workers,
            device_id=self.device_id,
            seed=self.seed,
            prefetch_queue_depth=self.prefetch,
        )
        _LIVE_PIPELINES.add(pipe)  # before build: a pipeline whose build fails has threads too
        with pipe:
            encoded = fn.external_source(
                source=self._feed, batch=True, dtype=types.UINT8, ndim=1, name="encoded"
            )
            if self.train:
                images = fn.decoders.image_random_crop(
                    encoded,
                    device=decoder,
                    output_type=types.RGB,
                    random_area=[self.crop_scale_min, 1.0],
                    random_aspect_ratio=list(CROP_RATIO),
                    num_attempts=10,
                )
                images = fn.resize(
                    images, device=ops, size=size, interp_type=types.INTERP_LINEAR, antialias=True
                )
                mirror = fn.random.coin_flip(probability=0.5)
            else:
                shape = fn.peek_image_shape(encoded, dtype=types.FLOAT)  # upright H, W, C
                height, width = shape[0], shape[1]
                side = dmath.min(height, width)
                images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
                images = fn.resize(
                    images,
                    device=ops,
                    size=size,
                    roi_start=fn.stack((height - side) * 0.5, (width - side) * 0.5),
                    roi_end=fn.stack((height + side) * 0.5, (width + side) * 0.5),
                    roi_relative=False,
                    interp_type=types.INTERP_LINEAR,
                    antialias=True,
                )
                mirror = 0
            images = fn.crop_mirror_normalize(
                images, device=ops, dtype=types.UINT8, output_layout="CHW", mirror=mirror
            )
            pipe.set_outputs(images)
        pipe.build()
        return pipe

    def _pipeline(self) -> Any:
        """The pipeline, built once, at the start of an epoch (an unfinished pass drained)."""
        if self._pipe is None:
            self._pipe = self._build()
            self._unfinished = False
        if self._unfinished:
            self._feed.slots = iter(())
            try:
                while True:
                    self._pipe.run()
            except StopIteration:
                pass
            except RuntimeError:  # a bad file among the abandoned batches: start afresh
                self._pipe = self._build()
        self._feed.fifo.clear()
        self._pipe.reset()
        return self._pipe

    def _images(self, output: Any) -> torch.Tensor:
        """A DALI TensorList of ``[3, S, S]`` uint8 images as one torch tensor on ``self.device``."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        shape = [len(output), 3, self.image_size, self.image_size]
        images = torch.empty(shape, dtype=torch.uint8, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        return feed_ndarray(output.as_tensor(), images, cuda_stream=stream)

    def _decode_error(self, err: RuntimeError, slot: _Slot) -> BadImageError:
        """The error for a batch DALI failed on: the file if DALI says which, PIL's verdict, the fix.

        DALI stops the whole batch at a file it cannot decode; its message may give the file's place
        in the batch (``sample #i``), otherwise the batch's files are named.
        """
        text = str(err)
        place = re.search(r"decode sample #?(\d+)", text)
        suspects = slot.files
        if place and int(place.group(1)) < len(slot.files):
            suspects = [slot.files[int(place.group(1))]]
            where = f"DALI cannot decode {suspects[0]}"
        else:
            names = ", ".join(slot.files[:NAMED_FILES])
            more = len(slot.files) - NAMED_FILES
            names += f" and {more} more" if more > 0 else ""
            where = (
                f"DALI cannot decode an image in a batch of {len(slot.files)} files ({names}) "
                f"and stops without saying which"
            )
        unreadable = []
        for path in suspects:
            try:
                read_image(path)
            except UnreadableImageError as bad:
                unreadable.append(str(bad))
        if unreadable:
            verdict = f"PIL cannot read {'it' if len(suspects) == 1 else 'these'} either: "
            verdict += "; ".join(unreadable)
        elif len(suspects) == 1:
            verdict = "PIL reads it, so it holds something DALI's decoder does not support"
        else:
            verdict = "PIL reads them all, so one holds something DALI's decoder does not support"
        after = text.split("encountered:", 1)[-1].splitlines()
        detail = next((line.strip(" :") for line in after if line.strip(" :")), type(err).__name__)
        return BadImageError(
            f"{where} ({detail}); {verdict}. DALI fails the whole batch, so "
            f"the file was not skipped. Fix: remove or re-save the file (data.backend=pil skips "
            f"and names unreadable files, which finds them), or train with data.backend=pil."
        )

    def __iter__(self) -> Iterator[Batch]:
        """One pass: ``iter(self.sampler)``'s indices in batches, decoded by DALI as they are fed."""
        pipe = self._pipeline()
        feed = self._feed
        feed.slots = self._slots(iter(self.sampler))
        self._unfinished = True
        while True:
            try:
                outputs = pipe.run()
            except StopIteration:
                outputs = None
            except RuntimeError as err:
                self._pipe = None  # DALI's state after a failed run is unknown: rebuild next time
                if not re.search(r"decode|peek_image_shape", str(err), re.IGNORECASE):
                    raise
                slot = next((s for s in feed.fifo if s.data), _Slot())  # the batch DALI was on
                raise self._decode_error(err, slot) from err
            while feed.fifo:
                slot = feed.fifo.popleft()
                if slot.error is not None:
                    self._unfinished = False  # DALI has reached the end of the pass already
                    raise slot.error
                labels = torch.tensor(slot.labels, dtype=torch.int64)
                if not slot.data:
                    empty = torch.empty(0, 3, self.image_size, self.image_size, dtype=torch.uint8)
                    yield empty.to(self.device), labels.to(self.device), slot.skipped
                    continue
                if outputs is None:
                    raise RuntimeError("DALI ended the pass before a batch it was fed")
                images = self._images(outputs[0])
                yield images, labels.to(self.device), slot.skipped
                break
            if outputs is None:
                break
        self._unfinished = False
