"""The Lightning data module: train / val loaders for one ``data`` config, resumable mid-epoch.

Datasets come from :data:`heatssl.data.datasets.SPLITS`; the epoch order is
:class:`~heatssl.data.sampler.EpochSampler`'s, so a checkpoint can record how far an epoch got and a
resumed run skips exactly those batches.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from heatssl.config import DataConfig
from heatssl.data.datasets import SPLITS, ImageFiles, collate_batch, torchvision_split
from heatssl.data.gpu_decode import JpegFiles, collate_encoded, decode_batch
from heatssl.data.labels import apply_label_fraction
from heatssl.data.machine import auto_workers, check_fits_machine
from heatssl.data.sampler import EpochSampler, seed_worker
from heatssl.data.shards import ShardStream, StreamLoader
from heatssl.data.transforms import build_transform
from heatssl.errors import ArgumentError, CheckpointError, ConfigError


class HeatDataModule(L.LightningDataModule):
    """Train/val loaders for one validated :class:`DataConfig`; ``setup`` builds the datasets once.

    ``labelled=True`` (probes, fine-tuning) cuts the train split to ``data.label_fraction`` of its
    labels (:func:`~heatssl.data.labels.apply_label_fraction`), saved as ``label_subset.json`` in
    ``label_dir`` when given; pretraining leaves it False and uses every image. Val stays whole.
    ``index_dir`` (the run folder) keeps an image folder's file lists, scanned once by process
    ``rank`` 0 and read by the others (:mod:`heatssl.data.file_index`).
    """

    def __init__(
        self,
        cfg: DataConfig,
        seed: int = 0,
        labelled: bool = False,
        label_dir: str | Path | None = None,
        index_dir: str | Path | None = None,
        rank: int = 0,
    ) -> None:
        super().__init__()
        cfg.validate()  # the section's own check: a DataConfig built in Python skips load_config
        check_fits_machine(cfg)
        self.cfg = cfg
        self.seed = seed
        self.labelled = labelled
        self.label_dir = label_dir
        self.index_dir, self.rank = index_dir, rank
        # processes sharing this node's cores when no Trainer says (heatssl pretrain
        # --benchmark-loader sets it from the config)
        self.local_processes = 1
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
        if cfg.backend == "dali":
            from heatssl.data.dali import require_dali

            require_dali()
        train_tf, val_tf = self.transforms()
        self._train, self._val, self._class_names = SPLITS[cfg.name](
            cfg, self.seed, train_tf, val_tf, index_dir=self.index_dir, rank=self.rank
        )
        if self.labelled:
            self._train = apply_label_fraction(self._train, cfg, self.label_dir)

    def transforms(self) -> tuple[Any, Any]:
        """(train, eval) transforms: MAE's minimal augmentation and the centred crop (uint8 out)."""
        cfg = self.cfg
        train_tf = build_transform(cfg.image_size, True, cfg.augment, cfg.crop_scale_min)
        return train_tf, build_transform(cfg.image_size, False)

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
        """Saved in every checkpoint: the epoch, how many of its batches were trained on, and what
        the order depends on (training images, processes, batch size per process)."""
        trainer = self.trainer
        if trainer is None:
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        epoch = trainer.current_epoch
        if done >= trainer.num_training_batches:  # an end-of-epoch checkpoint: next epoch, start
            epoch, done = epoch + 1, 0
        return {
            "epoch": epoch,
            "batches_done": done,
            "train_images": images_in(self.train_dataset),
            "world_size": trainer.world_size,
            "batch_size": self.cfg.batch_size,
        }

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Restored by ``--resume`` before the loaders exist; the train loader starts there."""
        self._resume = dict(state_dict) if state_dict else None

    def check_resume(self, saved: dict[str, int], world: int) -> None:
        """Before the run starts: refuse a checkpoint whose mid-epoch position cannot be found in
        these images over ``world`` processes (see :meth:`_check_resume`)."""
        self._check_resume(saved, images_in(self.train_dataset), world, quiet=True)

    def _check_resume(
        self, saved: dict[str, int], images: int, world: int, quiet: bool = False
    ) -> None:
        """Refuse a mid-epoch resume whose order changed; at an epoch start, say what changed.

        The rest of an epoch is found by skipping the batches already trained on in the (seed,
        epoch) order of *these* images over *these* processes; with another count the skip would
        land on other images. An epoch-end checkpoint has nothing to skip: the run goes on with the
        new data (Lightning recomputes the learning-rate schedule for the new steps per epoch).
        """
        now = {"train_images": images, "world_size": world, "batch_size": self.cfg.batch_size}
        words = {
            "train_images": "training images",
            "world_size": "processes (trainer.devices x trainer.num_nodes)",
            "batch_size": "data.batch_size",
        }
        changed = [
            f"{words[k]}: {saved[k]} in the checkpoint, {now[k]} now"
            for k in now
            if k in saved and saved[k] != now[k]  # checkpoints before this check lack the keys
        ]
        if not changed:
            return
        what = "; ".join(changed)
        if saved.get("batches_done"):
            raise CheckpointError(
                f"--resume: the checkpoint stopped in the middle of epoch {saved['epoch']} "
                f"({saved['batches_done']} batches in) and the data order changed ({what}), so the "
                f"rest of that epoch cannot be found. Resume from an epoch checkpoint instead "
                f"(--resume RUN/checkpoints/epochNNN.ckpt), or with the same data, batch size and "
                f"number of processes."
            )
        if not quiet and (self.trainer is None or self.trainer.is_global_zero):
            print(
                f"heatssl: resuming at the start of epoch {saved['epoch']} with changed data "
                f"({what}): the coming epochs use the new order, and the learning-rate schedule "
                f"is recomputed for the new steps per epoch.",
                file=sys.stderr,
            )

    # ----- loaders --------------------------------------------------------------------------
    @property
    def num_workers(self) -> int:
        """Loader processes (pil, torchvision) or decoding threads (dali): ``data.num_workers`` or,
        with ``auto``, this process's CPU cores less two (see :func:`auto_workers`)."""
        if self.cfg.num_workers != "auto":
            return int(self.cfg.num_workers)
        trainer = self.trainer
        local = trainer.world_size // max(1, trainer.num_nodes) if trainer else self.local_processes
        return auto_workers(local)

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        workers = self.num_workers
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        if isinstance(dataset, ShardStream):
            return self._stream(dataset, train, rank, world, workers)
        sampler = EpochSampler(len(dataset), self.seed, shuffle=train, rank=rank, world=world)
        if train and self._resume:
            self._check_resume(self._resume, len(dataset), world)
            sampler.set_epoch(self._resume["epoch"])
            sampler.skip_next(self._resume["batches_done"] * self.cfg.batch_size)
            self._resume = None
        if self.cfg.backend == "dali":
            drop_last = train and len(sampler) >= self.cfg.batch_size
            return self._dali(dataset, train, sampler, drop_last, seed=self.seed + 100_003 * rank)
        collate: Any = collate_batch
        if self.cfg.backend == "torchvision" and isinstance(dataset, ImageFiles):
            # JPEGs stay encoded, decoded on the device by on_before_batch_transfer
            dataset, collate = JpegFiles(dataset), collate_encoded
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
            collate_fn=collate,
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Lightning's hook, in the training process: ``data.backend=torchvision`` decodes here."""
        return self.decode(batch)

    def decode(self, batch: Any, device: torch.device | None = None) -> Any:
        """A train / val batch of ``data.backend=torchvision`` decoded onto ``device`` (default: the
        trainer's, else the first GPU, else the CPU; see :mod:`heatssl.data.gpu_decode`); batches of
        other backends, and the PIL-decoded ones of :meth:`feature_dataloader`, pass unchanged."""
        if self.cfg.backend != "torchvision":
            return batch
        if device is None and self.trainer is not None:
            device = self.trainer.strategy.root_device
        if device is None:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return decode_batch(batch, device, self.cfg.image_size, self.cfg.on_bad_image)

    def _stream(
        self, stream: ShardStream, train: bool, rank: int, world: int, workers: int
    ) -> DataLoader:
        """The loader of a shard stream: it batches itself; a resumed epoch skips exactly."""
        stream.setup(rank, world, workers)
        if train and self._resume:
            self._check_resume(self._resume, stream.images, world)
            stream.set_epoch(self._resume["epoch"])
            stream.skip_next(self._resume["batches_done"])
            self._resume = None
        return StreamLoader(
            stream,
            num_workers=stream.workers if workers > 0 else 0,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=seed_worker,
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
        if isinstance(dataset, ShardStream):  # every record, in order, in batches of this size
            stream = copy.copy(dataset)
            stream.train, stream.batch_size = False, batch_size or self.cfg.batch_size
            stream.setup(0, 1, self.num_workers)
            return StreamLoader(stream, num_workers=self.num_workers)
        if self.cfg.backend == "dali":
            sampler = EpochSampler(len(dataset), shuffle=False)
            return self._dali(dataset, False, sampler, False, self.seed, batch_size)
        workers = self.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size or self.cfg.batch_size,
            shuffle=False,
            num_workers=workers,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
            collate_fn=collate_batch,
        )

    def _dali(
        self,
        dataset: Dataset,
        train: bool,
        sampler: EpochSampler,
        drop_last: bool,
        seed: int,
        batch_size: int | None = None,
    ) -> Any:
        """The DALI loader over ``dataset``'s files in ``sampler``'s order (same batches' meaning)."""
        from heatssl.data.dali import DaliLoader

        cfg = self.cfg
        return DaliLoader(
            dataset.samples,
            image_size=cfg.image_size,
            train=train and cfg.augment == "ssl",
            batch_size=batch_size or cfg.batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_threads=max(1, self.num_workers),
            device_id=self._dali_device_id(),
            seed=seed,
            crop_scale_min=cfg.crop_scale_min,
            on_bad=cfg.on_bad_image,
            fill=getattr(dataset, "fill", train),
            max_pixels=cfg.max_image_pixels,
        )

    def _dali_device_id(self) -> int | None:
        """The GPU DALI decodes on (this process's training GPU), or None for CPU operators."""
        want = self.cfg.dali_device
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer else None
        if want == "cpu":
            return None
        if device is not None and device.type == "cuda":
            return device.index or 0
        if device is None and torch.cuda.is_available():
            return torch.cuda.current_device()
        if want == "gpu":
            raise ConfigError(
                f"data.dali_device=gpu but this process has no GPU "
                f"(training on {device or 'the CPU'}). Set data.dali_device=auto or cpu."
            )
        return None


def images_in(dataset: Dataset) -> int:
    """Images of a split: a dataset's length, a shard stream's records."""
    return dataset.images if isinstance(dataset, ShardStream) else len(dataset)


def build_datamodule(
    cfg: DataConfig,
    seed: int = 0,
    labelled: bool = False,
    label_dir: str | Path | None = None,
    index_dir: str | Path | None = None,
    rank: int = 0,
) -> HeatDataModule:
    """The data module for ``cfg`` (datasets are built lazily by ``setup``); ``labelled=True``
    trains on ``data.label_fraction`` of the labels, ``index_dir`` shares image-folder file lists
    between processes and starts (see :class:`HeatDataModule`)."""
    return HeatDataModule(
        cfg, seed=seed, labelled=labelled, label_dir=label_dir, index_dir=index_dir, rank=rank
    )
