"""Preemption: a signal before the time limit, one checkpoint at the same step on every rank, a requeue.

SLURM sends ``SIGUSR1`` (``#SBATCH --signal=SIGUSR1@120``) to every process of the job step some time
before it ends. Saving from inside the signal handler, as Lightning's own SLURM support does, happens
at a different point of the step on each rank, and the collectives of that save can mismatch or hang.
Here the handler only sets a flag. At a batch boundary, every ``check_every`` batches, the flag is
all-reduced (any rank's signal counts for all), every rank saves ``last.ckpt`` at that same step,
process 0 asks SLURM to requeue the job (``scontrol requeue``) and the run stops with
:class:`Preempted`. ``--resume auto`` then continues from that checkpoint, mid-epoch. Data-loader
workers ignore the signal (see :func:`heatssl.data.sampler.seed_worker`).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist

from heatssl.errors import HeatSSLError
from heatssl.train.callbacks import batches_seen

PREEMPTION_SIGNAL = getattr(signal, "SIGUSR1", None)  # not on Windows


class Preempted(HeatSSLError):
    """The run saved ``last.ckpt`` and stopped after a preemption signal (and asked for a requeue)."""

    exit_code = 0
    label = "stopped"


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for array jobs, else the job id."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array:
        return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return os.environ.get("SLURM_JOB_ID")


def requeue(job_id: str) -> str:
    """Ask SLURM to requeue ``job_id``; return what happened, in words (never raises)."""
    try:
        done = subprocess.run(
            ["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError) as err:
        return f"requeue of job {job_id} failed ({err}); resubmit it with --resume auto"
    if done.returncode:
        why = (done.stderr or done.stdout).strip() or f"exit {done.returncode}"
        return f"requeue of job {job_id} failed ({why}); resubmit it with --resume auto"
    return f"job {job_id} requeued"


class PreemptionCheckpoint(L.Callback):
    """On ``PREEMPTION_SIGNAL``: save ``last.ckpt`` on every rank at one step, requeue, stop.

    Args:
        checkpoint: The ``last.ckpt`` path to write.
        check_every: Batches between two looks at the flag (each look is one small all-reduce and
            a host read); the signal's notice must cover that many steps and a save.
    """

    def __init__(self, checkpoint: str | Path, check_every: int) -> None:
        self.checkpoint = Path(checkpoint)
        self.check_every = max(1, check_every)
        self.requested = False
        self._previous: Any = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.requested = True  # nothing else here: the step in flight finishes undisturbed

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Install the handler (before Lightning registers its own, which then stands aside)."""
        if PREEMPTION_SIGNAL is not None and stage == "fit":
            self._previous = signal.signal(PREEMPTION_SIGNAL, self._on_signal)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous is not None:
            signal.signal(PREEMPTION_SIGNAL, self._previous)
            self._previous = None

    def _agreed(self, device: torch.device) -> bool:
        """Whether any rank got the signal (every rank gets the same answer)."""
        flag = torch.tensor(float(self.requested), device=device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag > 0)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if batches_seen(trainer) % self.check_every or not self._agreed(pl_module.device):
            return
        trainer.save_checkpoint(self.checkpoint)  # every rank, this step; rank 0 writes
        job = slurm_job_id()
        outcome = "no SLURM job to requeue; continue with --resume auto"
        if job is not None and trainer.is_global_zero:
            outcome = requeue(job)
        elif job is not None:
            outcome = f"process 0 asks SLURM to requeue job {job}"
        raise Preempted(
            f"preemption signal: saved {self.checkpoint} at step {trainer.global_step} on every "
            f"process; {outcome}."
        )
