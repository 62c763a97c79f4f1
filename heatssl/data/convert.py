"""``heatssl convert``: an image folder (or a Hugging Face dataset) as WebDataset tar shards, once.

At ImageNet's scale a shared file system serves a few thousand large sequential files far better than
1.28M small ones every node must list and open. The images keep their encoded bytes (no decode, no
re-encode), each as ``<key>.<ext>`` with its label as ``<key>.cls``, in the split's order, ``N`` to a
shard (``train/shard-000000.tar``, ...); ``index.json`` beside each split's shards lists them with
their record counts and the class names, so a run never scans them. Each shard is written under a
temporary name and renamed, so a stopped conversion leaves only whole shards.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from heatssl.config import DataConfig
from heatssl.data.datamodule import build_datamodule
from heatssl.data.datasets import ImageFiles
from heatssl.data.wds import write_shard_index
from heatssl.errors import ConfigError
from heatssl.writing import UnsafePathError

EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "PPM": "ppm"}
"""File formats a shard keeps as they are (others are written as PNG)."""


def _encoded(dataset: ImageFiles, index: int) -> tuple[bytes, str]:
    """A sample's stored bytes and their extension (an odd format re-encoded as PNG)."""
    source = dataset.source(index)
    if isinstance(source, io.BytesIO):
        data = source.getvalue()
    else:
        with open(source, "rb") as f:
            data = f.read()
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = image.format or ""
            if kind in EXTENSIONS:
                return data, EXTENSIONS[kind]
            out = io.BytesIO()
            image.save(out, format="PNG")
            return out.getvalue(), "png"
    except Exception:  # unreadable: kept, and named when a run meets it (as in a folder)
        return data, "jpg"


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_split(
    dataset: ImageFiles, folder: Path, classes: list[str], per_shard: int, progress: bool
) -> list[tuple[str, int]]:
    """Write ``dataset``'s samples as shards of ``per_shard`` into ``folder``; their names and counts."""
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[tuple[str, int]] = []
    bar = tqdm(
        total=len(dataset), desc=f"convert {folder.name}", unit="image", disable=not progress
    )
    for start in range(0, len(dataset), per_shard):
        name = f"shard-{start // per_shard:06d}.tar"
        tmp = folder / f".{name}.{os.getpid()}.tmp"
        stop = min(start + per_shard, len(dataset))
        try:
            with tarfile.open(tmp, "w") as tar:
                for index in range(start, stop):
                    data, ext = _encoded(dataset, index)
                    key = f"{index:09d}"
                    _member(tar, f"{key}.{ext}", data)
                    _member(tar, f"{key}.cls", str(dataset.samples[index][1]).encode())
                    bar.update()
            os.replace(tmp, folder / name)
        finally:
            tmp.unlink(missing_ok=True)
        shards.append((name, stop - start))
    bar.close()
    write_shard_index(folder, shards, classes)
    return shards


def convert(
    cfg: DataConfig, out: str | Path, per_shard: int = 1000, progress: bool = True
) -> dict[str, list[tuple[str, int]]]:
    """Write ``cfg``'s train and val splits as shards into ``out/train`` and ``out/val``."""
    if cfg.name not in ("imagefolder", "hf") or cfg.streaming:
        raise ConfigError(
            f"heatssl convert reads an image folder or a Hugging Face dataset (data.name="
            f"imagefolder or hf, without streaming); data.name={cfg.name} is neither."
        )
    if per_shard < 1:
        raise ConfigError(f"--per-shard {per_shard}: a shard holds at least one image.")
    out = Path(out)
    taken = [p for p in (out / "train", out / "val") if p.exists() and any(p.iterdir())]
    if taken:
        raise UnsafePathError(
            f"{taken[0]} is not empty: heatssl convert writes new shards only. Give a new "
            f"output folder (or remove that one)."
        )
    data = build_datamodule(cfg)
    written: dict[str, Any] = {}
    for split, dataset in (("train", data.train_dataset), ("val", data.val_dataset)):
        if len(dataset):
            written[split] = write_split(
                dataset, out / split, data.class_names, per_shard, progress
            )
            if progress:
                total = sum(n for _, n in written[split])
                print(
                    f"heatssl: {split}: {total} images in {len(written[split])} shards in {out / split}"
                )
    if progress:
        print(f"heatssl: train from them with data.name=webdataset data.root={out}")
    return written
