"""What this machine can feed and hold: loader processes per core, a batch's memory.

``data.num_workers=auto`` is a process's share of the node's cores less the threads it keeps for
itself; :func:`check_fits_machine` refuses worker counts and batch sizes that only thrash.
"""

from __future__ import annotations

import os

from heatssl.config import DataConfig
from heatssl.errors import ConfigError


def cores_per_process(local_processes: int = 1) -> int:
    """CPU cores this process may use: its affinity mask shared by the node's processes.

    Under ``srun --cpus-per-task`` each task is already bound to its own cores, so they are not
    divided again; otherwise (Lightning or torchrun starting several processes on one machine)
    the node's cores are split between its ``local_processes``.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    per_task = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if per_task.isdigit() and cores <= int(per_task):
        return cores
    return max(1, cores // max(1, local_processes))


WORKERS_PER_CORE = 4
"""More loader processes than this per core only compete for the cores (and each holds memory)."""
MEMORY_SHARE = 4
"""A batch (as the model's float32 input) may take at most 1 / this of the machine's memory."""


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf: assume a small machine
        return 8 * 1024**3


def check_fits_machine(cfg: DataConfig) -> None:
    """Refuse loader settings this machine cannot hold, naming the largest value that fits."""
    cores = os.cpu_count() or 1
    most = WORKERS_PER_CORE * cores
    if cfg.num_workers != "auto" and cfg.num_workers > most:
        raise ConfigError(
            f"data.num_workers={cfg.num_workers}: this machine has {cores} CPU cores, and more "
            f"than {WORKERS_PER_CORE} loader processes a core only compete for them: at most "
            f"{most}. Use data.num_workers=auto ({auto_workers()} here) or a number up to {most}."
        )
    budget = _memory_bytes() / MEMORY_SHARE
    per_image = 3 * cfg.image_size**2 * 4  # one image as the model's float32 input
    gib = _memory_bytes() / 1024**3
    if per_image > budget:
        side = int((budget / 12) ** 0.5)
        raise ConfigError(
            f"data.image_size={cfg.image_size}: one image takes {per_image / 1024**3:.1f} GiB as "
            f"the model's input and this machine has {gib:.1f} GiB of memory: at most "
            f"data.image_size={side}."
        )
    if cfg.batch_size * per_image > budget:
        raise ConfigError(
            f"data.batch_size={cfg.batch_size}: a batch of {cfg.image_size} px images takes "
            f"{cfg.batch_size * per_image / 1024**3:.1f} GiB as the model's input and this "
            f"machine has {gib:.1f} GiB of memory: at most data.batch_size={int(budget // per_image)}."
        )


KEPT_CORES = 2
"""Cores ``data.num_workers=auto`` leaves to the process itself: its training (or feeding) thread
and the thread that pins batches for the GPU."""


def auto_workers(local_processes: int = 1) -> int:
    """``data.num_workers=auto``: the process's cores (:func:`cores_per_process`) less
    :data:`KEPT_CORES`, at least one."""
    return max(1, cores_per_process(local_processes) - KEPT_CORES)
