"""WebDataset tar shards as a source (``data.name=webdataset``), read in order as a shard stream.

``data.root`` names the training shards: a folder of ``*.tar`` files (with ``train/`` and ``val/``
sub-folders, as ``heatssl convert`` writes them, or the shards themselves), a brace pattern
(``/data/in1k/train-{000000..001023}.tar``) or a text file listing one shard per line;
``data.val_root`` the validation shards (default: the ``val/`` beside ``train/``, else
``data.val_fraction`` of the training shards). A sample is the members sharing a key: an image
(``.jpg``, ``.jpeg``, ``.png``, ``.webp``) and its label (``.cls``: an integer; or ``.json`` with
``label`` or ``cls``). Record counts and class names come from the ``index.json`` beside the shards
(``heatssl convert`` writes it), else from one scan of the shards' headers, cached in the run folder
like an image folder's file list. Reading goes through the ``webdataset`` package's tar iterator
(``pip install -e ".[webdataset]"``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from heatssl.config import DataConfig
from heatssl.data.file_index import shared_index
from heatssl.data.shards import Record, Shard, ShardStream
from heatssl.errors import ConfigError

INSTALL_HINT = 'data.name=webdataset needs the webdataset package: pip install -e ".[webdataset]"'
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm")
LABEL_KEYS = ("cls", "json")
MAX_MEMBER_BYTES = (
    64 * 2**20
)  # a larger image or label member is refused unread (ImageNet's: < 16 MB)
INDEX_FILE = "index.json"


def require_webdataset() -> None:
    """Raise :class:`ConfigError` with the install command when webdataset is missing."""
    if importlib.util.find_spec("webdataset") is None:
        raise ConfigError(INSTALL_HINT + ".")


def shard_paths(spec: str) -> list[str]:
    """The shards ``spec`` names: a folder's ``*.tar``, a brace pattern, or a list file."""
    path = Path(spec)
    if path.is_dir():
        found = sorted(str(p) for p in path.glob("*.tar"))
    elif path.is_file() and path.suffix != ".tar":
        base = path.parent
        lines = path.read_text(encoding="utf-8").splitlines()
        found = [str(base / s.strip()) for s in lines if s.strip() and not s.startswith("#")]
    else:
        from braceexpand import braceexpand  # webdataset's own dependency

        found = list(braceexpand(spec))
    missing = [p for p in found if not Path(p).is_file()]
    if not found or missing:
        raise ConfigError(
            f"No tar shards at {spec!r}"
            + (f" ({missing[0]} is missing)" if missing else "")
            + ": give data.root a folder of .tar shards, a brace pattern such as "
            "train-{000000..000099}.tar, or a text file listing one shard per line "
            "(heatssl convert writes shards from an image folder)."
        )
    return found


def _key_and_ext(name: str) -> tuple[str, str]:
    base = os.path.basename(name)
    key, _, ext = base.partition(".")
    return os.path.join(os.path.dirname(name), key), ext.lower()


def read_tar(shard: Shard) -> Iterator[Record]:
    """The records of one tar shard, in order (members grouped by key).

    Only image and label members are read, each at most :data:`MAX_MEMBER_BYTES` (judged from its
    tar header, before reading): a larger one is named as unreadable instead of filling memory.
    """
    with tarfile.open(shard.path, mode="r|") as tar:  # a stream: members in order, no seeking
        current: dict[str, Any] = {}
        for member in tar:
            if not member.isreg():
                continue
            key, ext = _key_and_ext(member.name)
            if current and current["__key__"] != key:
                yield _record(shard, current)
                current = {}
            current["__key__"] = key
            if ext not in IMAGE_KEYS and ext not in LABEL_KEYS:
                continue  # other members are not read at all
            if member.size > MAX_MEMBER_BYTES:
                current["__too_large__"] = f"{member.name}: {member.size:,} bytes"
                continue
            data = tar.extractfile(member)
            current[ext] = data.read() if data else b""
        if current:
            yield _record(shard, current)


def _record(shard: Shard, sample: dict[str, Any]) -> Record:
    name = f"{shard.path}:{sample['__key__']}"
    if "__too_large__" in sample:
        return Record(
            name,
            None,
            -1,
            f"{name}: member {sample['__too_large__']}, over the limit "
            f"of {MAX_MEMBER_BYTES:,} bytes for one member",
        )
    data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    label, error = (
        -1,
        None if data is not None else f"{name}: no image member ({', '.join(IMAGE_KEYS)})",
    )
    try:
        if "cls" in sample:
            label = int(sample["cls"].decode().strip())
        elif "json" in sample:
            meta = json.loads(sample["json"])
            label = int(meta.get("label", meta.get("cls", -1)))
    except (ValueError, TypeError, AttributeError, UnicodeDecodeError) as err:
        data, error = None, f"{name}: its label cannot be read ({err})"
    return Record(name, data, label, error)


def _count(path: str) -> tuple[int, list[int]]:
    """Records of one shard and their labels, from the tar headers and label members only."""
    keys: list[str] = []
    labels: dict[str, int] = {}
    with tarfile.open(path, mode="r") as tar:
        for member in tar:
            if not member.isreg():
                continue
            key, ext = _key_and_ext(member.name)
            if not keys or keys[-1] != key:
                keys.append(key)
            if ext == "cls" and member.size <= 64:  # an integer; anything longer is no label
                data = tar.extractfile(member)
                try:
                    labels[key] = int(data.read().decode().strip()) if data else -1
                except ValueError:
                    labels[key] = -1
    return len(keys), [labels.get(k, -1) for k in keys]


def split_shards(spec: str, index_dir: str | Path | None, rank: int, split: str) -> tuple:
    """(shards with counts, class names) of a split: from its index.json, else one scan (shared by
    the run's processes and later starts through ``index_dir``)."""
    paths = shard_paths(spec)
    folder = Path(paths[0]).parent
    index = folder / INDEX_FILE
    if index.is_file():
        data = json.loads(index.read_text(encoding="utf-8"))
        counts = {str(folder / s["name"]): int(s["samples"]) for s in data.get("shards", [])}
        if all(p in counts for p in paths):
            return [Shard(p, counts[p]) for p in paths], list(data.get("classes") or [])

    stamp = {p: [os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in paths}

    def scan() -> dict[str, Any]:
        found = {p: _count(p) for p in paths}
        labels = sorted({x for _, ls in found.values() for x in ls if x >= 0})
        return {"stamp": stamp, "counts": {p: c for p, (c, _) in found.items()}, "labels": labels}

    cache = Path(index_dir) / "file_index" / f"shards_{split}.json.gz" if index_dir else None
    data = shared_index(cache, rank, scan, lambda d: d["stamp"] == stamp)
    names = [str(x) for x in range(max(data["labels"], default=-1) + 1)]
    return [Shard(p, int(data["counts"][p])) for p in paths], names


def wds_splits(
    cfg: DataConfig, seed: int, train_tf: Any, val_tf: Any, index_dir: Any = None, rank: int = 0
) -> tuple[ShardStream, ShardStream, list[str]]:
    """Train and val shard streams of ``data.root`` / ``data.val_root``, and the class names."""
    require_webdataset()
    root = Path(cfg.root or "")
    train_spec = str(root / "train") if (root / "train").is_dir() else str(cfg.root)
    val_spec = cfg.val_root or (str(root / "val") if (root / "val").is_dir() else None)
    train, classes = split_shards(train_spec, index_dir, rank, "train")
    if val_spec is not None:
        val, val_classes = split_shards(val_spec, index_dir, rank, "val")
        classes = classes or val_classes
    else:  # whole shards held out, by a seeded draw tied to the data (data.split_seed)
        order = sorted(train, key=lambda s: s.path)
        random.Random(cfg.split_seed).shuffle(order)
        held = max(1, round(len(order) * cfg.val_fraction)) if cfg.val_fraction > 0 else 0
        if held >= len(order):
            raise ConfigError(
                f"{len(order)} training shard(s) and no val shards: holding out "
                f"data.val_fraction={cfg.val_fraction} of them leaves none to train on. Set "
                f"data.val_root to validation shards, or write more shards."
            )
        val, train = (
            sorted(order[:held], key=lambda s: s.path),
            sorted(order[held:], key=lambda s: s.path),
        )
    common = {"seed": seed, "on_bad": cfg.on_bad_image, "max_pixels": cfg.max_image_pixels}
    return (
        ShardStream(
            train,
            read_tar,
            train_tf,
            cfg.batch_size,
            True,
            shuffle_buffer=cfg.shuffle_buffer,
            **common,
        ),
        ShardStream(val, read_tar, val_tf, cfg.batch_size, False, **common),
        classes,
    )


def write_shard_index(folder: Path, shards: list[tuple[str, int]], classes: list[str]) -> Path:
    """The ``index.json`` beside a split's shards: file names, record counts, class names."""
    path = folder / INDEX_FILE
    data = {
        "format": "heatssl-shards-v1",
        "classes": classes,
        "samples": sum(n for _, n in shards),
        "shards": [{"name": name, "samples": n} for name, n in shards],
    }
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return path
