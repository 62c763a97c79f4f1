"""Hugging Face datasets as a source (``data.name=hf``): Parquet / Arrow files, decoded as image files are.

``data.root`` is a folder of Parquet or Arrow files (split by file name, as the Hub lays them out:
``train-*.parquet``, ``validation-*.parquet``), a folder written by ``Dataset.save_to_disk``, or a
Hub dataset id already in the local cache: heatssl never downloads (it sets ``HF_HUB_OFFLINE``).
``data.split`` names the training split and ``data.val_split`` the validation one (default: the first
of validation, val, valid, test; else ``data.val_fraction`` of the training rows); the image column
is ``data.image_column`` or the first ``Image`` feature (or a column named image, img, jpg, png), the
label column ``data.label_column`` or the first ``ClassLabel`` (or label, labels, cls, target).

Rows are decoded by PIL from their stored bytes, exactly as files are (same modes, same crops, the
same bad-image policy, a broken row named by its split and number). The map-style form keeps random
access, so the epoch order, DDP shares and mid-epoch resume are the image-folder path's. With
``data.streaming=true`` the split's Parquet files are read in order as a shard stream
(:mod:`heatssl.data.shards`): for data larger than the local disk's page cache, or on a shared file
system. ``pip install -e ".[hf]"`` installs the ``datasets`` package.
"""

from __future__ import annotations

import importlib.util
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from heatssl.config import DataConfig
from heatssl.data.datasets import ImageFiles, Splits, check_readable, stratified_split
from heatssl.data.shards import Record, Shard, ShardStream
from heatssl.errors import ConfigError, UnreadableImageError

INSTALL_HINT = 'data.name=hf needs the datasets package: pip install -e ".[hf]"'
VAL_SPLITS = ("validation", "val", "valid", "test")
IMAGE_NAMES = ("image", "img", "jpg", "png", "webp")
LABEL_NAMES = ("label", "labels", "cls", "target")


def require_datasets() -> None:
    """Raise :class:`ConfigError` with the install command when ``datasets`` is missing."""
    if importlib.util.find_spec("datasets") is None:
        raise ConfigError(INSTALL_HINT + ".")


def _datasets() -> Any:
    """The ``datasets`` package, offline: a Hub id is read from the local cache, never fetched."""
    require_datasets()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    return datasets


def _open_fail(root: str, err: Exception) -> ConfigError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    return ConfigError(
        f"data.root={root!r}: the datasets package cannot open it ({first}). Give a folder of "
        f"Parquet or Arrow files, a folder written by save_to_disk, or a Hub dataset id already in "
        f"the local cache (heatssl never downloads: run datasets.load_dataset(id) once where there "
        f"is a network)."
    )


def open_splits(root: str) -> dict[str, Any]:
    """Every split of the dataset at ``root`` (map-style, memory-mapped Arrow tables)."""
    datasets = _datasets()
    path = Path(root)
    try:
        if path.is_dir() and (
            (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
        ):
            loaded = datasets.load_from_disk(root)
            return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        return dict(datasets.load_dataset(root))
    except Exception as err:  # the datasets package's many error types: one line for each
        raise _open_fail(root, err) from err


def columns(features: Any, cfg: DataConfig, where: str) -> tuple[str, str | None, list[str]]:
    """The image column, the label column (None: unlabelled) and the class names."""
    datasets = _datasets()
    names = list(features)
    if cfg.image_column is not None:
        image = cfg.image_column
    else:
        image = next((n for n in names if isinstance(features[n], datasets.Image)), None)
        image = image or next((n for n in IMAGE_NAMES if n in names), None)
    if image is None or image not in names:
        raise ConfigError(
            f"{where}: no image column {f'{image!r} ' if image else ''}among its columns "
            f"{names}. Set data.image_column to the one holding the images."
        )
    if cfg.label_column is not None and cfg.label_column not in names:
        raise ConfigError(
            f"{where}: no label column {cfg.label_column!r} among its columns {names}. Set "
            f"data.label_column to one of them, or to null (unlabelled: pretraining only)."
        )
    label = cfg.label_column or next(
        (n for n in names if isinstance(features[n], datasets.ClassLabel)), None
    )
    label = label or next((n for n in LABEL_NAMES if n in names), None)
    classes = list(features[label].names) if label and hasattr(features[label], "names") else []
    return image, label, classes


class HFImages(ImageFiles):
    """Rows of a Hugging Face dataset read like image files (see :class:`ImageFiles`)."""

    def __init__(
        self,
        table: Any,
        image_column: str,
        labels: list[int],
        name: str,
        transform: Any,
        on_bad: str,
        fill: bool,
        max_pixels: int | None,
    ) -> None:
        samples = [(f"{name} row {r}", int(label)) for r, label in enumerate(labels)]
        super().__init__(samples, transform, on_bad, fill, max_pixels)
        datasets = _datasets()
        images = table.select_columns([image_column])
        self.table = images.cast_column(image_column, datasets.Image(decode=False))
        self.column = image_column
        self.rows = list(range(len(labels)))

    def source(self, index: int) -> Any:
        """The row's stored image bytes (or the file it names)."""
        cell = self.table[self.rows[index]][self.column]
        if isinstance(cell, dict) and cell.get("bytes"):
            return io.BytesIO(cell["bytes"])
        if isinstance(cell, dict) and cell.get("path"):
            return cell["path"]
        raise UnreadableImageError(f"{self.samples[index][0]}: the row holds no image")

    def select(self, indices: list[int]) -> HFImages:
        """A copy holding the rows ``indices`` only."""
        part = super().select(indices)
        part.rows = [self.rows[i] for i in indices]
        return part


def _labels(table: Any, column: str | None, classes: list[str]) -> tuple[list[int], list[str]]:
    """Integer labels (-1 without a label column) and the class names they index."""
    if column is None:
        return [-1] * len(table), classes
    values = table[column]
    if values and not isinstance(values[0], int | np.integer):  # names: sorted, then indexed
        classes = sorted({str(v) for v in values})
        lookup = {c: i for i, c in enumerate(classes)}
        return [lookup[str(v)] for v in values], classes
    ints = [int(v) for v in values]
    return ints, classes or [str(i) for i in range(max(ints, default=-1) + 1)]


def hf_splits(cfg: DataConfig, seed: int, train_tf: Any, val_tf: Any, **_: Any) -> Splits:
    """Train and val of ``data.root`` (map-style rows, or shard streams with ``data.streaming``)."""
    if cfg.streaming:
        return _stream_splits(cfg, seed, train_tf, val_tf)
    found = open_splits(str(cfg.root))
    if cfg.split not in found:
        raise ConfigError(
            f"data.split={cfg.split!r} is not a split of {cfg.root} (it has {sorted(found)}). "
            f"Set data.split to the training split."
        )
    train_table = found[cfg.split]
    where = f"{cfg.root} [{cfg.split}]"
    image, label, classes = columns(train_table.features, cfg, where)
    labels, classes = _labels(train_table, label, classes)
    val_name = cfg.val_split or next((s for s in VAL_SPLITS if s in found), None)
    common = {"on_bad": cfg.on_bad_image, "max_pixels": cfg.max_image_pixels}
    train = HFImages(train_table, image, labels, where, train_tf, fill=True, **common)
    if val_name is not None:
        if val_name not in found:
            raise ConfigError(
                f"data.val_split={val_name!r} is not a split of {cfg.root}: {sorted(found)}."
            )
        val_table = found[val_name]
        v_image, v_label, _ = columns(val_table.features, cfg, f"{cfg.root} [{val_name}]")
        v_labels, _ = _labels(val_table, v_label, classes)
        val = HFImages(
            val_table, v_image, v_labels, f"{cfg.root} [{val_name}]", val_tf, fill=False, **common
        )
    else:  # a stratified share of the training rows, drawn with data.split_seed
        tr, va = stratified_split(np.array(labels), cfg.val_fraction, cfg.split_seed)
        val = train.select(va.tolist())
        val.transform, val.fill = val_tf, False
        train = train.select(tr.tolist())
    check_readable(train, "train")
    if len(val):
        check_readable(val, "val")
    return train, val, classes


# ----- streaming: the split's Parquet files as shards -------------------------------------------
def _split_files(root: str, split: str) -> list[str]:
    datasets = _datasets()
    try:
        files = datasets.load_dataset_builder(root).config.data_files
    except Exception as err:
        raise _open_fail(root, err) from err
    if split not in files:
        raise ConfigError(
            f"data.split={split!r} is not a split of {root} (it has {sorted(files)})."
        )
    found = [str(f) for f in files[split]]
    if not all(f.endswith(".parquet") for f in found):
        raise ConfigError(
            f"data.streaming=true reads Parquet files; {root} [{split}] has {found[0]}. Set "
            f"data.streaming=false (random access over Arrow files)."
        )
    return found


def _parquet_reader(image: str, label: str | None) -> Any:
    def read(shard: Shard) -> Iterator[Record]:
        import pyarrow.parquet as pq

        wanted = [image, *([label] if label else [])]
        row = 0
        for batch in pq.ParquetFile(shard.path).iter_batches(columns=wanted, batch_size=256):
            cells = batch.column(image).to_pylist()
            labels = batch.column(label).to_pylist() if label else [-1] * len(cells)
            for cell, value in zip(cells, labels, strict=True):
                data = cell.get("bytes") if isinstance(cell, dict) else cell
                name = f"{shard.path} row {row}"
                yield Record(name, data, int(value), None if data else f"{name}: no image")
                row += 1

    return read


def _stream_splits(cfg: DataConfig, seed: int, train_tf: Any, val_tf: Any) -> Splits:
    import pyarrow.parquet as pq

    datasets = _datasets()
    root = str(cfg.root)
    files = _split_files(root, cfg.split)
    features = datasets.Features.from_arrow_schema(pq.read_schema(files[0]))
    image, label, classes = columns(features, cfg, f"{root} [{cfg.split}]")
    if label is not None and not classes:
        raise ConfigError(
            f"{root} [{cfg.split}]: data.streaming=true needs the label column to be a ClassLabel "
            f"(its names are the classes); {label!r} is not. Set data.streaming=false."
        )
    read = _parquet_reader(image, label)

    def shards(paths: list[str]) -> list[Shard]:
        return [Shard(p, pq.ParquetFile(p).metadata.num_rows) for p in paths]

    val_name = cfg.val_split or next((s for s in VAL_SPLITS if _has_split(root, s)), None)
    if val_name is None:
        raise ConfigError(
            f"{root} has no validation split: data.streaming=true cannot hold out rows of a "
            f"stream. Set data.val_split, or data.streaming=false."
        )
    common = {"seed": seed, "on_bad": cfg.on_bad_image, "max_pixels": cfg.max_image_pixels}
    train = ShardStream(
        shards(files),
        read,
        train_tf,
        cfg.batch_size,
        True,
        shuffle_buffer=cfg.shuffle_buffer,
        **common,
    )
    val = ShardStream(
        shards(_split_files(root, val_name)), read, val_tf, cfg.batch_size, False, **common
    )
    return train, val, classes


def _has_split(root: str, split: str) -> bool:
    try:
        _split_files(root, split)
    except ConfigError:
        return False
    return True
