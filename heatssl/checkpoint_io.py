"""Checkpoint writing that a kill cannot corrupt: temporary file in the same folder, fsync, rename.

Lightning's own save goes through an fsspec transaction whose temporary file lives in the system temp
folder; when that is another filesystem than the run folder (``/tmp`` on a node, runs on a shared
disk) the final move is a copy, and a kill during the copy leaves a truncated checkpoint. Here the
temporary file sits next to the target, so the last step is an atomic ``os.replace``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` so that ``path`` is always either the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO for local paths that writes with :func:`atomic_torch_save`."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)  # remote: Lightning's way
            return
        atomic_torch_save(checkpoint, path)
