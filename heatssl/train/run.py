"""Pretraining runs as the CLI and scripts call them: pretrain, resume, export, read a checkpoint.

A run folder holds ``config.yaml`` (the resolved config: rerun with ``heatssl pretrain -c`` on it),
``checkpoints/`` (``last.ckpt`` plus the newest epoch checkpoints), ``pictures/``, ``metrics.csv`` and,
while a run trains in it, ``run.lock`` (:mod:`heatssl.train.lock`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch.distributed as dist
from lightning.fabric.utilities.distributed import _init_dist_connection

from heatssl.config import Config, load_config, save_config
from heatssl.data.module import build_datamodule
from heatssl.data.throughput import loader_throughput
from heatssl.errors import CheckpointError, ConfigError
from heatssl.model.backbone import Backbone
from heatssl.model.export import export_backbone
from heatssl.train.build import scale_line
from heatssl.train.checkpoint import pickle_trusted, safe_torch_load
from heatssl.train.lock import holding_run_lock
from heatssl.train.module import HeatPretrainModule, drop_pruned_layers
from heatssl.train.trainer import build_trainer, checkpoint_dir, planned_devices

RESUME_ENV = "HEATSSL_RESUME_FROM"
"""Set by process 0 for the processes it starts: the checkpoint it resolved (empty: none)."""


@dataclass
class PretrainResult:
    """Where a finished pretraining run left its files, and what it cost."""

    run_dir: Path
    last_checkpoint: Path
    seconds: float
    global_step: int
    is_global_zero: bool = True  # the process that writes files and reports (DDP rank 0)


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
                checkpoint_dir(cfg.run_dir) / "last.ckpt",
                *Path(cfg.run_dir).glob("hpc_ckpt_*.ckpt"),
            ]
            if p.is_file()
        ]
        return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None
    path = checkpoint_dir(cfg.run_dir) / "last.ckpt" if resume == "last" else Path(resume)
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


def pretrain(
    cfg: Config,
    resume: str | None = None,
    callbacks: list[L.Callback] | None = None,
    force: bool = False,
) -> PretrainResult:
    """Pretrain with QB-Heat as ``cfg`` says; write the run folder; return where things are.

    ``callbacks`` are extra Lightning callbacks (monitors, custom logging) added to the Trainer.
    The run folder is locked for the run (:class:`~heatssl.train.lock.RunLock`): a second run in
    it is refused while this one lives, unless ``force``.
    """
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    run_dir = Path(cfg.run_dir)
    trainer = build_trainer(cfg, run_dir, callbacks)
    with holding_run_lock(run_dir, trainer.is_global_zero, force):
        return _pretrain_locked(cfg, resume, trainer, run_dir)


def _pretrain_locked(
    cfg: Config, resume: str | None, trainer: L.Trainer, run_dir: Path
) -> PretrainResult:
    """:func:`pretrain` once the run folder is this process's."""
    inherited = RESUME_ENV in os.environ
    ckpt_path = agreed_resume(cfg, resume, trainer)  # a missing checkpoint stops here, early
    # an image folder's file list: scanned by process 0 once, read by the others and by requeues
    datamodule = build_datamodule(
        cfg.data, seed=cfg.seed, index_dir=run_dir, rank=trainer.global_rank
    )
    if not cfg.data.download:
        datamodule.setup("fit")  # a missing or malformed dataset stops here, before anything runs
    classes = datamodule.num_classes if cfg.probe.online else None
    module = HeatPretrainModule(cfg, num_classes=classes)
    if trainer.is_global_zero:
        save_config(cfg, run_dir / "config.yaml")
        print(
            f"heatssl: {cfg.model.backbone} on {cfg.data.name}, "
            f"{scale_line(cfg, trainer.num_devices, trainer.num_nodes)}, run folder {run_dir}"
        )
    start = time.perf_counter()
    if ckpt_path is not None:
        # A checkpoint needing pickle stops here with the reason; mapped, so the tensors are not
        # read twice (Lightning loads the file next).
        safe_torch_load(ckpt_path, mmap=True)
    try:
        trainer.fit(
            module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=not pickle_trusted()
        )
    finally:
        if not inherited:
            os.environ.pop(RESUME_ENV, None)  # meant for this run's processes only
    return PretrainResult(
        run_dir=run_dir,
        last_checkpoint=checkpoint_dir(run_dir) / "last.ckpt",
        seconds=time.perf_counter() - start,
        global_step=trainer.global_step,
        is_global_zero=trainer.is_global_zero,
    )


def benchmark_loader(cfg: Config, batches: int = 50, warmup: int = 5) -> dict[str, float]:
    """Images/s of ``cfg``'s training loader alone, as the Trainer would build it for one of its
    processes: with ``data.num_workers=auto``, that process's share of the node's cores (the
    config's devices per node share them), not the whole node's."""
    datamodule = build_datamodule(cfg.data, seed=cfg.seed)
    datamodule.local_processes = planned_devices(cfg)
    datamodule.setup("fit")
    return loader_throughput(
        datamodule.train_dataloader(), batches, warmup, progress=cfg.trainer.progress_bar
    )


def _read_checkpoint(path: str | Path, mmap: bool = False) -> tuple[Config, dict, int | None]:
    """Config, state dict and class count of a pretraining checkpoint (loaded safely, weights only).

    ``mmap=True`` maps the tensors instead of reading them (for the config alone).
    """
    if not Path(path).is_file():
        raise CheckpointError(
            f"Checkpoint {path} does not exist. Give a .ckpt file from `heatssl pretrain` "
            f"(RUN/checkpoints/last.ckpt)."
        )
    ckpt = safe_torch_load(path, mmap=mmap)
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    config = hp.get("config") if isinstance(hp, dict) else None
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(config, dict) or not isinstance(state, dict):
        if isinstance(ckpt, dict) and ckpt and all(hasattr(v, "shape") for v in ckpt.values()):
            held = f"a bare state dict of {len(ckpt)} tensors"
        elif isinstance(ckpt, dict):
            held = f"keys {sorted(map(str, ckpt))[:6]}"
        else:
            held = f"a {type(ckpt).__name__}"
        raise CheckpointError(
            f"{path} is a PyTorch checkpoint but not a heatssl pretraining checkpoint (no "
            f"hyper_parameters.config and state_dict; it holds {held}). Give a checkpoint from "
            f"`heatssl pretrain` (RUN/checkpoints/last.ckpt)."
        )
    try:
        cfg = load_config(config)
    except ConfigError as err:
        raise CheckpointError(f"{path}: the run config stored in it cannot be used: {err}") from err
    return cfg, state, hp.get("num_classes")


def load_checkpoint_config(path: str | Path) -> Config:
    """The run config stored inside a pretraining checkpoint (its tensors are mapped, not read)."""
    return _read_checkpoint(path, mmap=True)[0]


def module_from_checkpoint(path: str | Path) -> HeatPretrainModule:
    """The pretraining module of a checkpoint, in eval mode."""
    cfg, state, num_classes = _read_checkpoint(path)
    cfg.model.pretrained = False  # the weights come from the checkpoint, never from a download
    module = HeatPretrainModule(cfg, num_classes=num_classes)
    state = drop_pruned_layers(module, state)
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or reshaped:
        model = f"{cfg.model.backbone} {dict(cfg.model.kwargs)}".removesuffix(" {}")
        example = (
            f"{reshaped[0]}: file {list(state[reshaped[0]].shape)}, {model} "
            f"{list(own[reshaped[0]].shape)}"
            if reshaped
            else (missing or unexpected)[0]
        )
        raise CheckpointError(
            f"{path}: its weights do not fit the model its config describes (model.backbone="
            f"{model}, decoder.width={cfg.decoder.width}): {len(reshaped)} tensors of another "
            f"shape, {len(missing)} missing, {len(unexpected)} unexpected (e.g. {example}); they "
            f"come from another architecture (a state dict swapped in, or an edited file). Give "
            f"the checkpoint as `heatssl pretrain` wrote it (RUN/checkpoints/last.ckpt)."
        )
    module.load_state_dict(state)
    return module.eval()


def backbone_from_checkpoint(path: str | Path) -> Backbone:
    """The pretrained backbone of a pretraining checkpoint."""
    return module_from_checkpoint(path).backbone


def export(checkpoint: str | Path, out: str | Path | None = None) -> Path:
    """Export a checkpoint's backbone to safetensors (default: next to the run's checkpoints)."""
    checkpoint = Path(checkpoint)
    if out is None:
        out = checkpoint.parent.parent / "backbone.safetensors"
    return export_backbone(backbone_from_checkpoint(checkpoint), out)
