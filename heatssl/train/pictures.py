"""Pretraining's pictures: what QB-Heat reconstructs from the first training images, every few epochs.

Drawn by process 0 into ``RUN/pictures/`` and sent to the logger (TensorBoard, Weights & Biases).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import Logger, WandbLogger
from torch import Tensor

from heatssl.runs.figures import figure_to_tensor, reconstruction_sheet, save_figure

PICTURE_IMAGES = 8  # columns of a reconstruction picture


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
    pictures off. The module must hold its QB-Heat as ``qbheat`` (as
    :class:`~heatssl.train.pretrain_module.HeatPretrainModule` does).
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
            try:
                self.draw(pl_module, epoch)
            except Exception as err:  # a picture is never worth the epoch's checkpoint
                print(
                    f"heatssl: warning: epoch {epoch}: the reconstruction picture was not written "
                    f"({type(err).__name__}: {err}); training goes on.",
                    file=sys.stderr,
                    flush=True,
                )

    def draw(self, pl_module: Any, epoch: int) -> Path:
        """Write the reconstruction sheet for ``epoch`` to the folder and to the logger."""
        fig = reconstruction_sheet(pl_module.qbheat, self._batch, f"QB-Heat, epoch {epoch}")
        loggers = getattr(pl_module, "loggers", None) or []
        if loggers:
            image = figure_to_tensor(fig)
            for logger in loggers:
                log_picture(logger, "reconstruction", image, pl_module.global_step)
        return save_figure(fig, self.folder / f"reconstruction_epoch{epoch:03d}.png")
