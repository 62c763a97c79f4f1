"""The Lightning Trainer of a run: devices, precision, checkpoints, logger and callbacks from a config.

Every GPU path (bf16, DDP over GPUs and nodes, channels_last, compile) is a setting of this one
Trainer, so the CPU tests run the same code a GPU node does.
"""

from __future__ import annotations

import importlib.util
import netrc
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.utilities import rank_zero_only

from heatssl.config import Config
from heatssl.errors import ConfigError
from heatssl.train.build import scale_line
from heatssl.train.callbacks import (
    BadImageReport,
    ReconstructionPictures,
    RunReport,
    batches_seen,
)
from heatssl.train.checkpoint import AtomicCheckpointIO
from heatssl.train.csv_log import ResumableCSVLogger
from heatssl.train.preemption import SignalCheckpoint


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
    budget = t.max_time_seconds()
    length = (
        f"time budget {budget / 60:g} min (trainer.max_epochs unused)"
        if budget
        else f"{t.max_epochs} epochs"
    )
    return (
        f"{scale_line(cfg, planned_devices(cfg), t.num_nodes)}; {length}; "
        f"accelerator {t.accelerator}, strategy {t.strategy}, precision {t.precision}"
    )


COMPILE_CACHE = "compile_cache"
"""In a run folder: torch.compile's cache (inductor and Triton), shared by every node and requeue."""


def use_compile_cache(run_dir: str | Path) -> Path | None:
    """Keep torch.compile's cache in ``RUN/compile_cache`` unless ``TORCHINDUCTOR_CACHE_DIR`` is set.

    Its default is a node-local /tmp folder: every start and requeue on another node compiled
    from scratch. The run folder is on a file system every node sees, and inductor writes its
    cache entries atomically. Returns the folder used (None: the user's own setting stands).
    """
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return None
    folder = Path(run_dir).resolve() / COMPILE_CACHE
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


class RunWandbLogger(WandbLogger):
    """Lightning's WandbLogger that ends the wandb run it started when the fit ends.

    Lightning leaves the run open until the process exits: it would show as running after the
    fit, and a second pretraining in the same process would log into it. A run that was already
    active when the logger was made (the caller's, which Lightning logs into) is left open.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        import wandb

        self._ends_run = wandb.run is None  # otherwise Lightning logs into the caller's run

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        if self._ends_run and self._experiment is not None:
            self._experiment.finish(exit_code=0 if status == "success" else 1)


def _wandb_logged_in() -> bool:
    """Whether wandb finds an API key without asking: $WANDB_API_KEY (or an identity token
    file), or a .netrc entry for $WANDB_BASE_URL's host (``wandb login`` writes one)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    host = base.split("://", 1)[-1].split("/", 1)[0]
    paths = [os.environ["NETRC"]] if os.environ.get("NETRC") else ["~/.netrc", "~/_netrc"]
    for path in (Path(p).expanduser() for p in paths):
        if path.is_file():
            try:
                return netrc.netrc(path).authenticators(host) is not None
            except (netrc.NetrcParseError, OSError):
                return False
    return False


def _wandb_logger(cfg: Config, run_dir: Path) -> WandbLogger:
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            'trainer.logger=wandb needs the wandb package: `pip install -e ".[wandb]"` (or '
            "`pip install wandb`), or use trainer.logger=csv (the default)."
        )
    extra: dict[str, Any] = {}
    if not os.environ.get("WANDB_MODE") and not _wandb_logged_in():
        extra["mode"] = "offline"  # rather than wandb's login prompt (or its error without a tty)
        if rank_zero_only.rank == 0:
            print(
                "heatssl: trainer.logger=wandb without a W&B login (no WANDB_API_KEY, no "
                "~/.netrc entry) and no WANDB_MODE: logging offline into "
                f"{run_dir / 'wandb'} (`wandb sync` uploads it later)",
                file=sys.stderr,
            )
    project = cfg.trainer.wandb_project or os.environ.get("WANDB_PROJECT") or "heatssl"
    name = Path(run_dir).resolve().name
    return RunWandbLogger(save_dir=str(run_dir), project=project, name=name, **extra)


def _logger(cfg: Config, run_dir: Path) -> Logger | bool:
    kind = cfg.trainer.logger
    if kind == "none":
        return False
    if kind == "wandb":
        return _wandb_logger(cfg, run_dir)
    if kind == "tensorboard":
        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError(
                "trainer.logger=tensorboard needs the tensorboard package: `pip install tensorboard`, "
                "or use trainer.logger=csv (the default)."
            )
        return TensorBoardLogger(save_dir=str(run_dir), name="", version="tensorboard")
    return ResumableCSVLogger(save_dir=str(run_dir), name="", version="")


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


def _checkpoint_callbacks(cfg: Config, run_dir: Path) -> list[L.Callback]:
    """One per epoch interval (the newest ``trainer.keep_checkpoints`` kept) plus mid-epoch
    triggers that only refresh ``last.ckpt``."""
    t = cfg.trainer
    folder = checkpoint_dir(run_dir)
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
    callbacks: list[L.Callback] | None = None,
    task: Literal["pretrain", "finetune"] = "pretrain",
    resume_command: str | None = None,
) -> L.Trainer:
    """A Lightning Trainer for ``cfg`` writing into ``run_dir`` (plus any extra ``callbacks``).

    ``task="finetune"`` is the same machine settings and fault handling for a classifier: no
    reconstruction pictures, validation every epoch, no gradient clipping (fine-tuning recipes
    use none), and ``trainer.max_epochs`` as the caller set it (``finetune.epochs``).
    ``resume_command`` is what a stop by signal tells the user to run (default: pretraining's).
    """
    t = cfg.trainer
    check_machine(cfg)
    if t.compile:
        use_compile_cache(run_dir)
    on_gpu = _uses_gpu(cfg)
    if on_gpu:
        torch.set_float32_matmul_precision("high")  # TF32 matmuls: float32 keeps bf16's range
    trainer_callbacks: list[L.Callback] = [
        *_checkpoint_callbacks(cfg, run_dir),
        BadImageReport(run_dir / "bad_images.txt"),
        *(
            [ReconstructionPictures(run_dir / "pictures", t.picture_every_n_epochs)]
            if task == "pretrain"
            else []
        ),
        RunReport(),
        SignalCheckpoint(
            checkpoint_dir(run_dir) / "last.ckpt", t.log_every_n_steps, resume_command
        ),
    ]
    plugins: list[Any] = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect() and not TorchElasticEnvironment.detect():
        # our callback saves and requeues; Lightning's own handler stays off (torchrun inside a
        # SLURM job keeps torchrun's ranks, as Lightning would choose)
        plugins.append(SLURMEnvironment(auto_requeue=False))
    logger = _logger(cfg, run_dir)
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
