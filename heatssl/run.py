"""Run folders and the Lightning Trainer: pretrain, resume and export, as the CLI and scripts call them.

A run folder holds ``config.yaml`` (the resolved config: rerun with ``heatssl pretrain -c`` on it),
``checkpoints/`` (``last.ckpt`` plus one per epoch), ``pictures/`` and ``metrics.csv``.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from heatssl.backbone import Backbone, export_backbone
from heatssl.bad_images import BadImageReport
from heatssl.checkpoint_io import AtomicCheckpointIO, pickle_trusted, safe_torch_load
from heatssl.config import Config, ConfigError, load_config, save_config
from heatssl.data import build_datamodule, loader_throughput
from heatssl.pretrain import HeatPretrainModule
from heatssl.schedule import scaled_lr


@dataclass
class PretrainResult:
    """Where a finished pretraining run left its files, and what it cost."""

    run_dir: Path
    last_checkpoint: Path
    seconds: float
    global_step: int


def checkpoint_dir(run_dir: str | Path) -> Path:
    """The folder of a run's checkpoints."""
    return Path(run_dir) / "checkpoints"


def planned_devices(cfg: Config) -> int:
    """Devices per node the Trainer will use, read from the config (before any Trainer exists)."""
    devices, accelerator = cfg.trainer.devices, cfg.trainer.accelerator
    if isinstance(devices, str) and "," in devices:  # Lightning's "0,1" / "1,": device ids
        return len([d for d in devices.split(",") if d.strip()])
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 0:
        return devices
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.cuda.device_count()  # "auto" or -1: every visible GPU
    return 1


def launch_plan(cfg: Config) -> str:
    """One line on the scale of a run: devices, nodes, effective batch and the lr that follows it."""
    t = cfg.trainer
    devices = planned_devices(cfg)
    batch = cfg.data.batch_size * devices * t.num_nodes * t.accumulate_grad_batches
    return (
        f"effective batch {batch} = {cfg.data.batch_size} per device x {devices} devices x "
        f"{t.num_nodes} nodes x {t.accumulate_grad_batches} accumulation; "
        f"lr {scaled_lr(cfg.optim.base_lr, batch):.4g} = base_lr {cfg.optim.base_lr:g} x {batch} / 256; "
        f"accelerator {t.accelerator}, strategy {t.strategy}, precision {t.precision}"
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


def build_trainer(
    cfg: Config, run_dir: Path, callbacks: list[L.Callback] | None = None
) -> L.Trainer:
    """A Lightning Trainer for ``cfg`` writing into ``run_dir`` (plus any extra ``callbacks``)."""
    t = cfg.trainer
    on_gpu = t.accelerator in ("gpu", "cuda") or (
        t.accelerator == "auto" and torch.cuda.is_available()
    )
    if t.sync_batchnorm and not on_gpu:
        raise ConfigError(
            f"trainer.sync_batchnorm=true with trainer.accelerator={t.accelerator} on a machine "
            f"without a GPU in use: torch's SyncBatchNorm only runs on GPUs. Set "
            f"trainer.sync_batchnorm=false (or train on GPUs)."
        )
    if t.checkpoint_every_n_steps < 0 or t.checkpoint_every_n_minutes < 0:
        raise ConfigError(
            f"trainer.checkpoint_every_n_steps={t.checkpoint_every_n_steps} and "
            f"trainer.checkpoint_every_n_minutes={t.checkpoint_every_n_minutes} must be >= 0 "
            f"(0 turns that trigger off)."
        )
    trainer_callbacks: list[L.Callback] = [
        ModelCheckpoint(
            dirpath=checkpoint_dir(run_dir),
            filename="epoch{epoch:03d}",
            auto_insert_metric_name=False,
            every_n_epochs=max(1, t.checkpoint_every_n_epochs),
            save_top_k=-1,
            save_last=True,
            enable_version_counter=False,  # every trigger below refreshes the same last.ckpt
        ),
        BadImageReport(run_dir / "bad_images.txt"),
    ]
    # Mid-epoch: only last.ckpt is refreshed (save_top_k=0), so --resume loses at most that much.
    triggers = []  # Lightning takes one trigger per ModelCheckpoint
    if t.checkpoint_every_n_steps:
        triggers.append({"every_n_train_steps": t.checkpoint_every_n_steps})
    if t.checkpoint_every_n_minutes:
        triggers.append({"train_time_interval": timedelta(minutes=t.checkpoint_every_n_minutes)})
    trainer_callbacks += [
        ModelCheckpoint(
            dirpath=checkpoint_dir(run_dir),
            save_top_k=0,
            save_last=True,
            enable_version_counter=False,
            **trigger,
        )
        for trigger in triggers
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


def pretrain(
    cfg: Config, resume: str | None = None, callbacks: list[L.Callback] | None = None
) -> PretrainResult:
    """Pretrain with QB-Heat as ``cfg`` says; write the run folder; return where things are.

    ``callbacks`` are extra Lightning callbacks (monitors, custom logging) added to the Trainer.
    """
    ckpt_path = resolve_resume(cfg, resume)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    run_dir = Path(cfg.run_dir)
    datamodule = build_datamodule(cfg.data, seed=cfg.seed)
    if not cfg.data.download:
        datamodule.setup("fit")  # a missing or malformed dataset stops here, before anything runs
    classes = datamodule.num_classes if cfg.probe.online else None
    module = HeatPretrainModule(cfg, picture_dir=str(run_dir / "pictures"), num_classes=classes)
    trainer = build_trainer(cfg, run_dir, callbacks)
    if trainer.is_global_zero:
        save_config(cfg, run_dir / "config.yaml")
        accumulate = cfg.trainer.accumulate_grad_batches
        batch = cfg.data.batch_size * trainer.world_size * accumulate
        print(
            f"heatssl: {cfg.model.backbone} on {cfg.data.name}, effective batch {batch} = "
            f"{cfg.data.batch_size} x {trainer.world_size} process(es) x {accumulate} accumulation, "
            f"lr {scaled_lr(cfg.optim.base_lr, batch):.4g} (base_lr {cfg.optim.base_lr:g} x "
            f"{batch} / 256), run folder {run_dir}"
        )
    start = time.perf_counter()
    if ckpt_path is not None:
        # A checkpoint needing pickle stops here with the reason; mapped, so the tensors are not
        # read twice (Lightning loads the file next).
        safe_torch_load(ckpt_path, mmap=True)
    trainer.fit(
        module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=not pickle_trusted()
    )
    return PretrainResult(
        run_dir=run_dir,
        last_checkpoint=checkpoint_dir(run_dir) / "last.ckpt",
        seconds=time.perf_counter() - start,
        global_step=trainer.global_step,
    )


def benchmark_loader(cfg: Config, batches: int = 50, warmup: int = 5) -> dict[str, float]:
    """Images/s of ``cfg``'s training loader alone, as the Trainer would build it."""
    datamodule = build_datamodule(cfg.data, seed=cfg.seed)
    datamodule.setup("fit")
    return loader_throughput(
        datamodule.train_dataloader(), batches, warmup, progress=cfg.trainer.progress_bar
    )


def _read_checkpoint(path: str | Path) -> tuple[Config, dict, int | None]:
    """Config, state dict and class count of a pretraining checkpoint (loaded safely, weights only)."""
    ckpt = safe_torch_load(path)
    try:
        hp = ckpt["hyper_parameters"]
        return load_config(hp["config"]), ckpt["state_dict"], hp.get("num_classes")
    except KeyError as err:
        raise ConfigError(
            f"{path} is not a heatssl pretraining checkpoint (no hyper_parameters.config)."
        ) from err


def load_checkpoint_config(path: str | Path) -> Config:
    """The run config stored inside a pretraining checkpoint."""
    return _read_checkpoint(path)[0]


def module_from_checkpoint(path: str | Path) -> HeatPretrainModule:
    """The pretraining module of a checkpoint, in eval mode."""
    cfg, state, num_classes = _read_checkpoint(path)
    cfg.model.pretrained = False  # the weights come from the checkpoint, never from a download
    module = HeatPretrainModule(cfg, num_classes=num_classes)
    module.load_state_dict(state)
    return module.eval()


def backbone_from_checkpoint(path: str | Path) -> Backbone:
    """The pretrained backbone of a pretraining checkpoint."""
    return module_from_checkpoint(path).backbone


def export(checkpoint: str | Path, out: str | Path | None = None) -> Path:
    """Export a checkpoint's backbone to safetensors (default: next to the run's checkpoints)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise ConfigError(f"Checkpoint {checkpoint} does not exist.")
    if out is None:
        out = checkpoint.parent.parent / "backbone.safetensors"
    return export_backbone(backbone_from_checkpoint(checkpoint), out)
