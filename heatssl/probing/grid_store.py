"""Feature grids on disk: written batch by batch, read back by rows, never held in memory whole.

The tran-1 probe needs every image's (d, h, w) grid; for ImageNet with a ResNet-50 that is about a
terabyte in float16. :class:`GridStore` appends the grids to one file of float16 rows and reads the
rows a batch asks for with ``os.pread``, so the process holds one batch at a time and the operating
system's page cache, not the process, keeps what fits.

Writing never makes the extraction loop wait for the disk or for the device: :meth:`GridStore.append`
starts the copy of a batch to the host (into pinned memory without a host sync when the grids are on
a GPU) and a writer thread waits for that copy and writes it to the file while the next batch runs
through the backbone. At most :data:`QUEUED_BATCHES` batches wait for the writer.
"""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from heatssl.errors import ArgumentError

_DTYPE = np.float16
QUEUED_BATCHES = 4
"""Batches copied (or being copied) to the host and waiting for the writer thread, at most."""


class GridStore:
    """An (N, d, h, w) float16 array in ``path``: :meth:`append` batches, then index it like a tensor.

    Indexing takes an int, a slice or a 1-D index tensor and returns a float16 CPU tensor (rows in
    the order asked). Call :meth:`close` before reading and :meth:`delete` when done.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write = open(self.path, "wb")  # noqa: SIM115 (kept open across appends)
        self._read: int | None = None
        self.row_shape: tuple[int, ...] | None = None
        self.rows = 0
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUED_BATCHES)
        self._failed: BaseException | None = None
        self._writer = threading.Thread(target=self._drain, name="heatssl-grid-writer", daemon=True)
        self._writer.start()

    @property
    def row_bytes(self) -> int:
        """Bytes of one grid."""
        return int(np.prod(self.row_shape)) * np.dtype(_DTYPE).itemsize

    @property
    def shape(self) -> tuple[int, ...]:
        """(N, d, h, w)."""
        return (self.rows, *(self.row_shape or ()))

    def __len__(self) -> int:
        return self.rows

    def append(self, grids: Tensor) -> None:
        """Queue a batch of grids (n, d, h, w) for writing at the end, as float16.

        The copy to the host is started here and finished by the writer thread: a batch on a GPU is
        copied into pinned memory asynchronously, so this call does not wait for the device.
        """
        if self._write is None:
            raise ArgumentError(f"{self.path}: the store is closed; append before close().")
        self._raise_failed()
        if self.row_shape is None:
            self.row_shape = tuple(grids.shape[1:])
        elif tuple(grids.shape[1:]) != self.row_shape:
            raise ArgumentError(
                f"grids of shape {tuple(grids.shape[1:])} cannot join a store of {self.row_shape}."
            )
        grids = grids.detach()
        event = None
        if grids.device.type == "cuda":
            host = torch.empty(grids.shape, dtype=torch.float16, pin_memory=True)
            host.copy_(grids, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = grids.to(torch.float16).contiguous()
        self._queue.put((host, event))  # waits only when QUEUED_BATCHES are already queued
        self.rows += grids.shape[0]

    def _drain(self) -> None:
        """The writer thread: wait for each batch's copy to the host, then write its bytes."""
        while True:
            item = self._queue.get()
            if item is None:
                return
            host, event = item
            if self._failed is not None:
                continue  # keep taking batches so that append never blocks on a dead writer
            try:
                if event is not None:
                    event.synchronize()  # this thread waits, not the extraction loop
                self._write.write(host.numpy().tobytes())
            except BaseException as err:  # e.g. a full disk: raised in the caller's thread
                self._failed = err

    def _raise_failed(self) -> None:
        if self._failed is not None:
            raise OSError(f"{self.path}: writing the feature grids failed: {self._failed}") from (
                self._failed
            )

    def _stop_writer(self) -> None:
        if self._writer.is_alive():
            self._queue.put(None)
            self._writer.join()

    def close(self) -> GridStore:
        """Finish writing (every queued batch is on disk); the store can be read from now on."""
        if self._write is not None:
            self._stop_writer()
            self._write.close()
            self._write = None
            self._raise_failed()
            self._read = os.open(self.path, os.O_RDONLY)
        return self

    def _rows(self, index: int | slice | Tensor) -> np.ndarray:
        if isinstance(index, slice):
            return np.arange(self.rows)[index]
        rows = np.asarray(torch.as_tensor(index).reshape(-1).numpy(), dtype=np.int64)
        if rows.size and (rows.min() < -self.rows or rows.max() >= self.rows):
            raise IndexError(f"row index out of range for a store of {self.rows} rows")
        return rows % max(self.rows, 1)

    def _pread(self, size: int, offset: int) -> bytes:
        """Exactly ``size`` bytes at ``offset`` (one read returns at most about 2 GiB)."""
        parts, done = [], 0
        while done < size:
            data = os.pread(self._read, size - done, offset + done)
            if not data:
                raise OSError(
                    f"{self.path} ends before byte {offset + size}: the file is truncated"
                )
            parts.append(data)
            done += len(data)
        return b"".join(parts)

    def __getitem__(self, index: int | slice | Tensor) -> Tensor:
        if self._read is None:
            raise ArgumentError(f"{self.path}: close() the store before reading it.")
        rows = self._rows(index)
        order = np.argsort(rows, kind="stable")  # read in file order, hand back in the asked order
        out = np.empty((len(rows), *self.row_shape), dtype=_DTYPE)
        flat = out.reshape(len(rows), -1).view(np.uint8)
        start = 0
        while start < len(order):  # one read per run of consecutive rows
            stop = start + 1
            while stop < len(order) and rows[order[stop]] == rows[order[stop - 1]] + 1:
                stop += 1
            first, count = rows[order[start]], stop - start
            data = self._pread(count * self.row_bytes, int(first) * self.row_bytes)
            chunk = np.frombuffer(data, dtype=np.uint8).reshape(count, self.row_bytes)
            flat[order[start:stop]] = chunk
            start = stop
        result = torch.from_numpy(out)
        return result[0] if isinstance(index, int) else result

    def delete(self) -> None:
        """Close the store and remove its file."""
        if self._write is not None:
            self._stop_writer()
            self._write.close()
            self._write = None
        if self._read is not None:
            os.close(self._read)
            self._read = None
        self.path.unlink(missing_ok=True)
