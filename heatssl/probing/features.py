"""Frozen-backbone features, extracted once per evaluation and reused by every probe and epoch.

The backbone runs once over the train and val images (eval mode, no augmentation, no gradients);
the stage's grids are kept in float16 on the CPU. Probes then train on this cache: a 100-epoch linear
probe costs a fraction of one pass through the backbone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from heatssl.data.images import warn_unreadable
from heatssl.errors import ConfigError


@dataclass
class FeatureSet:
    """Feature grids (N, d, h, w) in float16 and their labels (N,)."""

    grids: Tensor
    labels: Tensor

    @property
    def pooled(self) -> Tensor:
        """Global-average-pooled features (N, d) in float32."""
        return self.grids.float().mean(dim=(-2, -1))

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


@torch.no_grad()
def extract(
    backbone: nn.Module, loader: DataLoader, device: torch.device, desc: str = "features"
) -> FeatureSet:
    """Run the frozen ``backbone`` once over ``loader``; keep the grids (float16, CPU)."""
    was_training = backbone.training
    backbone.eval()
    grids, labels, skipped = [], [], []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False):
        images, targets = batch[0], batch[1]
        if len(batch) > 2:
            skipped.extend(batch[2])  # unreadable files, left out of the batch by the loader
        if images.shape[0] == 0:
            continue
        with autocast:
            grid = backbone(images.to(device, non_blocking=True))
        grids.append(grid.to("cpu", torch.float16))
        labels.append(torch.as_tensor(targets, dtype=torch.long))
    backbone.train(was_training)
    warn_unreadable(skipped, f"{desc}: left out")
    if not grids:
        raise ConfigError(f"No images to extract {desc} from: the dataset split is empty.")
    return FeatureSet(torch.cat(grids), torch.cat(labels))


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
) -> FeatureCache:
    """Extract train and val features once and check that probes can use them."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone.to(device)
    start = time.perf_counter()
    train = extract(backbone, train_loader, device, desc="train features")
    val = extract(backbone, val_loader, device, desc="val features")
    seconds = time.perf_counter() - start
    check_labels(train, val, class_names)
    return FeatureCache(train, val, list(class_names), seconds)
