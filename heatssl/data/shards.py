"""Streams of shards (tar files, Parquet files) read in order, with the image-folder path's guarantees.

A :class:`ShardStream` reads records (image bytes and a label) shard by shard, never by random access,
for data kept as WebDataset tars or Hugging Face Parquet files. It keeps what the image-folder path
promises, exactly:

- **Every process gets the same number of batches, no sample is read twice in an epoch.** Shards are
  dealt to processes once, balanced by their sample counts (largest first to the lightest process),
  and stay with them; each epoch shuffles a process's shard order, splits its shards over its loader
  workers and passes the records through a seeded shuffle buffer. Every process yields
  ``floor(min_process_samples / batch) - (workers - 1)`` batches (agreed over processes at the
  start), so an epoch leaves out at most the smallest share's remainder plus one batch per loader
  worker, other samples in every epoch (a fixed length no worker split can fall short of).
- **Unreadable members keep batch sizes and the count.** Each record fills one slot; a member that
  cannot be decoded (or a shard that ends early) is named in the batch's ``skipped`` list and its
  slot takes another image of the same batch, so a worker consumes exactly ``batch`` records a batch.
- **A resume continues the epoch exactly.** The stream is a function of (seed, epoch, process,
  worker) alone, so a run stopped after B batches skips, in each worker, the records of the batches
  that worker had delivered (re-read, not decoded) and yields the rest: nothing is skipped or
  repeated, and the batches come in the order of the unbroken run.

Evaluation streams (``train=False``) read every record in shard order; under several processes each
takes every ``world``-th record (the shortest padded by wrapping, as the image-folder path does).
"""

from __future__ import annotations

import io
import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from heatssl.data.datasets import Batch, _bad_image_fix, collate_batch
from heatssl.data.images import MAX_IMAGE_PIXELS, read_image
from heatssl.errors import BadImageError, UnreadableImageError


@dataclass(frozen=True)
class Shard:
    """One file of records and how many records it holds."""

    path: str
    count: int


@dataclass(frozen=True)
class Record:
    """One sample as stored: a name for messages, the encoded image (None: unreadable), the label."""

    name: str
    data: bytes | None
    label: int
    error: str | None = None


Reader = Callable[[Shard], Iterator[Record]]
"""Yields a shard's records in order (at most ``shard.count``; the stream pads a short shard)."""


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def deal(shards: list[Shard], world: int) -> list[list[Shard]]:
    """Shards per process, balanced by records: largest first to the lightest process (fixed)."""
    parts: list[list[Shard]] = [[] for _ in range(world)]
    totals = [0] * world
    for shard in sorted(shards, key=lambda s: (-s.count, s.path)):
        lightest = min(range(world), key=lambda r: (totals[r], r))
        parts[lightest].append(shard)
        totals[lightest] += shard.count
    return parts


def worker_quotas(capacities: list[int], batch: int, total: int) -> list[int]:
    """Full batches per worker summing to ``total``, none above what its records allow."""
    fulls = [c // batch for c in capacities]
    if sum(fulls) < total:
        raise ValueError(f"workers hold {sum(fulls)} full batches, {total} asked")
    quotas = [0] * len(fulls)
    for _ in range(total):  # one batch at a time to the worker with the most left
        w = max(range(len(fulls)), key=lambda i: (fulls[i] - quotas[i], -i))
        quotas[w] += 1
    return quotas


def delivered(quotas: list[int], batches: int) -> tuple[list[int], int]:
    """Batches each worker had delivered after ``batches`` in the loader's round-robin order, and
    the worker whose turn is next."""
    done = [0] * len(quotas)
    worker = 0
    for _ in range(batches):
        while done[worker] >= quotas[worker]:  # an exhausted worker is passed over
            worker = (worker + 1) % len(quotas)
        done[worker] += 1
        worker = (worker + 1) % len(quotas)
    return done, worker


def _padded(records: Iterator[Record], shard: Shard) -> Iterator[Record]:
    """A shard's records, exactly ``shard.count``: a shard that ends early is padded with records
    naming it as unreadable (so the plan's counts hold)."""
    seen = 0
    try:
        for record in records:
            if seen == shard.count:
                return
            seen += 1
            yield record
    except Exception as err:  # a damaged or cut shard: the rest of it is unreadable
        reason = f"{type(err).__name__}: {err}"
    else:
        reason = "it holds fewer records than its index says"
    for i in range(seen, shard.count):
        yield Record(f"{shard.path} record {i}", None, -1, f"{shard.path} ends early ({reason})")


def _shuffled(records: Iterator[Record], size: int, rng: random.Random) -> Iterator[Record]:
    """A seeded shuffle buffer of ``size`` records."""
    buffer: list[Record] = []
    for record in records:
        buffer.append(record)
        if len(buffer) >= size:
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


class ShardStream(IterableDataset):
    """Batches ``(uint8 images, labels, skipped)`` from shards, with the guarantees above.

    Args:
        shards: The split's shards and their record counts.
        read: Yields one shard's records in order.
        transform: PIL image -> uint8 tensor (the split's transform).
        batch_size: Images per batch (each process).
        train: Shuffle and drop (training) or read everything in order (evaluation).
        seed: Fixes the shard order and the shuffle of every epoch.
        shuffle_buffer: Records in the shuffle buffer of each loader worker.
        on_bad: ``skip`` (named, slot refilled) or ``error`` (stop at the first).
        max_pixels: Larger images are unreadable (``data.max_image_pixels``).
    """

    def __init__(
        self,
        shards: list[Shard],
        read: Reader,
        transform: Any,
        batch_size: int,
        train: bool,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        on_bad: str = "skip",
        max_pixels: int | None = MAX_IMAGE_PIXELS,
    ) -> None:
        self.shards, self.read, self.transform = list(shards), read, transform
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.shuffle_buffer, self.on_bad, self.max_pixels = (
            max(1, shuffle_buffer),
            on_bad,
            max_pixels,
        )
        self.rank, self.world, self.workers = 0, 1, 1
        self.epoch, self._skip = 0, 0
        self._batches = self._local_batches()

    # ----- the plan: the same in every process and worker, from the config alone --------------
    @property
    def samples(self) -> int:
        """Records of the whole split."""
        return sum(s.count for s in self.shards)

    @property
    def images(self) -> int:
        """Images of the split (what a dataset's length is for the image-folder path)."""
        return self.samples

    def setup(self, rank: int, world: int, workers: int) -> None:
        """This process's place; the batch count is agreed over processes (a collective)."""
        self.rank, self.world = rank, world
        self.workers = max(1, workers) if self.train or world == 1 else 1
        self._batches = self._local_batches()
        if self.train and world > 1 and dist.is_available() and dist.is_initialized():
            count = torch.tensor(self._batches)
            dist.all_reduce(count, op=dist.ReduceOp.MIN)
            self._batches = int(count)

    def _local_batches(self) -> int:
        if self.train:
            least = min(sum(s.count for s in part) for part in deal(self.shards, self.world))
            return max(0, least // self.batch_size - (self.workers - 1))
        if self.world == 1:
            return sum(_ceil(c, self.batch_size) for c in self._worker_counts())
        return _ceil(_ceil(self.samples, self.world), self.batch_size)

    def _worker_counts(self) -> list[int]:
        shards = self.shards
        return [sum(s.count for s in shards[w :: self.workers]) for w in range(self.workers)]

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next pass reads (its shard order and shuffle)."""
        self.epoch = epoch

    def skip_next(self, batches: int) -> None:
        """Leave out the first ``batches`` batches of the next pass only (resuming mid-epoch)."""
        self._skip = batches

    def __len__(self) -> int:
        return self._batches

    # ----- reading ----------------------------------------------------------------------------
    def _records(self, shards: list[Shard]) -> Iterator[Record]:
        for shard in shards:
            yield from _padded(self.read(shard), shard)

    def _decode(self, record: Record) -> Any:
        if record.data is None:
            raise UnreadableImageError(record.error or f"{record.name}: no image in this record")
        image = read_image(io.BytesIO(record.data), max_pixels=self.max_pixels, name=record.name)
        return self.transform(image) if self.transform else image

    def _batch(self, records: list[Record], fill: bool) -> Batch:
        items: list[Any] = []
        skipped: list[str] = []
        good: list[tuple[Any, int]] = []
        for record in records:
            try:
                good.append((self._decode(record), record.label))
                items.append(good[-1])
            except UnreadableImageError as err:
                if self.on_bad == "error":
                    raise BadImageError(_bad_image_fix(str(err))) from err
                skipped.append(str(err))
                items.append(None)
        if fill and None in items:
            if not good:
                raise BadImageError(
                    f"a whole batch of {len(records)} records is unreadable (e.g. {skipped[0]}): "
                    f"the shards look broken. Check them (heatssl convert writes good ones)."
                )
            spare = itertools.cycle(good)  # another image of the same batch takes the slot
            items = [item if item is not None else next(spare) for item in items]
        kept = [(image, label, []) for image, label in (i for i in items if i is not None)]
        return collate_batch([*kept, (None, -1, skipped)])

    def __iter__(self) -> Iterator[Batch]:
        skip, self._skip = self._skip, 0
        info = get_worker_info()
        worker = info.id if info is not None else 0
        count = info.num_workers if info is not None else 1
        if self.train:
            yield from self._train_pass(worker, count, skip)
        else:
            yield from self._eval_pass(worker, count, skip)

    def _train_pass(self, worker: int, count: int, skip: int) -> Iterator[Batch]:
        mine = deal(self.shards, self.world)[self.rank]
        random.Random(hash((self.seed, self.epoch, self.rank))).shuffle(mine)
        quotas = worker_quotas(
            [sum(s.count for s in mine[w::count]) for w in range(count)],
            self.batch_size,
            self._batches,
        )
        done_by, turn = delivered(quotas, skip)
        # the loader serves its workers round-robin from the first: after a resume, the first plays
        # the part of the worker whose turn it was, so the batches come in the unbroken order
        worker = (worker + turn) % count
        done = done_by[worker]
        rng = random.Random(hash((self.seed, self.epoch, self.rank, worker)))
        records = _shuffled(self._records(mine[worker::count]), self.shuffle_buffer, rng)
        records = itertools.islice(records, done * self.batch_size, None)  # read, not decoded
        for _ in range(quotas[worker] - done):
            yield self._batch(list(itertools.islice(records, self.batch_size)), fill=True)

    def _eval_pass(self, worker: int, count: int, skip: int) -> Iterator[Batch]:
        if self.world == 1:
            records: Iterator[Record] = self._records(self.shards[worker::count])
        else:  # every world-th record of the split, the shortest share padded by wrapping
            share = _ceil(self.samples, self.world)
            every = itertools.islice(self._records(self.shards), self.rank, None, self.world)
            records = itertools.islice(itertools.chain(every, self._records(self.shards)), share)
        records = itertools.islice(records, skip * self.batch_size if count == 1 else 0, None)
        while chunk := list(itertools.islice(records, self.batch_size)):
            yield self._batch(chunk, fill=False)


class _EpochClock:
    """What a stream's loader shows Lightning as its ``sampler``: ``set_epoch`` reaches the stream
    (read before the workers start each epoch), and it iterates like torch's own for streams."""

    def __init__(self, stream: ShardStream) -> None:
        self.stream = stream

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def __iter__(self) -> Iterator[None]:
        return itertools.repeat(None)


class StreamLoader(DataLoader):
    """A DataLoader of a :class:`ShardStream`'s batches (the stream batches, the loader does not)."""

    def __init__(self, stream: ShardStream, **kwargs: Any) -> None:
        self._clock = _EpochClock(stream)
        super().__init__(stream, batch_size=None, persistent_workers=False, **kwargs)

    @property
    def sampler(self) -> Any:  # Lightning calls sampler.set_epoch every epoch
        return self._clock

    @sampler.setter
    def sampler(self, value: Any) -> None:  # DataLoader's own (unused: the stream orders itself)
        self._torch_sampler = value

    def __iter__(self) -> Any:
        batches = super().__iter__()
        if self.num_workers > 0:  # the workers took their copies (and the skip): one pass only
            self.dataset._skip = 0
        return batches
