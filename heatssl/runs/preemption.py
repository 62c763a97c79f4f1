"""Stopping on a signal: one checkpoint at the same step on every rank, then a clean stop.

Three signals stop a run with a checkpoint:

- ``SIGUSR1``: SLURM's preemption notice (``#SBATCH --signal=SIGUSR1@120``), sent to every process of
  the job step some time before it ends. Process 0 also asks SLURM to requeue the job
  (``scontrol requeue``); the run exits 0 and the requeued job's ``--resume auto`` continues.
- ``SIGINT`` (Ctrl-C) and ``SIGTERM`` (what schedulers and ``kill`` send): the run saves and stops
  with exit code 130 / 143 and prints the command that resumes it. A second one before the save is
  done stops at once, without saving (``last.ckpt`` is then the previous one, never a partial file).

Saving from inside the signal handler, as Lightning's own SLURM support does, happens at a different
point of the step on each rank, and the collectives of that save can mismatch or hang. Here the
handler only sets a flag. At a batch boundary the flag is read: after every batch in a one-process
run (a Python read, no device sync), every ``check_every`` batches under several processes, where it
is all-reduced (any rank's signal counts for all, one small collective). Then every rank saves
``last.ckpt`` at that same step and the run stops. ``--resume`` continues from that checkpoint,
mid-epoch, on the same data order. Data-loader workers ignore these signals (see
:func:`heatssl.data.sampler.seed_worker`): a Ctrl-C in a terminal reaches the whole process group.
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
from heatssl.runs.callbacks import batches_seen

PREEMPTION_SIGNAL = getattr(signal, "SIGUSR1", None)  # not on Windows
STOP_SIGNALS: dict[int, str] = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}
"""Signals that save and stop without a requeue, and how messages name them."""


class Preempted(HeatSSLError):
    """The run saved ``last.ckpt`` and stopped after a preemption signal (and asked for a requeue)."""

    exit_code = 0
    label = "stopped"


class Interrupted(HeatSSLError):
    """The run stopped on SIGINT or SIGTERM; the exit code is the shell's 128 + signal number."""

    label = "stopped"

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + int(signum)


def start_compile_workers() -> None:
    """Start torch.compile's worker processes now, with the preemption signal ignored.

    SLURM's notice (SIGUSR1) reaches every process of the job step, inductor's compile workers
    too, and their default action is to die: a run that compiles in parallel then fails at its
    next compile. A process started while a signal is ignored keeps ignoring it (through exec), so
    the pool is started here with SIGUSR1 ignored and this process's own handler put back. Without
    a parallel pool (``TORCHINDUCTOR_COMPILE_THREADS=1``) there is nothing to start.
    """
    if PREEMPTION_SIGNAL is None:
        return
    try:
        from torch._inductor.async_compile import AsyncCompile
    except ImportError:  # a torch without inductor: nothing compiles in other processes
        return
    previous = signal.signal(PREEMPTION_SIGNAL, signal.SIG_IGN)
    try:
        AsyncCompile.warm_pool()
    finally:
        signal.signal(PREEMPTION_SIGNAL, previous)


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


class SignalCheckpoint(L.Callback):
    """On SIGUSR1, SIGINT or SIGTERM: save ``last.ckpt`` on every rank at one step, then stop.

    Args:
        checkpoint: The ``last.ckpt`` path to write.
        check_every: Batches between two looks at the flag when several processes run (each look is
            one small all-reduce and a host read); the signal's notice must cover that many steps
            and a save. A one-process run looks after every batch.
        resume_command: The command the stop message tells the user to run (each stage its own).
    """

    def __init__(self, checkpoint: str | Path, check_every: int, resume_command: str) -> None:
        self.checkpoint = Path(checkpoint)
        self.resume_command = resume_command
        self.check_every = max(1, check_every)
        self.requested = False  # a preemption notice (requeue)
        self.stop_signal: int | None = None  # the first SIGINT / SIGTERM
        self._previous: dict[int, Any] = {}
        self._saving = False
        self._pending = False  # a signal every rank agreed on, waiting for a step to stop after

    def _on_preemption(self, signum: int, frame: Any) -> None:
        self.requested = True  # nothing else here: the step in flight finishes undisturbed

    def _on_stop(self, signum: int, frame: Any) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
            return
        # The second one: stop now. Writes are atomic, so last.ckpt stays the previous file.
        self._restore()
        during = " (the checkpoint being written was dropped)" if self._saving else ""
        raise Interrupted(
            f"{STOP_SIGNALS[signum]} a second time: stopped at once, without saving{during}. "
            f"{self.checkpoint} is the last checkpoint, if there is one; continue with "
            f"`{self.resume_command}`.",
            signum,
        )

    def _install(self, signum: int, handler: Any) -> None:
        previous = signal.signal(signum, handler)
        self._previous.setdefault(signum, previous)  # the first: what was there before the run

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """The preemption handler, before Lightning registers its own (which then stands aside)."""
        if PREEMPTION_SIGNAL is not None and stage == "fit":
            self._install(PREEMPTION_SIGNAL, self._on_preemption)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """SIGINT / SIGTERM handlers, after Lightning's (which would stop without a checkpoint)."""
        for signum in STOP_SIGNALS:
            self._install(signum, self._on_stop)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def _agreed(self, trainer: L.Trainer, device: torch.device) -> bool:
        """Whether any rank got a signal (every rank gets the same answer); kinds are merged."""
        several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not several:
            return self.requested or self.stop_signal is not None
        if batches_seen(trainer) % self.check_every:
            return False
        # [preemption, SIGINT, SIGTERM], each 0 or 1; MAX over ranks
        mine = [float(self.requested)] + [float(self.stop_signal == s) for s in STOP_SIGNALS]
        flags = torch.tensor(mine, device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        seen = flags.tolist()
        self.requested = seen[0] > 0
        if self.stop_signal is None:
            self.stop_signal = next(
                (s for s, f in zip(STOP_SIGNALS, seen[1:], strict=True) if f > 0), None
            )
        return any(f > 0 for f in seen)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self._pending:  # once agreed, every rank knows it: no more collectives
            self._pending = self._agreed(trainer, pl_module.device)
        if not self._pending:
            return
        if batch_idx + 1 >= trainer.num_training_batches:
            # The epoch's last step: its end-of-epoch work (pictures, epoch checkpoint) runs first,
            # as in an unbroken run, and the run stops after the next step. A save here would hold
            # the random state from before that work, and the resumed run would diverge.
            return
        self._saving = True
        try:
            trainer.save_checkpoint(self.checkpoint)  # every rank, this step; rank 0 writes
        finally:
            self._saving = False
        self._stop(trainer)

    def _stop(self, trainer: L.Trainer) -> None:
        """Raise what ends the run after ``last.ckpt`` holds this step (and requeue if asked)."""
        step = trainer.global_step
        if self.stop_signal is not None:  # a stop wins over a requeue: the user asked for it
            self._restore()
            raise Interrupted(
                f"{STOP_SIGNALS[self.stop_signal]}: saved {self.checkpoint} at step {step} "
                f"(epoch {trainer.current_epoch}); continue with "
                f"`{self.resume_command}`.",
                self.stop_signal,
            )
        job = slurm_job_id()
        outcome = f"no SLURM job to requeue; continue with `{self.resume_command}`"
        if job is not None and trainer.is_global_zero:
            outcome = requeue(job)
        elif job is not None:
            outcome = f"process 0 asks SLURM to requeue job {job}"
        raise Preempted(
            f"preemption signal: saved {self.checkpoint} at step {step} on every "
            f"process; {outcome}."
        )
