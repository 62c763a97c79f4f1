"""The Lightning data module: train / val loaders for one ``data`` config, resumable mid-epoch.

Datasets come from :data:`heatssl.data.datasets.SPLITS`; the epoch order is
:class:`~heatssl.data.sampler.EpochSampler`'s, so a checkpoint can record how far an epoch got and a
resumed run skips exactly those batches.
"""

from __future__ import annotations

import copy

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from heatssl.config import DataConfig
from heatssl.data.datasets import SPLITS, ImageFiles, collate_batch, torchvision_split
from heatssl.data.sampler import EpochSampler, seed_worker
from heatssl.data.transforms import build_transform
from heatssl.errors import ArgumentError


class HeatDataModule(L.LightningDataModule):
    """Train/val loaders for one validated :class:`DataConfig`; ``setup`` builds the datasets once."""

    def __init__(self, cfg: DataConfig, seed: int = 0) -> None:
        super().__init__()
        cfg.validate()  # the section's own check: a DataConfig built in Python skips load_config
        self.cfg = cfg
        self.seed = seed
        self._train: Dataset | None = None
        self._val: Dataset | None = None
        self._class_names: list[str] = []
        self._resume: dict[str, int] | None = None  # where a resumed run's first epoch starts

    # ----- datasets -------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download torchvision datasets once per node (Lightning calls this on one process)."""
        if self.cfg.name in ("cifar10", "stl10") and self.cfg.download:
            torchvision_split(self.cfg, train=True, transform=None)
            torchvision_split(self.cfg, train=False, transform=None)

    def setup(self, stage: str | None = None) -> None:
        """Build train and val datasets; later calls are no-ops."""
        if self._train is not None:
            return
        cfg = self.cfg
        train_tf = build_transform(cfg.image_size, True, cfg.augment, cfg.crop_scale_min)
        val_tf = build_transform(cfg.image_size, False)
        self._train, self._val, self._class_names = SPLITS[cfg.name](
            cfg, self.seed, train_tf, val_tf
        )

    @property
    def train_dataset(self) -> Dataset:
        """Training dataset (built on first access)."""
        self.setup()
        return self._train

    @property
    def val_dataset(self) -> Dataset:
        """Validation dataset (built on first access)."""
        self.setup()
        return self._val

    @property
    def class_names(self) -> list[str]:
        """Class names in label order."""
        self.setup()
        return list(self._class_names)

    @property
    def num_classes(self) -> int:
        """Number of classes (for probes and k-NN monitors)."""
        return len(self.class_names)

    # ----- resuming mid-epoch ----------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        """Saved in every checkpoint: the epoch and how many of its batches were trained on."""
        trainer = self.trainer
        if trainer is None:
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        epoch = trainer.current_epoch
        if done >= trainer.num_training_batches:  # an end-of-epoch checkpoint: next epoch, start
            epoch, done = epoch + 1, 0
        return {"epoch": epoch, "batches_done": done}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Restored by ``--resume`` before the loaders exist; the train loader starts there."""
        self._resume = dict(state_dict) if state_dict else None

    # ----- loaders --------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        workers = self.cfg.num_workers
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        sampler = EpochSampler(len(dataset), self.seed, shuffle=train, rank=rank, world=world)
        if train and self._resume:
            sampler.set_epoch(self._resume["epoch"])
            sampler.skip_next(self._resume["batches_done"] * self.cfg.batch_size)
            self._resume = None
        return DataLoader(
            dataset,
            batch_size=self.cfg.batch_size,
            sampler=sampler,
            drop_last=train and len(sampler) >= self.cfg.batch_size,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=seed_worker,
            # one seed per process: each rank's workers draw their own augmentations
            generator=torch.Generator().manual_seed(self.seed + 100_003 * rank),
            collate_fn=collate_batch,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled in a (seed, epoch) order, this process's share; drops a last partial batch.

        A resumed run's first epoch skips the batches its checkpoint had already trained on.
        """
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader:
        """In order (this process's share), with the deterministic eval transform."""
        return self._loader(self.val_dataset, train=False)

    def feature_dataloader(self, split: str, batch_size: int | None = None) -> DataLoader:
        """Every image of ``split`` ("train" or "val") in order with the eval transform, for probes.

        The training images are read without augmentation so that cached features are the ones the
        frozen backbone gives a plain image.
        """
        if split not in ("train", "val"):
            raise ArgumentError(f"split={split!r} is not allowed. Allowed: 'train', 'val'.")
        dataset = self.val_dataset
        if split == "train":
            dataset = copy.copy(self.train_dataset)  # same samples, own transform attribute
            dataset.transform = build_transform(self.cfg.image_size, train=False)
            if isinstance(dataset, ImageFiles):
                dataset.fill = False  # an unreadable file is left out, not replaced by a neighbour
        workers = self.cfg.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size or self.cfg.batch_size,
            shuffle=False,
            num_workers=workers,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
            collate_fn=collate_batch,
        )


def build_datamodule(cfg: DataConfig, seed: int = 0) -> HeatDataModule:
    """The data module for ``cfg`` (datasets are built lazily by ``setup``)."""
    return HeatDataModule(cfg, seed=seed)
