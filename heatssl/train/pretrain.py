"""``heatssl pretrain``: a QB-Heat run into its run folder, resumable, locked, and its loader's speed.

The run folder (:class:`~heatssl.runs.layout.RunLayout`) gets ``config.yaml`` (rerun with ``heatssl
pretrain -c`` on it), ``checkpoints/``, ``pictures/``, ``metrics.csv`` and, while a run trains in it,
``run.lock`` (:mod:`heatssl.runs.lock`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L

from heatssl.config import Config, save_config
from heatssl.data.datamodule import build_datamodule
from heatssl.data.throughput import loader_throughput
from heatssl.runs.checkpoints import pickle_trusted, safe_torch_load
from heatssl.runs.layout import RunLayout
from heatssl.runs.lock import holding_run_lock
from heatssl.runs.resume import RESUME_ENV, agreed_resume
from heatssl.runs.trainer import build_trainer, planned_devices, scale_line
from heatssl.train.pictures import ReconstructionPictures
from heatssl.train.pretrain_module import HeatPretrainModule


@dataclass
class PretrainResult:
    """Where a finished pretraining run left its files, and what it cost."""

    run_dir: Path
    last_checkpoint: Path
    seconds: float
    global_step: int
    is_global_zero: bool = True  # the process that writes files and reports (DDP rank 0)


def pretrain(
    cfg: Config,
    resume: str | None = None,
    callbacks: list[L.Callback] | None = None,
    force: bool = False,
) -> PretrainResult:
    """Pretrain with QB-Heat as ``cfg`` says; write the run folder; return where things are.

    ``callbacks`` are extra Lightning callbacks (monitors, custom logging) added to the Trainer.
    The run folder is locked for the run (:class:`~heatssl.runs.lock.RunLock`): a second run in
    it is refused while this one lives, unless ``force``.
    """
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    run = RunLayout(Path(cfg.run_dir))
    pictures = ReconstructionPictures(run.pictures, cfg.trainer.picture_every_n_epochs)
    trainer = build_trainer(cfg, run.root, resume_hint(run), [pictures, *(callbacks or [])])
    with holding_run_lock(run.root, trainer.is_global_zero, force):
        return _pretrain_locked(cfg, resume, trainer, run)


def resume_hint(run: RunLayout) -> str:
    """The command that continues the run in ``run`` from its ``last.ckpt``."""
    return f"heatssl pretrain -c {run.config} --resume"


def _pretrain_locked(
    cfg: Config, resume: str | None, trainer: L.Trainer, run: RunLayout
) -> PretrainResult:
    """:func:`pretrain` once the run folder is this process's."""
    inherited = RESUME_ENV in os.environ
    ckpt_path = agreed_resume(cfg, resume, trainer)  # a missing checkpoint stops here, early
    # an image folder's file list: scanned by process 0 once, read by the others and by requeues
    datamodule = build_datamodule(
        cfg.data, seed=cfg.seed, index_dir=run.root, rank=trainer.global_rank
    )
    if not cfg.data.download:
        datamodule.setup("fit")  # a missing or malformed dataset stops here, before anything runs
    classes = datamodule.num_classes if cfg.probe.online else None
    module = HeatPretrainModule(cfg, num_classes=classes)
    if ckpt_path is not None:
        # A damaged checkpoint, one needing pickle, or one whose epoch cannot be continued on this
        # data stops here, before config.yaml changes; mapped, so the tensors are not read twice
        # (Lightning loads the file next).
        stored = safe_torch_load(ckpt_path, mmap=True)
        state = stored.get(type(datamodule).__qualname__) if isinstance(stored, dict) else None
        if state and not cfg.data.download:
            datamodule.check_resume(state, trainer.world_size)
    if trainer.is_global_zero:
        save_config(cfg, run.config)
        scale = scale_line(cfg, trainer.num_devices, trainer.num_nodes, cfg.optim.base_lr)
        print(f"heatssl: {cfg.model.backbone} on {cfg.data.name}, {scale}, run folder {run.root}")
    start = time.perf_counter()
    try:
        trainer.fit(
            module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=not pickle_trusted()
        )
    finally:
        if not inherited:
            os.environ.pop(RESUME_ENV, None)  # meant for this run's processes only
    return PretrainResult(
        run_dir=run.root,
        last_checkpoint=run.last_checkpoint,
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
        datamodule.train_dataloader(),
        batches,
        warmup,
        progress=cfg.trainer.progress_bar,
        decode=datamodule.decode,
    )
