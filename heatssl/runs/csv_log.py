"""``metrics.csv`` that survives ``--resume``: the rows before the resumed step are kept.

Lightning's CSV logger deletes an existing ``metrics.csv`` when its run starts, so a resumed run
would lose the loss curve of everything before the stop. Here the file is kept, and the first rows
the run writes decide what stays: old rows at or after the first new step (logged after the
checkpoint the run resumed from, or a whole earlier run when a run starts afresh at step 0) are
replaced, the rest is kept, and new columns are merged into the header.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class _KeepingWriter(ExperimentWriter):
    """Lightning's writer, except that an existing ``metrics.csv`` is trimmed, not deleted."""

    def _check_log_dir_exists(self) -> None:
        self._pending_trim = True  # decided at the first save, from the first new step

    def save(self) -> None:
        if self.metrics and getattr(self, "_pending_trim", False):
            self._pending_trim = False
            self._trim(min(int(m["step"]) for m in self.metrics))
        super().save()

    def _trim(self, first_step: int) -> None:
        """Keep the file's rows before ``first_step`` and its columns (none if no row is kept)."""
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            keys = list(reader.fieldnames or [])
            rows = [r for r in reader if _step(r) is not None and _step(r) < first_step]
        if not rows:
            path.unlink()
            return
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = sorted(set(self.metrics_keys) | set(keys))


def _step(row: dict[str, Any]) -> int | None:
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None


class ResumableCSVLogger(CSVLogger):
    """:class:`~lightning.pytorch.loggers.CSVLogger` whose ``metrics.csv`` keeps a resumed run's
    earlier rows (see the module's docstring)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment
