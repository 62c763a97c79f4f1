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


def test_a_script_that_leaves_a_persistent_loader_open_still_exits(tmp_path):
    """Workers ignore SIGTERM (only the trainer acts on it), so multiprocessing's exit hook, which
    terminates and then joins them, waited forever on a ``break`` out of the loader."""
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from torch.utils.data import DataLoader\n"
        "from heatssl.data.sampler import seed_worker\n"
        "loader = DataLoader(list(range(64)), batch_size=4, num_workers=2,\n"
        "                    persistent_workers=True, worker_init_fn=seed_worker)\n"
        "for batch in loader:\n"
        "    break\n"
        "print('left', flush=True)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "left"
    assert "killed by signal" not in done.stderr
