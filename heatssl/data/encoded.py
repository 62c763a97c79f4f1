"""Image files as the encoded bytes a GPU decoder takes, read in parallel in the order of a pass.

A GPU decoder (NVIDIA DALI's nvJPEG) fails a whole batch at a file it cannot decode, so it could
neither skip the file nor fill its slot as :class:`~heatssl.data.datasets.ImageFiles` does. Each file
is therefore checked before the decoder sees it (:func:`encoded_image`): JPEGs, and opaque PNGs and
WebPs, go as they are once they look complete; files such a decoder might decode differently from
:func:`~heatssl.data.images.read_image` (transparency, which PIL composites on white; 16-bit or odd
modes; formats other than JPEG, PNG and WebP) are decoded by PIL here and handed over as
uncompressed PPM: rare, and slower.

:class:`BatchReader` reads a pass's batches in a background thread, the files of a batch in
parallel, and applies the PIL path's bad-image policy, so the training thread never waits on a file
system (32 us per file from the page cache; 0.3-1 ms cold on NFS or Lustre, which would cap a process
at 1-3k images/s if read one by one in the training thread).
"""

from __future__ import annotations

import contextlib
import io
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from heatssl.data.datasets import _bad_image_fix, no_readable_file
from heatssl.data.images import DECODE_ERRORS, MAX_IMAGE_PIXELS, check_pixels, read_image
from heatssl.errors import BadImageError, UnreadableImageError

JPEG_SOF_DALI = (0xC0, 0xC1, 0xC2)  # baseline, extended and progressive Huffman JPEGs
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DALI_MODES = ("RGB", "L", "1", "P")  # PIL modes DALI turns into the same RGB as read_image


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


def encoded_image(path: str, max_pixels: int | None = MAX_IMAGE_PIXELS) -> np.ndarray:
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
    try:
        with Image.open(io.BytesIO(data)) as header:  # the size only: nothing is decoded
            check_pixels(header.size, path, max_pixels)
    except DECODE_ERRORS:
        pass  # not an image PIL knows: read_image below names the problem
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
    return np.frombuffer(_ppm(read_image(path, max_pixels=max_pixels)), dtype=np.uint8)


@dataclass
class Slot:
    """One batch as handed to the decoder: the encoded files and what stays in Python beside them."""

    files: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    data: list[np.ndarray] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    error: BaseException | None = None  # raised when the consumer reaches this batch


def _attempt(path: str, max_pixels: int | None) -> np.ndarray | UnreadableImageError:
    try:
        return encoded_image(path, max_pixels)
    except UnreadableImageError as err:
        return err


_END = object()


class BatchReader:
    """The batches of one pass over ``indices``, read ahead in a background thread.

    Each batch's files are read and checked in parallel (``threads``), then the bad-image policy of
    :class:`~heatssl.data.datasets.ImageFiles` is applied in sampler order: ``on_bad="error"`` stops
    at the first unreadable file, otherwise it is named in the slot's ``skipped`` and, with
    ``fill``, its slot takes the next readable file. At most ``depth`` batches wait, read, for the
    consumer; an error becomes a slot, raised when the consumer reaches it. :meth:`close` ends an
    unfinished pass.
    """

    def __init__(
        self,
        samples: list[tuple[str, int]],
        indices: Iterator[int],
        batch_size: int,
        drop_last: bool,
        on_bad: str,
        fill: bool,
        threads: int,
        depth: int = 2,
        max_pixels: int | None = MAX_IMAGE_PIXELS,
    ) -> None:
        self.samples, self.batch_size, self.drop_last = samples, batch_size, drop_last
        self.max_pixels = max_pixels
        self.on_bad, self.fill = on_bad, fill
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="heatssl-read")
        self._thread = threading.Thread(
            target=self._run, args=(indices,), name="heatssl-batches", daemon=True
        )
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, indices: Iterator[int]) -> None:
        batch: list[int] = []
        try:
            for index in indices:
                batch.append(index)
                if len(batch) == self.batch_size:
                    if not self._put(self.read_slot(batch)):
                        return
                    batch = []
            if batch and not self.drop_last:
                self._put(self.read_slot(batch))
        except Exception as err:
            self._put(Slot(error=err))
        finally:
            self._put(_END)

    def read_slot(self, indices: list[int]) -> Slot:
        """Read and check the files of one batch (in parallel), applying the bad-image policy."""
        slot, count = Slot(), len(self.samples)
        paths = [self.samples[i][0] for i in indices]
        first = list(self._pool.map(_attempt, paths, [self.max_pixels] * len(paths)))
        for index, result in zip(indices, first, strict=True):
            met: list[str] = []
            for step in range(count):  # a run of unreadable files, however long, is skipped
                path, label = self.samples[(index + step) % count]
                data = result if step == 0 else _attempt(path, self.max_pixels)  # rare: read here
                if isinstance(data, UnreadableImageError):
                    if self.on_bad == "error":
                        raise BadImageError(_bad_image_fix(str(data))) from data
                    met.append(str(data))
                    if not self.fill:
                        break  # left out: no image is counted twice in evaluation
                    continue
                slot.files.append(path)
                slot.labels.append(int(label))
                slot.data.append(data)
                break
            else:
                raise BadImageError(no_readable_file(self.samples, met))
            slot.skipped.extend(met)
        return slot

    def __iter__(self) -> Iterator[Slot]:
        return self

    def __next__(self) -> Slot:
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)  # every later call ends too
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop reading ahead (an unfinished pass) and release the threads."""
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.1)
        self._pool.shutdown(wait=True)
