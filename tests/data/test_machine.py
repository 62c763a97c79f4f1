"""What a machine can feed: ``data.num_workers=auto`` per process, and the refused settings."""

from __future__ import annotations

import pytest

from heatssl.config import DataConfig
from heatssl.data.datamodule import HeatDataModule
from heatssl.data.machine import auto_workers, check_fits_machine, cores_per_process
from heatssl.errors import ConfigError


def test_auto_workers_are_the_cores_of_each_process(monkeypatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert cores_per_process(1) == 16  # not capped at 8
    assert cores_per_process(4) == 4  # four processes on one node share its cores
    assert cores_per_process(32) == 1
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "16")  # srun bound this task to its 16 cores
    assert cores_per_process(4) == 16
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4")  # the mask is the node's: split it
    assert cores_per_process(4) == 4
    dm = HeatDataModule(DataConfig(name="digits", num_workers=3))
    assert dm.num_workers == 3


def test_auto_workers_leave_two_cores_to_the_training_and_pinning_threads(monkeypatch) -> None:
    """Every core to loader workers left none for the training thread and the pin-memory thread."""
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert auto_workers(1) == 14 and auto_workers(2) == 6 and auto_workers(8) == 1
    assert HeatDataModule(DataConfig(name="digits")).num_workers == 14
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    assert auto_workers(1) == 1  # at least one


def test_more_workers_than_the_cores_can_use_are_refused_with_the_most_that_fits(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"data.num_workers=9: .* at most 8"):
        check_fits_machine(DataConfig(name="digits", num_workers=9))
    check_fits_machine(DataConfig(name="digits", num_workers=8))


def test_a_batch_larger_than_a_quarter_of_memory_is_refused(monkeypatch):
    monkeypatch.setattr("heatssl.data.machine._memory_bytes", lambda: 4 * 1024**3)
    with pytest.raises(ConfigError, match=r"data.batch_size=4096: .* at most data.batch_size=1783"):
        check_fits_machine(
            DataConfig(name="digits", image_size=224, batch_size=4096, num_workers=0)
        )
