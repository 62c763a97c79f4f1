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
from pathlib import Path
from typing import Any

import lightning as L
import torch.distributed as dist
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
        experiment = getattr(pl_module.logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image("reconstruction", figure_to_tensor(fig), pl_module.global_step)
        return save_figure(fig, self.folder / f"reconstruction_epoch{epoch:03d}.png")
