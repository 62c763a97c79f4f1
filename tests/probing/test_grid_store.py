"""Tests for heatssl.probing.grid_store: grids on disk read back by rows, and a cache larger than a
memory budget that stays under it."""

import subprocess
import sys
import textwrap

import pytest
import torch

from heatssl.errors import ArgumentError
from heatssl.probing.grid_store import GridStore


def test_rows_come_back_as_written_in_any_order(tmp_path):
    store = GridStore(tmp_path / "g.f16")
    data = torch.randn(11, 3, 2, 4)
    store.append(data[:4])
    store.append(data[4:])
    with pytest.raises(ArgumentError, match="close"):
        store[0]
    store.close()
    assert store.shape == (11, 3, 2, 4) and len(store) == 11
    half = data.half()
    assert torch.equal(store[:], half) and torch.equal(store[3], half[3])
    assert torch.equal(store[2:9:3], half[2:9:3])
    rows = torch.tensor([7, 1, 2, 3, 10, 0])  # runs and gaps, out of order
    assert torch.equal(store[rows], half[rows])
    with pytest.raises(ArgumentError, match="closed"):
        store.append(data[:1])
    store.delete()
    assert not (tmp_path / "g.f16").exists()


def test_a_batch_of_another_shape_is_refused(tmp_path):
    store = GridStore(tmp_path / "g.f16")
    store.append(torch.zeros(2, 3, 2, 2))
    with pytest.raises(ArgumentError, match="cannot join"):
        store.append(torch.zeros(2, 3, 4, 4))
    store.delete()


BUDGET_CHILD = textwrap.dedent(
    """
    import resource, sys, torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from heatssl.config import ProbeConfig
    from heatssl.probing.features import build_cache
    from heatssl.probing.probes import run_probes

    class Wide(nn.Module):  # a cheap "backbone" with a large grid: 256 x 16 x 16 per image
        def forward(self, x):
            return x.mean(1, keepdim=True).repeat(1, 256, 4, 4)

    def loader(n):
        images = torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(n))
        return DataLoader(TensorDataset(images, torch.arange(n) % 4), batch_size=64)

    cfg = ProbeConfig(kinds=["linear", "tran1", "knn"], epochs=1, tran1_epochs=1, batch_size=64,
                      tran1_heads=4, tran1_max_images=128, knn_k=5)
    torch.manual_seed(0)
    run_probes(build_cache(Wide(), loader(64), loader(64), list("abcd"), torch.device("cpu"),
                           grid_dir=sys.argv[1]), cfg)  # warm-up: allocator, kernels, pages
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cache = build_cache(Wide(), loader(10240), loader(2048), list("abcd"), torch.device("cpu"),
                        grid_dir=sys.argv[1])
    grid_bytes = (len(cache.train) + len(cache.val)) * 256 * 16 * 16 * 2
    metrics, _ = run_probes(cache, cfg)
    cache.delete_grids()
    growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    print(grid_bytes, growth, metrics["tran1"]["train_images"])
    """
)


def test_a_cache_larger_than_the_memory_budget_stays_under_it(tmp_path):
    """1.5 GiB of grids (linear, tran-1 and kNN probes on them) may grow the process by 256 MiB:
    holding the grids in memory, as the cache once did, would need four times that."""
    out = subprocess.run(
        [sys.executable, "-c", BUDGET_CHILD, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    grid_bytes, growth, tran1_images = map(int, out.stdout.split())
    assert grid_bytes >= 1.5 * 2**30
    assert growth < 256 * 2**20, f"peak RSS grew by {growth / 2**20:.0f} MiB"
    assert tran1_images == 128
    assert not list(tmp_path.iterdir())  # the grid files are gone


def test_bad_rows_and_a_truncated_file_are_refused(tmp_path):
    store = GridStore(tmp_path / "g.f16")
    store.append(torch.zeros(4, 2, 2, 2))
    store.close()
    assert torch.equal(store[torch.tensor([-1])], store[torch.tensor([3])])
    with pytest.raises(IndexError, match="out of range"):
        store[torch.tensor([4])]
    with open(tmp_path / "g.f16", "r+b") as f:
        f.truncate(store.row_bytes * 2)  # a file cut short behind the store's back
    with pytest.raises(OSError, match="truncated"):
        store[torch.tensor([3])]
    store.delete()
