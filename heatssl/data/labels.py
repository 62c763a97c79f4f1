"""Low-label protocols: a class-balanced share of the training labels (``data.label_fraction``).

The probes and fine-tuning may train on a fraction of the labelled training images (e.g. 1 % or
10 %). The subset is drawn per class from the labels and ``data.split_seed`` alone, never from the
run's ``seed``, so every run on the same data with the same fraction sees the same images; it is
written to ``label_subset.json`` in the run folder so it can be checked and repeated. Pretraining
ignores it and uses every image.

Labels are read from what a dataset holds (file lists, label arrays), never by decoding images.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset
from torchvision.datasets import CIFAR10, STL10, DatasetFolder

from heatssl.config import DataConfig
from heatssl.data.datasets import ArrayImageDataset, ImageFiles
from heatssl.data.shards import ShardStream
from heatssl.errors import ArgumentError, ConfigError

LABEL_SUBSET_FILE = "label_subset.json"
"""The file name :func:`apply_label_fraction` writes into a run folder."""

_KNOWN = (
    "ImageFiles, ArrayImageDataset (digits, synthetic), CIFAR10, STL10, an ImageFolder, a Subset"
)


def dataset_labels(dataset: Dataset) -> list[int]:
    """The label of every sample of ``dataset``, in index order, without decoding any image.

    Reads the dataset's file list (``ImageFiles``, ImageFolder: ``samples``), its label array
    (digits / synthetic: ``labels``; CIFAR-10: ``targets``; STL-10: ``labels``) or, for a
    ``Subset``, the labels of its indices. Any other dataset raises :class:`ArgumentError`.
    """
    if isinstance(dataset, Subset):
        inner = dataset_labels(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    if isinstance(dataset, (ImageFiles, DatasetFolder)):
        return [int(label) for _, label in dataset.samples]
    if isinstance(dataset, (ArrayImageDataset, STL10)):
        return np.asarray(dataset.labels).astype(np.int64).tolist()
    if isinstance(dataset, CIFAR10):
        return [int(label) for label in dataset.targets]
    raise ArgumentError(
        f"dataset={type(dataset).__name__} has no known way to read its labels without decoding "
        f"images. Allowed: {_KNOWN}. Fix: use one of those, or wrap yours in one of them."
    )


def sample_ids(dataset: Dataset, root: str | Path | None = None) -> list[str]:
    """A stable name for every sample: its file path for file datasets, else its index as a string.

    Paths are written relative to ``root`` (e.g. ``data.root``) when they lie under it, with ``/``
    separators, so the names do not depend on where the dataset is mounted. A ``Subset`` names the
    samples of the dataset it wraps.
    """
    if isinstance(dataset, Subset):
        inner = sample_ids(dataset.dataset, root)
        return [inner[i] for i in dataset.indices]
    if isinstance(dataset, (ImageFiles, DatasetFolder)):
        return [_relative(path, root) for path, _ in dataset.samples]
    return [str(i) for i in range(len(dataset))]


def _relative(path: str, root: str | Path | None) -> str:
    if root is not None:
        try:
            return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:  # not under root: keep the path as stored
            pass
    return Path(path).as_posix()


def label_subset(labels: Sequence[int], fraction: float, seed: int) -> list[int]:
    """Sorted indices of a class-balanced ``fraction`` of ``labels``, drawn with ``seed`` only.

    Every class keeps ``round(fraction * its count)`` samples, but at least 1, so no class vanishes
    at small fractions (the subset can therefore be a little larger than ``fraction`` of the whole).
    Classes are drawn in ascending label order from one ``torch.Generator`` seeded by ``seed``: the
    same labels, fraction and seed always give the same indices. ``fraction=1`` keeps every index.
    """
    if not 0.0 < fraction <= 1.0:
        raise ArgumentError(f"fraction={fraction!r} must be in (0, 1]. Fix: e.g. 0.01, 0.1 or 1.0.")
    if fraction == 1.0:
        return list(range(len(labels)))
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(index)
    unlabelled = len(by_class.get(-1, []))
    if unlabelled:
        raise ConfigError(
            f"data.label_fraction needs labelled images but {unlabelled} of the training images "
            f"have no label (-1). Use a labelled split, or set data.label_fraction=1."
        )
    generator = torch.Generator().manual_seed(seed)
    chosen: list[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        keep = max(1, round(fraction * len(members)))
        order = torch.randperm(len(members), generator=generator)[:keep]
        chosen.extend(members[i] for i in order.tolist())
    return sorted(chosen)


def save_label_subset(
    path: str | Path,
    dataset: Dataset,
    indices: Sequence[int],
    fraction: float,
    seed: int,
    root: str | Path | None = None,
) -> Path:
    """Write the chosen samples of ``dataset`` to the JSON file ``path``, atomically; return it.

    The file holds the fraction, the seed, the count per class, the total, the chosen indices and
    their :func:`sample_ids` (paths relative to ``root`` when given). It is written to a temporary
    file beside ``path`` first, then renamed, so a reader never sees half a file.
    """
    path = Path(path)
    labels, ids = dataset_labels(dataset), sample_ids(dataset, root)
    counts = Counter(labels[i] for i in indices)
    record = {
        "fraction": fraction,
        "seed": seed,
        "total": len(indices),
        "dataset_size": len(labels),
        "per_class": {str(k): counts[k] for k in sorted(counts)},
        "indices": [int(i) for i in indices],
        "samples": [ids[i] for i in indices],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as file:
            json.dump(record, file, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_label_subset(path: str | Path) -> dict[str, Any]:
    """The record :func:`save_label_subset` wrote (``fraction``, ``seed``, ``total``, ``per_class``,
    ``indices``, ``samples``)."""
    return json.loads(Path(path).read_text())


def take(dataset: Dataset, indices: Sequence[int]) -> Dataset:
    """``dataset`` restricted to ``indices``, as a dataset of the same class where heatssl knows it.

    A shallow copy holding only the chosen samples keeps the attributes the loaders use
    (``transform``, ``fill``, ``samples`` for DALI); a ``torch.utils.data.Subset`` would hide them.
    Other datasets come back as a ``Subset``.
    """
    picked = list(indices)
    if isinstance(dataset, Subset):
        return Subset(dataset.dataset, [dataset.indices[i] for i in picked])
    if isinstance(dataset, ImageFiles):
        return dataset.select(picked)
    part = copy.copy(dataset)
    if isinstance(dataset, DatasetFolder):
        part.samples = [dataset.samples[i] for i in picked]
        part.targets = [label for _, label in part.samples]
        part.imgs = part.samples
        return part
    if isinstance(dataset, ArrayImageDataset):
        part.images, part.labels = dataset.images[picked], dataset.labels[picked]
        return part
    if isinstance(dataset, CIFAR10):
        part.data, part.targets = dataset.data[picked], [dataset.targets[i] for i in picked]
        return part
    if isinstance(dataset, STL10):
        part.data, part.labels = dataset.data[picked], np.asarray(dataset.labels)[picked]
        return part
    return Subset(dataset, picked)


def apply_label_fraction(
    dataset: Dataset, cfg: DataConfig, out_dir: str | Path | None = None
) -> Dataset:
    """The training ``dataset`` cut to ``cfg.label_fraction`` of its labels, class-balanced.

    The subset is :func:`label_subset` of the dataset's labels with ``cfg.split_seed`` (never the
    run's seed), returned by :func:`take` (a dataset of the same class, so transforms and loaders
    work as before). With ``out_dir`` it is saved as ``<out_dir>/label_subset.json``. At
    ``label_fraction=1`` the dataset comes back unchanged and a ``label_subset.json`` left in
    ``out_dir`` by an earlier run is removed, so the folder never names a subset it did not use.
    """
    fraction = cfg.label_fraction
    if fraction < 1.0 and isinstance(dataset, ShardStream):
        raise ConfigError(
            f"data.label_fraction={fraction:g} draws a class-balanced subset, which needs every "
            f"image's label up front: data.name={cfg.name}"
            f"{' with data.streaming=true' if cfg.streaming else ''} reads them as a stream. Use "
            f"data.name=hf without streaming, an image folder, or data.label_fraction=1."
        )
    if fraction >= 1.0:
        if out_dir is not None:
            (Path(out_dir) / LABEL_SUBSET_FILE).unlink(missing_ok=True)
        return dataset
    indices = label_subset(dataset_labels(dataset), fraction, cfg.split_seed)
    if out_dir is not None:
        save_label_subset(
            Path(out_dir) / LABEL_SUBSET_FILE, dataset, indices, fraction, cfg.split_seed, cfg.root
        )
    return take(dataset, indices)
