"""Checkpoints on disk: written so a kill cannot corrupt them, read without running pickled code.

Writing: temporary file in the same folder, fsync, rename.

Lightning's own save goes through an fsspec transaction whose temporary file lives in the system temp
folder; when that is another filesystem than the run folder (``/tmp`` on a node, runs on a shared
disk) the final move is a copy, and a kill during the copy leaves a truncated checkpoint. Here the
temporary file sits next to the target, so the last step is an atomic ``os.replace``.
"""

from __future__ import annotations

import contextvars
import os
import pickle
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from heatssl.errors import CheckpointError

_TRUST_PICKLE: contextvars.ContextVar[bool] = contextvars.ContextVar("trust_pickle", default=False)


@contextmanager
def trusted_checkpoints() -> Iterator[None]:
    """Within this block, checkpoints that need full unpickling load (the CLI's --trust-checkpoint).

    Unpickling can run code from the file: use it only for files whose origin you trust.
    """
    token = _TRUST_PICKLE.set(True)
    try:
        yield
    finally:
        _TRUST_PICKLE.reset(token)


def pickle_trusted() -> bool:
    """Whether the caller opted in to full unpickling (see :func:`trusted_checkpoints`)."""
    return _TRUST_PICKLE.get()


def safe_torch_load(path: str | Path, mmap: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True`` (tensors and plain containers only), on the CPU.

    A file that needs more (pickled classes or functions) is refused with an explanation, unless
    the caller is inside :func:`trusted_checkpoints`. ``mmap=True`` maps the tensors instead of
    reading them: a cheap check of a file that something else loads afterwards.
    """
    trusted = pickle_trusted()
    try:
        return torch.load(str(path), map_location="cpu", weights_only=not trusted, mmap=mmap)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path} holds pickled Python objects beyond tensors and plain containers; loading them "
            f"would run code from the file, so heatssl refuses it ({first}). If you trust where "
            f"the file comes from, pass --trust-checkpoint (in Python: `with "
            f"heatssl.train.checkpoint.trusted_checkpoints(): ...`)."
        ) from err


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


def rng_state() -> dict[str, Any]:
    """Every random generator a training step draws from (python, numpy, torch CPU and CUDA).

    Stored as tensors and plain numbers, so checkpoints holding it still load with
    ``weights_only=True``.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what :func:`rng_state` saved (CUDA only when this process has as many devices)."""
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _as_tuples(value: Any) -> Any:
    """``random.setstate`` wants tuples; a checkpoint round trip may give lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list | tuple) else value
