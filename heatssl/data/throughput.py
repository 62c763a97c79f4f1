"""Images per second of an input pipeline alone: is the loader fast enough for the step?"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from heatssl.errors import ArgumentError


def loader_throughput(
    loader: DataLoader,
    batches: int = 50,
    warmup: int = 5,
    progress: bool = True,
    decode: Callable[[Any], Any] | None = None,
) -> dict[str, float]:
    """Images per second of the input pipeline alone (decode, augment, collate; no model).

    ``decode`` finishes each batch in this process where the training process would
    (``data.backend=torchvision``: :meth:`~heatssl.data.datamodule.HeatDataModule.decode`).

    ``warmup`` batches (worker start-up, first reads) are not timed. Compare the result with the
    training step's images/s: the pipeline must be faster, or the accelerator waits on it.
    """
    if batches <= 0 or warmup < 0:
        raise ArgumentError(f"batches={batches} must be > 0 and warmup={warmup} >= 0.")
    images, timed, start = 0, 0, time.perf_counter()
    total = min(len(loader), warmup + batches) if hasattr(loader, "__len__") else warmup + batches
    bar = tqdm(total=total, desc="loader", disable=not progress, leave=False)
    for i, batch in enumerate(loader):
        bar.update()
        if decode is not None:
            batch = decode(batch)
        if i == warmup:
            start = time.perf_counter()
        if i >= warmup:
            images += batch[0].shape[0]
            timed += 1
        if timed >= batches:
            break
    bar.close()
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # work a decode queued on the GPU counts
    seconds = time.perf_counter() - start
    if timed == 0:
        raise ArgumentError(
            f"warmup={warmup}: the loader gave {warmup} batches or fewer, all used for warm-up, "
            f"so none was timed. Use a larger dataset or fewer warm-up batches."
        )
    return {
        "images_per_second": images / seconds,
        "batches": timed,
        "images": images,
        "seconds": seconds,
        "num_workers": loader.num_workers,
        "batch_size": loader.batch_size or 0,
    }
