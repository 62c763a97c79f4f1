"""An NVIDIA DALI input pipeline for image folders, with the meaning of the PIL loader's batches.

Why: with a fast GPU step, decoding JPEGs with PIL in loader workers becomes the bottleneck. DALI
decodes on the GPU with nvJPEG (``device_id`` set) and crops, resizes and flips there, so the loader
keeps up; without a GPU (``device_id=None``) the same graph runs on CPU ops, which is how it is
tested. :class:`DaliLoader` yields what the PIL path's ``DataLoader`` yields: ``(images, labels,
skipped)`` with uint8 ``[N, 3, S, S]`` images (RGB, 0..255, normalised later on the device), int64
labels and the unreadable files met (``path: reason``).

What stays in Python, so that it behaves exactly like the PIL path: the order (the
:class:`~heatssl.data.sampler.EpochSampler`'s, so epochs, DDP shards and mid-epoch resume match),
reading the files, and the bad-image policy of :class:`~heatssl.data.datasets.ImageFiles`, all in
:class:`~heatssl.data.encoded.BatchReader`: a background thread reads the batches ahead, each
batch's files in parallel, and checks every file before DALI sees it (DALI fails a whole batch at a
file it cannot decode). Nothing waits on the host in the training thread: DALI's outputs are bound
to the current CUDA stream and copied into torch on it, and labels are handed over on the CPU
(pinned), for Lightning to move without a sync.
"""

from __future__ import annotations

import importlib.util
import os
import re
import weakref
from collections import deque
from collections.abc import Iterator
from typing import Any

import torch

from heatssl.data.datasets import Batch
from heatssl.data.encoded import BatchReader, Slot
from heatssl.data.images import read_image
from heatssl.data.sampler import EpochSampler
from heatssl.data.transforms import CROP_RATIO
from heatssl.errors import ArgumentError, BadImageError, ConfigError, UnreadableImageError

DALI_INSTALL_HINT = (
    "data.backend=dali needs NVIDIA DALI: pip install -e '.[dali]' (nvidia-dali-cuda120 from "
    "PyPI; it decodes on the GPU and runs CPU-only without one); or set data.backend=pil"
)
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


# ----- the loader -----------------------------------------------------------------------------
class _Feed:
    """DALI's ``external_source``: the next non-empty batch of the epoch, ``StopIteration`` at its end.

    Every batch it hands out (and every empty or failed one it passes over) joins ``fifo`` in feed
    order; DALI returns outputs in the same order, so the consumer pairs them with their labels and
    skipped files however far DALI prefetches.
    """

    def __init__(self) -> None:
        self.slots: Iterator[Slot] = iter(())
        self.fifo: deque[Slot] = deque()

    def start(self, slots: Iterator[Slot]) -> None:
        """Feed ``slots`` from now on; a reader still reading ahead for an earlier pass stops."""
        close = getattr(self.slots, "close", None)
        if close is not None:
            close()
        self.slots = slots

    def __call__(self) -> list[Any]:
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
        max_pixels: int | None = None,
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
        self.max_pixels = max_pixels
        self.device = torch.device("cpu" if device_id is None else f"cuda:{device_id}")
        self._feed = _Feed()
        self._pipe: Any = None  # built on the first pass
        self._unfinished = False  # a pass stopped before its end: drain DALI before the next

    def __len__(self) -> int:
        """Batches per epoch for this process, as a DataLoader counts them (``skip_next`` aside)."""
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

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
            self._feed.start(iter(()))
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

    def _labels(self, labels: list[int]) -> torch.Tensor:
        """Labels on the CPU, pinned when the images are on a GPU: Lightning then moves them
        without a sync (a copy from pageable memory would wait for the stream)."""
        out = torch.tensor(labels, dtype=torch.int64)
        return out.pin_memory() if self.device.type == "cuda" else out

    def _decode_error(self, err: RuntimeError, slot: Slot) -> BadImageError:
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
                read_image(path, max_pixels=self.max_pixels)
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
        reader = BatchReader(
            self.samples,
            iter(self.sampler),
            self.batch_size,
            self.drop_last,
            self.on_bad,
            self.fill,
            threads=self.num_workers,
            depth=self.prefetch + 1,
            max_pixels=self.max_pixels,
        )
        feed.start(reader)
        self._unfinished = True
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        while True:
            try:
                # bound to the training stream: DALI does not make the host wait for the batch
                outputs = pipe.run(stream) if stream is not None else pipe.run()
            except StopIteration:
                outputs = None
            except RuntimeError as err:
                self._pipe = None  # DALI's state after a failed run is unknown: rebuild next time
                if not re.search(r"decode|peek_image_shape", str(err), re.IGNORECASE):
                    raise
                slot = next((s for s in feed.fifo if s.data), Slot())  # the batch DALI was on
                raise self._decode_error(err, slot) from err
            while feed.fifo:
                slot = feed.fifo.popleft()
                if slot.error is not None:
                    self._unfinished = False  # DALI has reached the end of the pass already
                    raise slot.error
                labels = self._labels(slot.labels)
                if not slot.data:
                    empty = torch.empty(0, 3, self.image_size, self.image_size, dtype=torch.uint8)
                    yield empty.to(self.device), labels, slot.skipped
                    continue
                if outputs is None:
                    raise RuntimeError("DALI ended the pass before a batch it was fed")
                images = self._images(outputs[0])
                yield images, labels, slot.skipped
                break
            if outputs is None:
                break
        self._unfinished = False
