"""Loader benchmarks: ImageNet-like JPEGs, the backends heatssl offers, a loader's images/s.

- :func:`generate_images`: an ImageFolder of JPEGs with the sizes, pixel counts and bytes of
  photographs. A loader's speed depends on the bytes it reads and the pixels it decodes, not on
  what they show: ImageNet's training images are mostly about 500 x 375 px and 110 kB, and flat,
  upscaled or thumbnail images decode several times faster and would flatter any loader. These are
  textured (gradients plus noise blurred at three scales).
- :func:`backends`: every ``data.backend`` of the installed heatssl, and which cannot run here.
- :func:`loader_figures`: the training loader the Trainer builds for one process, timed alone.
"""

from __future__ import annotations

import copy
import importlib
import os
import shutil
import statistics
import time
import typing
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader

from heatssl.config import DataConfig
from heatssl.data.datamodule import build_datamodule

Size = tuple[tuple[int, int], tuple[int, int]]
FULL_SIZE: Size = ((400, 500), (300, 400))
"""Width and height ranges of the generated JPEGs: ImageNet's common 500 x 375 and smaller."""
TINY_SIZE: Size = ((48, 64), (40, 56))
"""The same for ``--cpu`` runs: a check that the code runs, not a measurement."""
QUALITY = 90


def write_jpeg(path: Path, seed: int, size: Size = FULL_SIZE) -> tuple[int, int, int]:
    """One textured JPEG at ``path``; returns ``(width, height, bytes)``.

    The fine noise (blur radius 0.8) is what makes the file as large as a photograph's (about
    100 kB at 0.16 megapixels and quality 90); the coarser layers give it regions and edges.
    """
    rng = np.random.default_rng(seed)
    width, height = (int(rng.integers(lo, hi + 1)) for lo, hi in size)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    gx, gy = rng.uniform(-120, 120, (2, 3))
    image = 128 + gx * (x / width - 0.5)[..., None] + gy * (y / height - 0.5)[..., None]
    for radius, amplitude in ((0.8, rng.uniform(22, 38)), (3, 30), (12, 60)):
        noise = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        layer = np.asarray(noise.filter(ImageFilter.GaussianBlur(radius)), np.float32) - 127.5
        image += layer * (amplitude / max(float(layer.std()), 1e-3))
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=QUALITY)
    return width, height, path.stat().st_size


def _write(job: tuple[Path, int, Size]) -> tuple[int, int, int]:
    return write_jpeg(*job)


def generate_images(
    root: Path, count: int, full: bool = True, classes: int = 8, copies: int = 1
) -> dict[str, Any]:
    """``count`` JPEGs in ``root/train/<class>/`` (in parallel on every core when there are many),
    each listed ``copies`` times (hard links: the loader decodes every entry, the disk holds one);
    returns their count, sizes in kB, mean megapixels and the seconds it took.

    Copies make an epoch long enough for many loader workers to reach their steady pace: at an
    epoch's end a loader drains and refills its prefetch queue.
    """
    size = FULL_SIZE if full else TINY_SIZE
    jobs = []
    for i in range(count):
        folder = root / "train" / f"class_{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((folder / f"{i:06d}.jpg", i, size))
    start = time.perf_counter()
    if count >= 64:
        with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
            done = list(pool.map(_write, jobs, chunksize=32))
    else:
        done = [_write(job) for job in jobs]
    for (path, _, _), n in ((job, c) for job in jobs for c in range(1, copies)):
        link = path.with_name(f"{path.stem}_{n}.jpg")
        try:
            os.link(path, link)
        except OSError:  # a file system without hard links
            shutil.copyfile(path, link)
    kb = [d[2] / 1000 for d in done]
    return {
        "root": str(root),
        "images": count,
        "files": count * max(1, copies),
        "classes": min(classes, count),
        "quality": QUALITY,
        "mean_kb": statistics.fmean(kb),
        "min_kb": min(kb),
        "max_kb": max(kb),
        "mean_megapixels": statistics.fmean(d[0] * d[1] / 1e6 for d in done),
        "mean_width": statistics.fmean(d[0] for d in done),
        "mean_height": statistics.fmean(d[1] for d in done),
        "seconds": time.perf_counter() - start,
    }


def backends() -> dict[str, str | None]:
    """Every ``data.backend`` heatssl offers, each with why it is not measured (None: measured)."""
    choices = typing.get_args(typing.get_type_hints(DataConfig)["backend"])
    out: dict[str, str | None] = dict.fromkeys(choices)
    if "dali" in out:
        try:
            importlib.import_module("nvidia.dali")
        except Exception as err:  # not installed, or its CUDA libraries missing
            out["dali"] = f"nvidia.dali does not import ({type(err).__name__}: {err})"
    return out


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _epochs(loader: Any) -> Iterator[Any]:
    while True:
        yield from loader


def loader_rate(
    loader: Any,
    seconds: float,
    warmup: int,
    device: torch.device,
    decode: Callable[[Any, torch.device], Any] | None = None,
) -> dict[str, Any]:
    """Images/s of ``loader`` alone: ``warmup`` batches (workers starting, the first prefetched
    round) untimed, then batches until ``seconds`` have passed (at least three), across epochs;
    ``decode`` finishes each batch on ``device`` as training would (``data.backend=torchvision``)."""
    batches = _epochs(loader)
    if decode is not None:
        batches = (decode(batch, device) for batch in batches)
    start = time.perf_counter()
    for _ in range(warmup):
        next(batches)
    _synchronize(device)  # DALI's images are made on the GPU
    first = time.perf_counter()
    images = timed = 0
    while timed < 3 or time.perf_counter() - first < seconds:
        images += next(batches)[0].shape[0]
        timed += 1
    _synchronize(device)
    elapsed = time.perf_counter() - first
    batches.close()
    return {
        "images_per_second": images / elapsed,
        "timed_batches": timed,
        "warmup_batches": warmup,
        "seconds": elapsed,
        "first_batches_seconds": first - start,
    }


def loader_figures(
    data: DataConfig, backend: str, processes: int, seconds: float, seed: int = 0
) -> dict[str, Any]:
    """Images/s of the training loader the Trainer builds for one of ``processes`` processes per
    node (``data.num_workers=auto``: its share of the cores), over ``seconds`` after warm-up."""
    data = copy.deepcopy(data)
    data.backend, data.num_workers = backend, "auto"
    datamodule = build_datamodule(data, seed=seed)
    datamodule.local_processes = processes
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    workers = datamodule.num_workers
    warmup = 3  # and for worker processes, every batch they prefetch before the first is used
    if isinstance(loader, DataLoader):
        warmup = (loader.prefetch_factor or 1) * loader.num_workers + 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    figures = loader_rate(loader, seconds, warmup, device, datamodule.decode)
    del loader  # its worker processes end with it
    return {"workers": workers, **figures}
