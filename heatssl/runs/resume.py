"""``--resume``: which checkpoint a run continues from, decided once, by process 0, for every process.

``last`` is the run folder's ``last.ckpt``, ``auto`` the newest of it and SLURM's requeue checkpoints
(a fresh start when there is none: the setting for preemptible jobs), anything else a path. Processes
that see another (node-local, stale) run folder would otherwise load different checkpoints and hang.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import torch.distributed as dist
from lightning.fabric.utilities.distributed import _init_dist_connection

from heatssl.config import Config
from heatssl.errors import ConfigError
from heatssl.runs.layout import RunLayout

RESUME_ENV = "HEATSSL_RESUME_FROM"
"""Set by process 0 for the processes it starts: the checkpoint it resolved (empty: none)."""


def resolve_resume(cfg: Config, resume: str | None) -> str | None:
    """The checkpoint to resume from: ``last`` (this run folder's last.ckpt), ``auto``, or a path.

    ``auto`` takes the newest of last.ckpt and the SLURM requeue checkpoints Lightning writes
    (``hpc_ckpt_*.ckpt``), and starts afresh when there is none: the setting for preemptible jobs.
    """
    if resume is None:
        return None
    if resume == "auto":
        found = [
            p
            for p in [
                RunLayout(Path(cfg.run_dir)).last_checkpoint,
                *Path(cfg.run_dir).glob("hpc_ckpt_*.ckpt"),
            ]
            if p.is_file()
        ]
        return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None
    path = RunLayout(Path(cfg.run_dir)).last_checkpoint if resume == "last" else Path(resume)
    if not path.is_file():
        raise ConfigError(
            f"--resume {resume}: no checkpoint at {path}. Give a .ckpt path, 'last' with the "
            f"run's config (run_dir={cfg.run_dir}), or 'auto' to start afresh when there is none."
        )
    return str(path)


def agreed_resume(cfg: Config, resume: str | None, trainer: L.Trainer) -> str | None:
    """:func:`resolve_resume` on process 0 only; every process of the run gets its answer.

    Processes that see another (node-local, stale) run folder would otherwise load different
    checkpoints and hang. Under an external launcher (SLURM, torchrun) the process group is set up
    here, early, to broadcast the answer (Lightning reuses it); processes Lightning itself starts
    inherit it through the environment.
    """
    if resume is None:
        return None
    if RESUME_ENV in os.environ:  # started by process 0's Lightning launcher, which resolved it
        return os.environ[RESUME_ENV] or None
    strategy = trainer.strategy
    environment = getattr(strategy, "cluster_environment", None)
    if (
        trainer.world_size > 1
        and environment is not None
        and environment.creates_processes_externally
    ):
        # the group Lightning would make (its backend and timeout), made early; Lightning reuses it
        backend = strategy._get_process_group_backend()
        _init_dist_connection(environment, backend, timeout=strategy._timeout)
        store = dist.distributed_c10d._get_default_store()  # a key-value store: no device involved
        if trainer.global_rank == 0:
            try:
                path = resolve_resume(cfg, resume)
            except Exception as err:
                store.set(RESUME_ENV, json.dumps({"error": f"process 0: {err}"}))
                raise
            store.set(RESUME_ENV, json.dumps({"path": path}))
            return path
        answer = json.loads(store.get(RESUME_ENV))  # waits for process 0
        if "error" in answer:
            raise ConfigError(answer["error"])
        return answer["path"]
    path = resolve_resume(cfg, resume)
    if trainer.world_size > 1:  # Lightning starts the other processes with this environment
        os.environ[RESUME_ENV] = path or ""
    return path
