"""Frozen-backbone features, extracted once per evaluation and reused by every probe and epoch.

The backbone runs once over the train and val images (eval mode, no augmentation, no gradients). The
cache keeps what each probe reads: the pooled features (N, d) in float16 in memory for the linear
and kNN probes, and, only when tran-1 asks for them, the full grids (N, d, h, w) in a
:class:`~heatssl.probing.grid_store.GridStore` file on disk, never in memory whole. Probes then train
on this cache: a 100-epoch linear probe costs a fraction of one pass through the backbone.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from heatssl.data.images import warn_unreadable
from heatssl.data.transforms import to_model_input
from heatssl.errors import ConfigError
from heatssl.probing.grid_store import GridStore

Grids = Tensor | GridStore  # (N, d, h, w): in memory (small sets, tests) or on disk
FALLBACK_ROWS = 1024  # first buffer size for a loader that says neither its dataset nor its length


def subset_rows(n: int, most: int | None, seed: int = 0) -> Tensor | None:
    """A seeded random subset of ``most`` of ``n`` rows, sorted (None: all rows)."""
    if most is None or most >= n:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:most].sort().values


def planned_rows(loader: Any) -> int:
    """How many images ``loader`` gives in one pass: its dataset's length, else its sampler's
    (a DALI loader has no dataset), else :data:`FALLBACK_ROWS` (buffers then grow by doubling)."""
    for attr in ("dataset", "sampler"):
        part = getattr(loader, attr, None)
        images = getattr(part, "images", None)  # a shard stream's length is in batches
        if isinstance(images, int):
            return images
        if part is not None and hasattr(part, "__len__"):
            return len(part)
    return FALLBACK_ROWS


@dataclass
class FeatureSet:
    """Pooled features (N, d) float16, labels (N,) and, when kept, the grids (N, d, h, w)."""

    pooled: Tensor
    labels: Tensor
    grid_shape: tuple[int, int, int]  # (d, h, w) of one image
    grids: Grids | None = None
    grid_rows: Tensor | None = None  # the rows whose grids ``grids`` holds, in order (None: all)

    @classmethod
    def from_grids(cls, grids: Tensor, labels: Tensor) -> FeatureSet:
        """A set from in-memory grids (the pooled features are their spatial mean)."""
        pooled = grids.float().mean(dim=(-2, -1)).half()
        return cls(pooled, labels, tuple(grids.shape[1:]), grids)

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass
class FeatureCache:
    """Train and val features of one backbone on one dataset."""

    train: FeatureSet
    val: FeatureSet
    class_names: list[str]
    seconds: float  # wall time of the extraction pass

    @property
    def num_classes(self) -> int:
        """Number of classes of the dataset."""
        return len(self.class_names)

    def delete_grids(self) -> None:
        """Remove grid files from disk (the pooled features stay)."""
        for part in (self.train, self.val):
            if isinstance(part.grids, GridStore):
                part.grids.delete()
            part.grids = None


def _host_buffer(shape: tuple[int, ...], dtype: torch.dtype, pinned: bool) -> Tensor:
    """A CPU buffer; pinned when device-to-host copies into it must not wait (a GPU backbone)."""
    return torch.empty(shape, dtype=dtype, pin_memory=pinned)


@torch.no_grad()
def extract(
    backbone: nn.Module,
    loader: DataLoader,
    device: torch.device,
    desc: str = "features",
    grids_to: str | Path | None = None,
    grid_rows: Tensor | None = None,
) -> FeatureSet:
    """Run the frozen ``backbone`` once over ``loader``; keep the pooled features.

    With ``grids_to`` (a file path) the grids are written there too, batch by batch (float16), all
    of them or only those of ``grid_rows`` (sorted row numbers of the pass). Nothing in the loop
    waits for the device: pooled features and labels are copied into pinned host buffers sized for
    the whole pass, asynchronously, and grids go to a writer thread (:class:`GridStore`).
    """
    was_training = backbone.training
    backbone.eval()
    store = GridStore(grids_to) if grids_to is not None else None
    # Written in place into buffers sized for the whole split: appending many small tensors between
    # the large per-batch temporaries fragments the heap and grows the process by gigabytes.
    capacity = planned_rows(loader)
    on_gpu = device.type == "cuda"
    pooled: Tensor | None = None
    labels = _host_buffer((capacity,), torch.long, on_gpu)
    rows, skipped, grid_shape = 0, [], None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else nullcontext()
    try:
        for batch in tqdm(loader, desc=desc, unit="batch", leave=False):
            images, targets = batch[0], batch[1]
            if len(batch) > 2:
                skipped.extend(batch[2])  # unreadable files, left out of the batch by the loader
            if images.shape[0] == 0:
                continue
            with autocast:
                grid = backbone(to_model_input(images.to(device, non_blocking=True))).half()
            grid_shape, n = tuple(grid.shape[1:]), grid.shape[0]
            if pooled is None:
                pooled = _host_buffer((capacity, grid_shape[0]), torch.float16, on_gpu)
            if rows + n > len(labels):  # a loader that gave more than it said: grow by doubling
                pooled = torch.cat([pooled, torch.empty_like(pooled)])
                labels = torch.cat([labels, torch.empty_like(labels)])
            mean = grid.float().mean(dim=(-2, -1)).half()  # on the device
            pooled[rows : rows + n].copy_(mean, non_blocking=True)
            labels[rows : rows + n].copy_(torch.as_tensor(targets), non_blocking=True)
            if store is not None:
                if grid_rows is None:
                    store.append(grid)
                else:
                    inside = grid_rows[(grid_rows >= rows) & (grid_rows < rows + n)] - rows
                    if len(inside):
                        store.append(grid[inside.to(device, non_blocking=True)])
            rows += n
        if on_gpu:
            torch.cuda.current_stream(device).synchronize()  # the host buffers hold every batch
    except BaseException:
        if store is not None:
            store.delete()
        raise
    finally:
        backbone.train(was_training)
    warn_unreadable(skipped, f"{desc}: left out")
    if rows == 0:
        if store is not None:
            store.delete()
        raise ConfigError(f"No images to extract {desc} from: the dataset split is empty.")
    grids = store.close() if store is not None else None
    kept = None if grid_rows is None or store is None else grid_rows[grid_rows < rows]
    return FeatureSet(pooled[:rows].clone(), labels[:rows].clone(), grid_shape, grids, kept)


def check_labels(train: FeatureSet, val: FeatureSet, class_names: list[str]) -> None:
    """Refuse data a probe cannot use: missing labels, one class, or val classes unseen in train."""
    for name, part in (("train", train), ("val", val)):
        if bool((part.labels < 0).any()):
            raise ConfigError(
                f"The {name} split has images without labels (label -1): probes need a labelled "
                f"dataset. Use a labelled split (e.g. an ImageFolder with class folders)."
            )
    too_big = int(max(train.labels.max(), val.labels.max()))
    if too_big >= len(class_names):
        raise ConfigError(
            f"Label {too_big} has no class name: the dataset lists {len(class_names)} classes "
            f"({class_names[:5]}...). Its labels and class list disagree."
        )
    seen = set(train.labels.unique().tolist())
    if len(seen) < 2:
        raise ConfigError(f"The train split has {len(seen)} class: a probe needs at least two.")
    unseen = sorted(set(val.labels.unique().tolist()) - seen)
    if unseen:
        names = [class_names[i] if i < len(class_names) else str(i) for i in unseen]
        raise ConfigError(
            f"Class(es) {names} appear in val but not in train: the probe can never predict them. "
            f"Add training images for them or remove them from val."
        )


def build_cache(
    backbone: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    class_names: list[str],
    device: torch.device | None = None,
    grid_dir: str | Path | None = None,
    train_grid_rows: Tensor | None = None,
) -> FeatureCache:
    """Extract train and val features once and check that probes can use them.

    With ``grid_dir`` the grids go to ``train_grids.f16`` and ``val_grids.f16`` there (for tran-1),
    the train grids of ``train_grid_rows`` only when given (tran-1's subset); remove them with
    :meth:`FeatureCache.delete_grids`.
    """
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone.to(device)
    start = time.perf_counter()
    folder = Path(grid_dir) if grid_dir is not None else None
    train = extract(
        backbone,
        train_loader,
        device,
        "train features",
        folder and folder / "train_grids.f16",
        train_grid_rows,
    )
    val = None
    try:
        val = extract(
            backbone, val_loader, device, "val features", folder and folder / "val_grids.f16"
        )
        check_labels(train, val, class_names)
    except BaseException:
        FeatureCache(train, val or train, [], 0.0).delete_grids()
        raise
    return FeatureCache(train, val, list(class_names), time.perf_counter() - start)
