"""Callbacks every training run has: the per-epoch report of skipped image files, and the start report.

:class:`BadImageReport`: loaders put the files they could not read into each batch (its third
element, ``path: reason``); it collects them over an epoch (from every process under DDP), prints how
many and the first few at the end of the epoch, logs the count as ``data/skipped_images`` and appends
every one to ``<run_dir>/bad_images.txt``, so a long run never hides a broken file.

:class:`RunReport`: what the run will do, and after a few steps how long it will take.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch.distributed as dist

from heatssl.console import duration

REPORT_FIRST = 10  # files named in the printed report; the text file lists all


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
            try:
                self.report_file.parent.mkdir(parents=True, exist_ok=True)
                # file names are bytes: one that is not UTF-8 is written back as those bytes
                with self.report_file.open("a", encoding="utf-8", errors="surrogateescape") as f:
                    f.writelines(f"epoch {epoch}\t{line}\n" for line in files)
            except OSError as err:  # the epoch's checkpoint matters more than this report
                print(
                    f"heatssl: warning: epoch {epoch}: {self.report_file} was not written "
                    f"({type(err).__name__}: {err}); training goes on.",
                    file=sys.stderr,
                    flush=True,
                )


def _train_images(data: Any) -> int | str:
    """The training images of a data module: a shard stream's record count (it has no length)."""
    if data is None:
        return "?"
    count = getattr(data.train_dataset, "images", None)
    return count if isinstance(count, int) else len(data.train_dataset)


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
        teacher = getattr(getattr(pl_module, "qbheat", None), "teacher", None)
        frozen = sum(p.numel() for p in teacher.parameters()) if teacher is not None else 0
        params = sum(p.numel() for p in pl_module.parameters()) - frozen
        per_epoch = trainer.num_training_batches
        images = _train_images(trainer.datamodule)
        budget = pl_module.cfg.trainer.max_time_seconds()
        if budget:
            length = f"for a time budget of {budget / 60:g} min"
        else:
            total = per_epoch * trainer.max_epochs
            length = f"x {trainer.max_epochs} epochs = {total} steps"
        done = f", resuming at step {trainer.global_step}" if trainer.global_step else ""
        print(
            f"heatssl: {params / 1e6:.1f} M parameters"
            + (f" (+ {frozen / 1e6:.1f} M in the EMA teacher)" if frozen else "")
            + f"; {images} training images, {per_epoch} steps per epoch {length}{done}",
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
            left = f"about {duration(remaining * per_step)} to go ({remaining} steps)"
        print(f"heatssl: {per_step:.2f} s per step: {left}", file=sys.stderr)
