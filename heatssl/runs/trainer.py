"""The Lightning Trainer of a run: devices, precision, checkpoints, logger and callbacks from a config.

Every GPU path (bf16, DDP over GPUs and nodes, channels_last, compile) is a setting of this one
Trainer, so the CPU tests run the same code a GPU node does.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.plugins.io import TorchCheckpointIO

from heatssl.config import Config, effective_batch
from heatssl.errors import ConfigError
from heatssl.model.optim import scaled_lr
from heatssl.runs.callbacks import BadImageReport, RunReport, batches_seen
from heatssl.runs.checkpoints import atomic_torch_save
from heatssl.runs.layout import RunLayout
from heatssl.runs.loggers import run_logger
from heatssl.runs.preemption import SignalCheckpoint


def _uses_gpu(cfg: Config) -> bool:
    accelerator = cfg.trainer.accelerator
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def planned_devices(cfg: Config) -> int:
    """Devices per node the Trainer will use, read from the config (before any Trainer exists)."""
    devices = cfg.trainer.devices
    if isinstance(devices, str) and "," in devices:  # Lightning's "0,1" / "1,": device ids
        return len([d for d in devices.split(",") if d.strip()])
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 0:
        return devices
    if _uses_gpu(cfg) and torch.cuda.is_available():
        return torch.cuda.device_count()  # "auto" or -1: every visible GPU
    return 1


def scale_line(cfg: Config, devices: int, nodes: int, base_lr: float) -> str:
    """The effective batch and the lr it gives ``base_lr``, spelled out (printed at every start)."""
    batch = effective_batch(cfg, devices * nodes)
    return (
        f"effective batch {batch} = {cfg.data.batch_size} per device x {devices} devices x "
        f"{nodes} nodes x {cfg.trainer.accumulate_grad_batches} accumulation; "
        f"lr {scaled_lr(base_lr, batch):.4g} = base_lr {base_lr:g} x {batch} / 256"
    )


def launch_plan(cfg: Config) -> str:
    """One line on the scale of a pretraining run: devices, nodes, effective batch, lr, length."""
    t = cfg.trainer
    budget = t.max_time_seconds()
    length = (
        f"time budget {budget / 60:g} min (trainer.max_epochs unused)"
        if budget
        else f"{t.max_epochs} epochs"
    )
    return (
        f"{scale_line(cfg, planned_devices(cfg), t.num_nodes, cfg.optim.base_lr)}; {length}; "
        f"accelerator {t.accelerator}, strategy {t.strategy}, precision {t.precision}"
    )


def use_compile_cache(run_dir: str | Path) -> Path | None:
    """Keep torch.compile's cache in ``RUN/compile_cache`` unless ``TORCHINDUCTOR_CACHE_DIR`` is set.

    Its default is a node-local /tmp folder: every start and requeue on another node compiled
    from scratch. The run folder is on a file system every node sees, and inductor writes its
    cache entries atomically. Returns the folder used (None: the user's own setting stands).
    """
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return None
    folder = RunLayout(Path(run_dir).resolve()).compile_cache
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return folder


def check_machine(cfg: Config) -> None:
    """Refuse settings this machine cannot run (the config itself was validated when loaded)."""
    if cfg.trainer.sync_batchnorm and not _uses_gpu(cfg):
        raise ConfigError(
            f"trainer.sync_batchnorm=true with trainer.accelerator={cfg.trainer.accelerator} on a "
            f"machine without a GPU in use: torch's SyncBatchNorm only runs on GPUs. Set "
            f"trainer.sync_batchnorm=false (or train on GPUs)."
        )


class LossProgressBar(TQDMProgressBar):
    """Lightning's bar, showing the module's ``last_loss`` read only when the bar refreshes.

    A value logged with ``prog_bar=True`` is read on the host after every step, refreshed or not.
    """

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        loss = getattr(pl_module, "last_loss", None)
        if loss is not None:
            metrics["loss"] = f"{float(loss):.3f}"
        return metrics


class SparseTimeCheckpoint(ModelCheckpoint):
    """ModelCheckpoint's ``train_time_interval`` trigger, consulted every ``check_every`` batches.

    Lightning's own check broadcasts the decision from rank 0 at every batch (a collective and a
    host sync); minutes-long intervals need no such precision.
    """

    def __init__(self, check_every: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.check_every = max(1, check_every)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if batches_seen(trainer) % self.check_every == 0:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO for local paths that writes with :func:`atomic_torch_save`."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)  # remote: Lightning's way
            return
        atomic_torch_save(checkpoint, path)


def _checkpoint_callbacks(cfg: Config, run_dir: Path) -> list[L.Callback]:
    """One per epoch interval (the newest ``trainer.keep_checkpoints`` kept) plus mid-epoch
    triggers that only refresh ``last.ckpt``."""
    t = cfg.trainer
    folder = RunLayout(Path(run_dir)).checkpoints
    # Lightning ranks checkpoints by a monitored value; "epoch" (always available) with mode
    # "max" keeps the newest ones and deletes older epoch files as new ones are written.
    keep = t.keep_checkpoints
    newest = {"monitor": "epoch", "mode": "max"} if keep > 0 else {}
    epochs = ModelCheckpoint(
        dirpath=folder,
        filename="epoch{epoch:03d}",
        auto_insert_metric_name=False,
        every_n_epochs=max(1, t.checkpoint_every_n_epochs),
        save_top_k=keep,
        save_last=True,
        enable_version_counter=False,  # every trigger below refreshes the same last.ckpt
        **newest,
    )
    # Mid-epoch: only last.ckpt is refreshed (save_top_k=0), so --resume loses at most that much.
    last_only = {"dirpath": folder, "save_top_k": 0, "save_last": True}
    mid_epoch: list[L.Callback] = []  # Lightning takes one trigger per ModelCheckpoint
    if t.checkpoint_every_n_steps:
        mid_epoch.append(
            ModelCheckpoint(
                every_n_train_steps=t.checkpoint_every_n_steps,
                enable_version_counter=False,
                **last_only,
            )
        )
    if t.checkpoint_every_n_minutes:
        mid_epoch.append(
            SparseTimeCheckpoint(
                t.log_every_n_steps,
                train_time_interval=timedelta(minutes=t.checkpoint_every_n_minutes),
                enable_version_counter=False,
                **last_only,
            )
        )
    return [epochs, *mid_epoch]


def build_trainer(
    cfg: Config,
    run_dir: Path,
    resume_command: str,
    callbacks: list[L.Callback] | None = None,
    task: Literal["pretrain", "finetune"] = "pretrain",
) -> L.Trainer:
    """A Lightning Trainer for ``cfg`` writing into ``run_dir`` (plus the stage's ``callbacks``:
    pretraining adds its reconstruction pictures).

    ``task="finetune"`` is the same machine settings and fault handling for a classifier:
    validation every epoch, no gradient clipping (fine-tuning recipes use none), one lr logged, and
    ``trainer.max_epochs`` as the caller set it (``finetune.epochs``). ``resume_command`` is what a
    stop by signal tells the user to run (each stage passes its own).
    """
    t = cfg.trainer
    run = RunLayout(Path(run_dir))
    check_machine(cfg)
    if t.compile:
        use_compile_cache(run_dir)
    on_gpu = _uses_gpu(cfg)
    if on_gpu:
        torch.set_float32_matmul_precision("high")  # TF32 matmuls: float32 keeps bf16's range
    trainer_callbacks: list[L.Callback] = [
        *_checkpoint_callbacks(cfg, run_dir),
        BadImageReport(run.bad_images),
        RunReport(),
        SignalCheckpoint(run.last_checkpoint, t.log_every_n_steps, resume_command),
    ]
    plugins: list[Any] = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect() and not TorchElasticEnvironment.detect():
        # our callback saves and requeues; Lightning's own handler stays off (torchrun inside a
        # SLURM job keeps torchrun's ranks, as Lightning would choose)
        plugins.append(SLURMEnvironment(auto_requeue=False))
    logger = run_logger(cfg, run_dir)
    if logger and task == "pretrain":  # fine-tuning logs one lr (the head's), not every layer's
        trainer_callbacks.append(LearningRateMonitor(logging_interval="step"))
    if t.progress_bar:  # the bar reads the loss on the host: as often as the logger, not every step
        trainer_callbacks.append(LossProgressBar(refresh_rate=max(1, t.log_every_n_steps)))
    trainer_callbacks += list(callbacks or [])
    budget = t.max_time_seconds()
    return L.Trainer(
        default_root_dir=str(run_dir),
        # a time budget replaces the epoch count (Lightning's Timer stops at a batch boundary)
        max_epochs=-1 if budget else t.max_epochs,
        max_time=timedelta(seconds=budget) if budget else None,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        accumulate_grad_batches=t.accumulate_grad_batches,
        sync_batchnorm=t.sync_batchnorm,
        gradient_clip_val=t.gradient_clip_val if task == "pretrain" else None,
        limit_train_batches=t.limit_train_batches,
        limit_val_batches=1.0 if cfg.probe.online or task == "finetune" else 0,
        num_sanity_val_steps=0 if task == "finetune" else None,
        check_val_every_n_epoch=cfg.finetune.val_every_n_epochs if task == "finetune" else 1,
        log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.progress_bar,
        benchmark=on_gpu,  # cuDNN picks its fastest kernels for the (fixed) input sizes
        logger=logger,
        callbacks=trainer_callbacks,
        enable_model_summary=False,  # heatssl's start line gives the size (RunReport)
        plugins=plugins,
        use_distributed_sampler=False,  # the data module shards itself (resumable mid-epoch)
    )
