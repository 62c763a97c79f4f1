"""Callbacks of pretraining: the per-epoch report of skipped image files, and reconstruction pictures.

:class:`BadImageReport`: loaders put the files they could not read into each batch (its third
element, ``path: reason``); it collects them over an epoch (from every process under DDP), prints how
many and the first few at the end of the epoch, logs the count as ``data/skipped_images`` and appends
every one to ``<run_dir>/bad_images.txt``, so a long run never hides a broken file.

:class:`ReconstructionPictures`: input / kept quarter / reconstruction of the first training images,
every few epochs and at the end, into the run folder and the logger.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch.distributed as dist
from lightning.pytorch.loggers import Logger, WandbLogger
from torch import Tensor

from heatssl.train.pictures import figure_to_tensor, reconstruction_figure, save_figure

REPORT_FIRST = 10  # files named in the printed report; the text file lists all
PICTURE_IMAGES = 8  # columns of a reconstruction picture


def batches_seen(trainer: L.Trainer) -> int:
    """Training batches of this run so far, across epochs, the current one included.

    What "every N batches" checks count, so that an epoch shorter than N is checked too.
    """
    return trainer.fit_loop.epoch_loop.total_batch_idx + 1


class BadImageReport(L.Callback):
    """Counts and names the unreadable files met in each epoch (training and validation)."""

    def __init__(self, report_file: str | Path | None = None, first: int = REPORT_FIRST) -> None:
        self.report_file = Path(report_file) if report_file else None
        self.first = first
        self._epoch: dict[str, None] = {}  # ordered set: a file met twice counts once

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Note the unreadable files a batch carries (its third element)."""
        if isinstance(batch, list | tuple) and len(batch) > 2 and isinstance(batch[2], list):
            self._epoch.update(dict.fromkeys(batch[2]))

    on_validation_batch_end = on_train_batch_end  # same signature plus dataloader_idx

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        files = list(self._epoch)
        self._epoch = {}
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[list[str] | None] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, files)
            files = list(dict.fromkeys(f for part in gathered for f in part or []))
        pl_module.log("data/skipped_images", float(len(files)), rank_zero_only=True)
        if not files or not trainer.is_global_zero:
            return
        epoch = trainer.current_epoch
        shown = "\n  ".join(files[: self.first])
        more = f"\n  ... and {len(files) - self.first} more" if len(files) > self.first else ""
        where = f" (all listed in {self.report_file})" if self.report_file else ""
        print(
            f"heatssl: epoch {epoch}: skipped {len(files)} unreadable image file(s){where}:\n"
            f"  {shown}{more}",
            file=sys.stderr,
            flush=True,
        )
        if self.report_file is not None:
            self.report_file.parent.mkdir(parents=True, exist_ok=True)
            with self.report_file.open("a") as f:
                f.writelines(f"epoch {epoch}\t{line}\n" for line in files)


def log_picture(logger: Logger, key: str, image: Tensor, step: int) -> bool:
    """Send an RGB uint8 ``(3, H, W)`` picture to ``logger`` as an image, in the form it takes.

    Weights & Biases takes a list of images; TensorBoard (and any logger whose experiment has
    ``add_image``) one CHW tensor. Returns whether the logger took it (CSV has no images).
    """
    if isinstance(logger, WandbLogger):
        logger.log_image(key=key, images=[image.permute(1, 2, 0).numpy()], step=step)
        return True
    experiment = getattr(logger, "experiment", None)
    if hasattr(experiment, "add_image"):
        experiment.add_image(key, image, step)
        return True
    return False


class ReconstructionPictures(L.Callback):
    """Draws what QB-Heat reconstructs from the first training images, every ``every_n_epochs``.

    The first batch's first images are kept and redrawn (quadrants cycling over the columns) at the
    end of every ``every_n_epochs``-th epoch and of the last one, by process 0 only. ``0`` turns the
    pictures off. The module must have ``reconstruct`` and ``picture_note`` (as
    :class:`~heatssl.train.module.HeatPretrainModule` does).
    """

    def __init__(
        self, folder: str | Path, every_n_epochs: int, images: int = PICTURE_IMAGES
    ) -> None:
        self.folder, self.every, self.images = Path(folder), every_n_epochs, images
        self._batch: Tensor | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Keep the first batch's first images (once per run)."""
        if self._batch is None and self.every > 0:
            self._batch = batch[0][: self.images].detach().clone()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        last = epoch == trainer.max_epochs
        if self._batch is None or (epoch % self.every and not last):
            return
        if trainer.is_global_zero:
            self.draw(pl_module, epoch)

    def draw(self, pl_module: Any, epoch: int) -> Path:
        """Write the reconstruction sheet for ``epoch`` to the folder and to the logger."""
        shown, mask, recon = pl_module.reconstruct(self._batch)
        title = f"QB-Heat, epoch {epoch} ({pl_module.picture_note})"
        fig = reconstruction_figure(shown, mask, recon, title=title)
        loggers = getattr(pl_module, "loggers", None) or []
        if loggers:
            image = figure_to_tensor(fig)
            for logger in loggers:
                log_picture(logger, "reconstruction", image, pl_module.global_step)
        return save_figure(fig, self.folder / f"reconstruction_epoch{epoch:03d}.png")


class RunReport(L.Callback):
    """Says at the start what the run will do, and after a few steps how long it will take.

    Printed once, by process 0, to stderr: the model size, the training images, the steps per epoch
    and in all (or the time budget), then the measured seconds per step (the first step, which
    builds kernels and starts loader workers, left out) and the time to the end.
    """

    def __init__(self, measure_after: int = 10) -> None:
        self.measure_after = max(2, measure_after)
        self._start: float | None = None
        self._start_step = 0
        self._done = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        params = sum(p.numel() for p in pl_module.parameters())
        per_epoch = trainer.num_training_batches
        images = len(trainer.datamodule.train_dataset) if trainer.datamodule else "?"
        budget = pl_module.cfg.trainer.max_time_seconds()
        if budget:
            length = f"for a time budget of {budget / 60:g} min"
        else:
            total = per_epoch * trainer.max_epochs
            length = f"x {trainer.max_epochs} epochs = {total} steps"
        done = f", resuming at step {trainer.global_step}" if trainer.global_step else ""
        print(
            f"heatssl: {params / 1e6:.1f} M parameters; {images} training images, {per_epoch} "
            f"steps per epoch {length}{done}",
            file=sys.stderr,
        )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        if self._done or not trainer.is_global_zero:
            return
        now = time.perf_counter()
        if self._start is None:  # after the first step
            self._start, self._start_step = now, trainer.global_step
            return
        steps = trainer.global_step - self._start_step
        if steps < self.measure_after:
            return
        self._done = True
        per_step = (now - self._start) / steps
        budget = pl_module.cfg.trainer.max_time_seconds()
        if budget:
            left = f"about {int(budget / per_step)} steps in the {budget / 60:g} min budget"
        else:
            remaining = trainer.num_training_batches * trainer.max_epochs - trainer.global_step
            left = f"about {_duration(remaining * per_step)} to go ({remaining} steps)"
        print(f"heatssl: {per_step:.2f} s per step: {left}", file=sys.stderr)


def _duration(seconds: float) -> str:
    """``42 s``, ``12 min``, ``3.5 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
