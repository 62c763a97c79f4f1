"""The order of an epoch: fixed by ``(seed, epoch)``, sharded per process, resumable mid-way."""

from __future__ import annotations

import atexit
import multiprocessing
import random
import signal
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """This process's share of an epoch, in an order fixed by ``(seed, epoch)``, resumable mid-way.

    Shuffled or in order; with ``world > 1`` process ``rank`` takes every ``world``-th index of the
    (padded) order, like torch's DistributedSampler. Because the order depends only on the seed
    and the epoch, a resumed run can skip exactly the batches it already trained on
    (:meth:`skip_next`) and then see what an uninterrupted run would have seen.
    """

    def __init__(
        self, size: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world: int = 1
    ) -> None:
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world = rank, world
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order the next pass follows (Lightning calls this every epoch)."""
        self.epoch = epoch

    def skip_next(self, samples: int) -> None:
        """Leave out the first ``samples`` of the next pass only (resuming mid-epoch)."""
        self._skip = samples

    def __len__(self) -> int:
        return -(-self.size // self.world)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=gen).tolist()
        else:
            order = list(range(self.size))
        total = len(self) * self.world
        order = (order * (total // max(1, len(order)) + 1))[:total]  # pad by wrapping around
        mine = order[self.rank :: self.world]
        skip, self._skip = self._skip, 0
        return iter(mine[skip:])


def seed_worker(worker_id: int) -> None:
    """Seed numpy and ``random`` in each loader worker from torch's per-worker seed (itself seeded).

    Workers also ignore SIGUSR1, SIGINT and SIGTERM: SLURM sends its signals to every process of a
    job step and a terminal's Ctrl-C reaches the whole process group, but only the training process
    should act on them (it saves and stops; a worker killed by one would end the run at once). A
    worker still ends when the training process does.
    """
    for name in ("SIGUSR1", "SIGINT", "SIGTERM"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _kill_workers_at_exit() -> None:
    """Kill this process's daemonic children (loader workers) before multiprocessing joins them.

    At exit, multiprocessing sends SIGTERM to daemonic children and then waits for them; workers
    of :func:`seed_worker` ignore SIGTERM, so a script that leaves a loader open (a ``break`` out
    of a persistent-worker loader) would wait forever. Registered after multiprocessing's own exit
    hook, so it runs first. torch's SIGCHLD handler, which would report the killed workers as a
    loader failure, is set back to the default first.
    """
    children = [c for c in multiprocessing.active_children() if c.daemon]
    if not children:
        return
    if hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()


atexit.register(_kill_workers_at_exit)
