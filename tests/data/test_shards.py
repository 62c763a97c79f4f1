"""Shard streams: equal batches per process, no sample twice in an epoch, exact resume, bad members."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from heatssl.data.shards import (
    Record,
    Shard,
    ShardStream,
    StreamLoader,
    deal,
    delivered,
    worker_quotas,
)
from heatssl.data.transforms import build_transform


def _png(value: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((10, 12, 3), value, dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def _shards(counts, bad=(), short=()):
    """Shards of records whose image value (0-255) names the record; ``bad`` names broken ones."""
    shards, store, n = [], {}, 0
    for s, count in enumerate(counts):
        path = f"shard{s}.tar"
        shards.append(Shard(path, count))
        records = []
        for _ in range(count):
            data = b"broken" if n in bad else _png(n)
            records.append(Record(f"{path}:{n:04d}", data, n % 3))
            n += 1
        store[path] = records[: count - short.count(s)] if s in short else records
    return shards, lambda shard: iter(store[shard.path])


def _values(batches) -> list[int]:
    return [int(img[0, 0, 0]) for images, _, _ in batches for img in images]


def _stream(shards, read, train=True, **kw):
    return ShardStream(
        shards, read, build_transform(8, train=False), 4, train, seed=3, shuffle_buffer=7, **kw
    )


def test_the_plan_deals_balanced_shares_and_quotas_the_workers_can_fill():
    parts = deal([Shard(f"s{i}", c) for i, c in enumerate([9, 8, 7, 5, 4, 1])], 2)
    totals = sorted(sum(s.count for s in p) for p in parts)
    assert totals == [16, 18] and sum(len(p) for p in parts) == 6  # largest first, to the lightest
    assert worker_quotas([9, 8, 3], 4, 4) == [2, 2, 0]
    with pytest.raises(ValueError):
        worker_quotas([3, 3], 4, 1)
    assert delivered([3, 2], 3) == ([2, 1], 1) and delivered([3, 1], 3) == ([2, 1], 1)
    assert delivered([3, 1], 4) == ([3, 1], 1)


@pytest.mark.parametrize("workers", [0, 2])
def test_two_processes_get_equal_batches_and_disjoint_samples(workers):
    shards, read = _shards([7, 9, 6, 8, 5])
    seen, lengths = [], []
    for rank in (0, 1):
        stream = _stream(shards, read)
        stream.setup(rank, 2, workers)
        loader = StreamLoader(stream, num_workers=workers)
        values = _values(list(loader))
        lengths.append(len(loader))
        assert len(values) == len(loader) * 4 and len(set(values)) == len(values)
        seen.append(set(values))
    assert lengths[0] == lengths[1] > 0
    assert not seen[0] & seen[1]


def test_epochs_shuffle_differently_and_repeat_with_the_seed():
    shards, read = _shards([8, 8, 8])
    stream = _stream(shards, read)
    first = _values(list(StreamLoader(stream)))
    again = _values(list(StreamLoader(stream)))
    stream.set_epoch(1)
    other = _values(list(StreamLoader(stream)))
    assert first == again and first != other


@pytest.mark.parametrize("skip", [1, 2, 3, 4])
def test_a_resume_yields_the_rest_of_the_epoch_in_the_unbroken_order(skip):
    shards, read = _shards([7, 9, 6, 8])
    stream = _stream(shards, read)
    stream.setup(0, 1, 2)
    stream.set_epoch(2)
    unbroken = _values(list(StreamLoader(stream, num_workers=2)))
    stream.skip_next(skip)
    rest = _values(list(StreamLoader(stream, num_workers=2)))
    assert rest == unbroken[skip * 4 :]


def test_a_bad_member_is_named_and_its_slot_refilled():
    shards, read = _shards([8, 8], bad={3})
    batches = list(StreamLoader(_stream(shards, read, train=False)))
    skipped = [name for _, _, names in batches for name in names]
    assert len(skipped) == 1 and "shard0.tar:0003" in skipped[0]
    assert 3 not in _values(batches) and len(_values(batches)) == 15  # evaluation leaves it out
    train = list(StreamLoader(_stream(shards, read)))
    assert all(images.shape[0] == 4 for images, _, _ in train)  # training keeps batch sizes


def test_a_shard_that_ends_early_keeps_the_plan_and_names_itself():
    shards, read = _shards([8, 8], short=(1, 1, 1))  # shard 1 ends 3 records short
    batches = list(StreamLoader(_stream(shards, read)))
    assert len(batches) == 4 and all(images.shape[0] == 4 for images, _, _ in batches)
    assert any("shard1.tar ends early" in n for _, _, names in batches for n in names)


def test_labels_travel_with_their_images():
    shards, read = _shards([6, 6])
    for images, labels, _ in StreamLoader(_stream(shards, read)):
        assert torch.equal(labels, images[:, 0, 0, 0].long() % 3)
