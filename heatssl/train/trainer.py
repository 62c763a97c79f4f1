"""The Lightning Trainer of a run: devices, precision, checkpoints, logger and callbacks from a config.

Every GPU path (bf16, DDP over GPUs and nodes, channels_last, compile) is a setting of this one
Trainer, so the CPU tests run the same code a GPU node does.
"""

from __future__ import annotations

import importlib.util
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from heatssl.config import Config
from heatssl.errors import ConfigError
from heatssl.train.build import scale_line
from heatssl.train.callbacks import BadImageReport, ReconstructionPictures
from heatssl.train.checkpoint import AtomicCheckpointIO


def checkpoint_dir(run_dir: str | Path) -> Path:
    """The folder of a run's checkpoints."""
    return Path(run_dir) / "checkpoints"


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


def launch_plan(cfg: Config) -> str:
    """One line on the scale of a run: devices, nodes, effective batch and the lr that follows it."""
    t = cfg.trainer
    return (
        f"{scale_line(cfg, planned_devices(cfg), t.num_nodes)}; "
        f"accelerator {t.accelerator}, strategy {t.strategy}, precision {t.precision}"
    )


def check_machine(cfg: Config) -> None:
    """Refuse settings this machine cannot run (the config itself was validated when loaded)."""
    if cfg.trainer.sync_batchnorm and not _uses_gpu(cfg):
        raise ConfigError(
            f"trainer.sync_batchnorm=true with trainer.accelerator={cfg.trainer.accelerator} on a "
            f"machine without a GPU in use: torch's SyncBatchNorm only runs on GPUs. Set "
            f"trainer.sync_batchnorm=false (or train on GPUs)."
        )


def _logger(cfg: Config, run_dir: Path) -> Logger | bool:
    kind = cfg.trainer.logger
    if kind == "none":
        return False
    if kind == "tensorboard":
        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError(
                "trainer.logger=tensorboard needs the tensorboard package: `pip install tensorboard`, "
                "or use trainer.logger=csv (the default)."
            )
        return TensorBoardLogger(save_dir=str(run_dir), name="", version="tensorboard")
    return CSVLogger(save_dir=str(run_dir), name="", version="")


def _checkpoint_callbacks(cfg: Config, run_dir: Path) -> list[L.Callback]:
    """One per epoch interval (kept) plus mid-epoch triggers that only refresh ``last.ckpt``."""
    t = cfg.trainer
    folder = checkpoint_dir(run_dir)
    epochs = ModelCheckpoint(
        dirpath=folder,
        filename="epoch{epoch:03d}",
        auto_insert_metric_name=False,
        every_n_epochs=max(1, t.checkpoint_every_n_epochs),
        save_top_k=-1,
        save_last=True,
        enable_version_counter=False,  # every trigger below refreshes the same last.ckpt
    )
    # Mid-epoch: only last.ckpt is refreshed (save_top_k=0), so --resume loses at most that much.
    triggers = []  # Lightning takes one trigger per ModelCheckpoint
    if t.checkpoint_every_n_steps:
        triggers.append({"every_n_train_steps": t.checkpoint_every_n_steps})
    if t.checkpoint_every_n_minutes:
        triggers.append({"train_time_interval": timedelta(minutes=t.checkpoint_every_n_minutes)})
    mid_epoch = [
        ModelCheckpoint(
            dirpath=folder, save_top_k=0, save_last=True, enable_version_counter=False, **trigger
        )
        for trigger in triggers
    ]
    return [epochs, *mid_epoch]


def build_trainer(
    cfg: Config, run_dir: Path, callbacks: list[L.Callback] | None = None
) -> L.Trainer:
    """A Lightning Trainer for ``cfg`` writing into ``run_dir`` (plus any extra ``callbacks``)."""
    t = cfg.trainer
    check_machine(cfg)
    trainer_callbacks: list[L.Callback] = [
        *_checkpoint_callbacks(cfg, run_dir),
        BadImageReport(run_dir / "bad_images.txt"),
        ReconstructionPictures(run_dir / "pictures", t.picture_every_n_epochs),
    ]
    logger = _logger(cfg, run_dir)
    if logger:
        trainer_callbacks.append(LearningRateMonitor(logging_interval="step"))
    trainer_callbacks += list(callbacks or [])
    return L.Trainer(
        default_root_dir=str(run_dir),
        max_epochs=t.max_epochs,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        accumulate_grad_batches=t.accumulate_grad_batches,
        sync_batchnorm=t.sync_batchnorm,
        gradient_clip_val=t.gradient_clip_val,
        limit_train_batches=t.limit_train_batches,
        limit_val_batches=1.0 if cfg.probe.online else 0,
        log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.progress_bar,
        logger=logger,
        callbacks=trainer_callbacks,
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # the data module shards itself (resumable mid-epoch)
    )
