"""Tests for heatssl.data.sampler: the epoch order is the seed's and the epoch's, shards cover it."""

from heatssl.data.sampler import EpochSampler


def test_order_depends_only_on_seed_and_epoch():
    a, b = EpochSampler(50, seed=3), EpochSampler(50, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b) and sorted(a) == list(range(50))
    b.set_epoch(3)
    assert list(a) != list(b)
    assert list(EpochSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


def test_shards_cover_the_epoch_and_pad_by_wrapping():
    shards = [list(EpochSampler(10, seed=0, rank=r, world=3)) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]
    assert set().union(*shards) == set(range(10))


def test_skip_next_leaves_out_the_first_samples_of_one_pass_only():
    sampler = EpochSampler(12, seed=1)
    full = list(sampler)
    sampler.skip_next(5)
    assert list(sampler) == full[5:]
    assert list(sampler) == full
