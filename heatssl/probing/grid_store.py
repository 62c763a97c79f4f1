"""Feature grids on disk: written batch by batch, read back by rows, never held in memory whole.

The tran-1 probe needs every image's (d, h, w) grid; for ImageNet with a ResNet-50 that is about a
terabyte in float16. :class:`GridStore` appends the grids to one file of float16 rows and reads the
rows a batch asks for with ``os.pread``, so the process holds one batch at a time and the operating
system's page cache, not the process, keeps what fits.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from heatssl.errors import ArgumentError

_DTYPE = np.float16


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
        """Write a batch of grids (n, d, h, w) at the end, as float16."""
        if self._write is None:
            raise ArgumentError(f"{self.path}: the store is closed; append before close().")
        if self.row_shape is None:
            self.row_shape = tuple(grids.shape[1:])
        elif tuple(grids.shape[1:]) != self.row_shape:
            raise ArgumentError(
                f"grids of shape {tuple(grids.shape[1:])} cannot join a store of {self.row_shape}."
            )
        data = grids.detach().to("cpu", torch.float16).contiguous().numpy()
        self._write.write(data.tobytes())
        self.rows += grids.shape[0]

    def close(self) -> GridStore:
        """Finish writing; the store can be read from now on."""
        if self._write is not None:
            self._write.close()
            self._write = None
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
            self._write.close()
            self._write = None
        if self._read is not None:
            os.close(self._read)
            self._read = None
        self.path.unlink(missing_ok=True)
