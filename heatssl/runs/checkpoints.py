"""PyTorch checkpoint files: written so a kill cannot corrupt them, read without running pickled code.

Writing: temporary file in the same folder, fsync, rename.

Lightning's own save goes through an fsspec transaction whose temporary file lives in the system temp
folder; when that is another filesystem than the run folder (``/tmp`` on a node, runs on a shared
disk) the final move is a copy, and a kill during the copy leaves a truncated checkpoint. Here the
temporary file sits next to the target, so the last step is an atomic ``os.replace``.
"""

from __future__ import annotations

import contextvars
import errno
import os
import pickle
import pickletools
import re
import shutil
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from heatssl.errors import CheckpointError, DiskFullError
from heatssl.runs.files import describe_file

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

    Any other file that is not a whole PyTorch checkpoint is a :class:`CheckpointError` that says
    what it is (missing, empty, cut short, damaged, text, safetensors, another zip) and what to do.
    Without ``mmap`` the CRC-32 of every record of a zip checkpoint is checked too (torch does not
    check them), so tensors damaged on disk are refused, not loaded wrong.
    """
    path = Path(path)
    fmt = _checkpoint_format(path)
    weights_only = True
    try:
        try:
            loaded = torch.load(
                str(path), map_location="cpu", weights_only=True, mmap=mmap and fmt == "zip"
            )
        except pickle.UnpicklingError as err:
            if not pickle_trusted() or _damage(path, fmt) is not None:
                raise
            # --trust-checkpoint: said before it is done, naming what the file needs
            print(
                f"heatssl: --trust-checkpoint: unpickling {path} ({_refused(err)}), which can "
                f"run code from the file.",
                file=sys.stderr,
                flush=True,
            )
            weights_only = False
            loaded = torch.load(str(path), map_location="cpu", weights_only=False)
    except pickle.UnpicklingError as err:
        damage = _damage(path, fmt)
        if damage is not None:  # bytes changed on disk, not a refused class
            raise CheckpointError(f"{path} is damaged: {damage}. {_COPY_AGAIN}") from err
        raise CheckpointError(
            f"{path} holds pickled Python objects beyond tensors and plain containers; loading them "
            f"would run code from the file, so heatssl refuses it ({_refused(err)}). If you trust "
            f"where the file comes from, pass --trust-checkpoint (in Python: `with "
            f"heatssl.trusted_checkpoints(): ...`)."
        ) from err
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, IndexError) as err:
        damage = _zip_damage(path) if fmt == "zip" else None
        memory = isinstance(err, RuntimeError) and re.search("memory|alloc", str(err), re.I)
        if damage is None and memory:
            raise  # out of memory, and the file's bytes are as written
        damage = damage or f"torch cannot read it ({_first(err)})"
        raise CheckpointError(f"{path} is damaged: {damage}. {_COPY_AGAIN}") from err
    if fmt == "zip" and not mmap and weights_only:
        damage = _zip_damage(path)
        if damage is not None:
            raise CheckpointError(f"{path} is damaged: {damage}. {_COPY_AGAIN}")
    return loaded


def _damage(path: Path, fmt: str) -> str | None:
    """Why the file's bytes are not those written, or None (then an unpickling error is a class
    the weights-only unpickler refused)."""
    return _zip_damage(path) if fmt == "zip" else _legacy_damage(path)


_GIVE_CHECKPOINT = "Give a checkpoint from `heatssl pretrain` (RUN/checkpoints/last.ckpt)."
_COPY_AGAIN = (
    "Copy it again from where it was written, or give another checkpoint of the run "
    "(RUN/checkpoints/last.ckpt or an epoch checkpoint)."
)
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER, a legacy file's start


def _checkpoint_format(path: Path) -> str:
    """``zip`` (torch.save) or ``legacy`` (torch.save before torch 1.6); anything else is refused.

    Checked before torch reads it, which would fail on such files with a bare ``KeyError``,
    ``EOFError`` or a zip reader's message.
    """
    if not path.exists():
        raise CheckpointError(f"{path} does not exist. {_GIVE_CHECKPOINT}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file. {_GIVE_CHECKPOINT}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(
            f"{path} is empty (0 bytes): a copy, download or write that never ran? {_COPY_AGAIN}"
        )
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":
        if not zipfile.is_zipfile(path):
            raise CheckpointError(
                f"{path} is truncated: it ends before its zip directory: {size} bytes; a copy or "
                f"download cut short? {_COPY_AGAIN}"
            )
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError) as err:
            raise CheckpointError(
                f"{path} is damaged: its zip directory cannot be read ({err}). {_COPY_AGAIN}"
            ) from err
        script = any(n.endswith("/constants.pkl") for n in names)  # TorchScript: not a checkpoint
        if not script and any(n.count("/") == 1 and n.endswith("/data.pkl") for n in names):
            return "zip"
    elif head.startswith(b"\x80") and _is_legacy(path):
        return "legacy"
    looks = describe_file(path)
    if "safetensors" in looks:
        if "cut short" in looks:
            use = f"copy it again. {_GIVE_CHECKPOINT}"
        elif "backbone export" in looks:
            use = (
                "`heatssl probe` and `heatssl heatmaps` read it under a .safetensors name; "
                "`heatssl export` and `heatssl reconstruct` need the pretraining checkpoint "
                "(RUN/checkpoints/last.ckpt)."
            )
        elif "probe head" in looks:
            use = f"give it to `heatssl heatmaps --head`. {_GIVE_CHECKPOINT}"
        else:
            use = _GIVE_CHECKPOINT
        raise CheckpointError(f"{path} is not a PyTorch checkpoint but {looks}: {use}")
    raise CheckpointError(f"{path} is not a PyTorch checkpoint: it is {looks}. {_GIVE_CHECKPOINT}")


def _is_legacy(path: Path) -> bool:
    """Whether the file's first pickle is torch's legacy magic number (read, never unpickled)."""
    try:
        with open(path, "rb") as f:
            return any(arg == _LEGACY_MAGIC for _, arg, _ in pickletools.genops(f))
    except Exception:  # not a pickle at all
        return False


def _legacy_damage(path: Path) -> str | None:
    """Why a legacy checkpoint is incomplete (its five pickles do not all end), or None."""
    try:
        with open(path, "rb") as f:
            for _ in range(5):  # magic number, protocol, system info, the object, storage keys
                for _op in pickletools.genops(f):
                    pass
    except Exception as err:  # any way a pickle can break
        return f"it ends or breaks inside its pickled data ({_first(err)}); a copy cut short?"
    return None


def _zip_damage(path: Path) -> str | None:
    """Why a zip checkpoint's bytes are not those written (a record failing its CRC-32), or None."""
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.CRC == 0 and info.file_size:  # saved without checksums
                    continue
                with z.open(info) as f:
                    while f.read(1 << 24):
                        pass
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return f"{_first(err)} (its bytes changed after it was written: a disk or copy error)"
    return None


def _first(err: BaseException) -> str:
    """The first sentence of an error, without terminal escapes, for a one-line message."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
    text = text.splitlines()[0] if text else ""
    text = text.split(". ")[0].rstrip(".")[:200]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _refused(err: pickle.UnpicklingError) -> str:
    """What the weights-only unpickler refused, e.g. "it needs posix.system" (torch names the
    global as ``GLOBAL posix.system``, in wordings that change between versions)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    if found:
        return f"it needs {found[1]}"
    found = re.search(r"WeightsUnpickler error: (.+)", str(err))
    return found[1].strip().rstrip(".") if found else _first(err)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` so that ``path`` is always either the old or the new file.

    A full disk stops with :class:`~heatssl.errors.DiskFullError` naming the folder, the space the
    file needs and what is free; ``path`` then still holds the previous file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch's zip writer: a failed write is a RuntimeError
        tmp.unlink(missing_ok=True)
        _raise_if_disk_full(obj, path, err)
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path


class _ByteCounter:
    """A write-only sink that counts what ``torch.save`` would write."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def _raise_if_disk_full(obj: Any, path: Path, err: BaseException) -> None:
    """Turn a failed write on a full file system into one clear :class:`DiskFullError`."""
    full = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
    free = shutil.disk_usage(path.parent).free
    counter = _ByteCounter()
    torch.save(obj, counter)  # the exact size, without the disk
    if not full and free >= counter.size:
        return  # another failure: the caller re-raises it as it is
    mb = 1024 * 1024
    previous = (
        f"{path.name} is unchanged (the previous checkpoint)"
        if path.exists()
        else f"no {path.name} was written"
    )
    raise DiskFullError(
        f"no space left in {path.parent} while writing {path.name}: it needs "
        f"{counter.size / mb:.1f} MB and {free / mb:.1f} MB are free; {previous}. Free at least "
        f"{max(1.0, (counter.size - free) / mb + 1):.0f} MB there (or keep fewer epoch checkpoints: "
        f"trainer.keep_checkpoints), then continue with `--resume`."
    ) from err
