"""Images for pretraining: datasets, SSL transforms and a Lightning data module.

Every dataset yields ``(image, label)`` (image folders add the unreadable files they met):
``image`` a float32 ``[3, S, S]`` tensor normalised with ImageNet statistics (timm backbones expect
them), ``label`` an int; batches are ``(float32 [N, 3, S, S], int64 [N], skipped)`` where
``skipped`` lists unreadable files as ``path: reason`` (usually empty). Labels are never used for
pretraining; they feed linear-probe and k-NN monitors. ``digits`` (scikit-learn, bundled) and
``synthetic`` need no files or network.
"""

from __future__ import annotations

import colorsys
import copy
import random
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets import CIFAR10, STL10, ImageFolder
from torchvision.transforms import v2
from tqdm.auto import tqdm

from heatssl.config import ConfigError, DataConfig
from heatssl.imageio import UnreadableImageError, read_image, to_rgb

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
SYNTHETIC_DATA_SEED = 1234  # fixed: the synthetic images never change, only the split follows seed
MAX_CONSECUTIVE_BAD = 64  # a training sample walks this far for a readable file, then gives up
PRECHECK_IMAGES = 32  # files read at setup: none readable -> stop before any training

Batch = tuple[Tensor, Tensor, list[str]]  # images, labels, unreadable files met (``path: reason``)


class BadImageError(ConfigError):
    """An unreadable image with ``data.on_bad_image=error``, or a dataset with nothing readable."""


def build_transform(
    image_size: int, train: bool, augment: str = "ssl", crop_scale_min: float = 0.35
) -> v2.Compose:
    """PIL image -> normalised float32 ``[3, image_size, image_size]`` tensor.

    Training with ``augment="ssl"`` uses MAE's minimal augmentation (random resized crop plus
    horizontal flip): masked-prediction objectives need little else. Everything else resizes the
    short side and centre-crops, so evaluation is deterministic.
    """
    if augment not in ("ssl", "none"):
        raise ConfigError(
            f"data.augment={augment!r} is not allowed. Allowed values: 'ssl', 'none'."
        )
    if train and augment == "ssl":
        geometry = [
            v2.RandomResizedCrop(image_size, scale=(crop_scale_min, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    else:
        geometry = [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose(
        [
            v2.Lambda(to_rgb),
            *geometry,
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def denormalize(images: Tensor) -> Tensor:
    """Undo the ImageNet normalisation of ``[3, H, W]`` or ``[N, 3, H, W]`` images into [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return (images * std + mean).clamp(0.0, 1.0)


class ArrayImageDataset(Dataset):
    """In-memory uint8 images (``[N, H, W]`` grey or ``[N, H, W, 3]`` RGB) with int labels.

    Images are upscaled to ``render_size`` on access (not up front) so tiny sources such as 8x8
    digits survive random crops without holding large upscaled copies in memory.
    """

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, render_size: int, transform: Any = None
    ) -> None:
        self.images = images
        self.labels = labels.astype(np.int64)
        self.render_size = render_size
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.images[index])
        if image.size != (self.render_size, self.render_size):
            image = image.resize((self.render_size, self.render_size), Image.Resampling.BICUBIC)
        image = to_rgb(image)
        return (self.transform(image) if self.transform else image), int(self.labels[index])


def _bad_image_fix(reason: str) -> str:
    return (
        f"Unreadable image {reason}. With data.on_bad_image=error the first one stops the run. "
        f"Fix: delete or re-save the file, or set data.on_bad_image=skip to skip unreadable files "
        f"(they are counted and named at the end of every epoch)."
    )


class ImageFiles(Dataset):
    """``(path, label)`` files read robustly: every PIL mode becomes RGB, unreadable files are skipped.

    Items are ``(image, label, skipped)`` where ``skipped`` lists the unreadable files met
    (``path: reason``). With ``fill`` (training) an unreadable file's slot takes the next readable
    file, so batches keep their size (BatchNorm, DDP and step counts stay as planned); without it
    (evaluation, features) the item's image is ``None`` and :func:`collate_batch` drops it, so no
    image is counted twice. ``on_bad="error"`` raises :class:`BadImageError` at the first one.
    """

    def __init__(
        self,
        samples: list[tuple[str, int]],
        transform: Any,
        on_bad: str = "skip",
        fill: bool = True,
    ) -> None:
        if on_bad not in ("skip", "error"):
            raise ConfigError(
                f"data.on_bad_image={on_bad!r} is not allowed. Allowed values: 'skip', 'error'."
            )
        self.samples = list(samples)
        self.transform = transform
        self.on_bad = on_bad
        self.fill = fill

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> Image.Image:
        """The RGB image of sample ``index``; :class:`UnreadableImageError` if it cannot be decoded."""
        return read_image(self.samples[index][0])

    def __getitem__(self, index: int) -> tuple[Any, int, list[str]]:
        skipped: list[str] = []
        for step in range(min(MAX_CONSECUTIVE_BAD, len(self.samples))):
            j = (index + step) % len(self.samples)
            try:
                image = self.read(j)
            except UnreadableImageError as err:
                if self.on_bad == "error":
                    raise BadImageError(_bad_image_fix(str(err))) from err
                skipped.append(str(err))
                if not self.fill:
                    return None, self.samples[index][1], skipped
                continue
            image = self.transform(image) if self.transform else image
            return image, self.samples[j][1], skipped
        raise BadImageError(
            f"{len(skipped)} unreadable image files in a row from {self.samples[index][0]} "
            f"(last: {skipped[-1]}): the dataset looks broken. Check the files under that folder."
        )


def collate_batch(items: list[tuple[Any, ...]]) -> Batch:
    """``(images [N, 3, S, S], labels [N], skipped files)`` from dataset items.

    Items are ``(image, label)`` or ``(image, label, skipped)``; items whose image is ``None`` (an
    unreadable file in an evaluation split) are left out, so ``N`` may be smaller than the batch,
    even 0 (then ``images`` is an empty tensor).
    """
    images, labels, skipped = [], [], []
    for item in items:
        if len(item) > 2:
            skipped.extend(item[2])
        if item[0] is not None:
            images.append(item[0])
            labels.append(int(item[1]))
    stacked = torch.stack(images) if images else torch.empty(0)
    return stacked, torch.tensor(labels, dtype=torch.long), skipped


def check_readable(dataset: ImageFiles, split: str) -> None:
    """Stop at once when a split has no images, or none of up to ``PRECHECK_IMAGES`` can be read.

    With ``on_bad="error"`` all those files are read and the first unreadable one stops the run
    before training starts (later ones stop it when the loader meets them).
    """
    if len(dataset) == 0:
        raise ConfigError(f"The {split} split has no image files. Add images or fix data.root.")
    picks = np.unique(np.linspace(0, len(dataset) - 1, min(PRECHECK_IMAGES, len(dataset))))
    reasons, readable = [], 0
    for index in picks.astype(int).tolist():
        try:
            dataset.read(index)
        except UnreadableImageError as err:
            if dataset.on_bad == "error":
                raise BadImageError(_bad_image_fix(str(err))) from err
            reasons.append(str(err))
            continue
        readable += 1
        if dataset.on_bad != "error":
            return  # one readable file is enough; "error" reads all picks to stop early
    if readable:
        return
    which = "all" if len(picks) == len(dataset) else f"{len(picks)} spread over the"
    raise BadImageError(
        f"No readable image in the {split} split: {which} {len(dataset)} files tried are "
        f"unreadable, e.g. {'; '.join(reasons[:3])}. Check the dataset (data.root)."
    )


class EpochSampler(Sampler[int]):
    """This process's share of an epoch, in an order fixed by ``(seed, epoch)``, resumable mid-way.

    Shuffled or in order; with ``world > 1`` process ``rank`` takes every ``world``-th index of the
    (padded) order, like torch's DistributedSampler. Because the order depends only on the seed
    and the epoch, a resumed run can skip exactly the batches it already trained on
    (:meth:`skip_next`) and then see what an uninterrupted run would have seen.
    """

    def __init__(
        self, size: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world: int = 1
    ) -> None:
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world = rank, world
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order the next pass follows (Lightning calls this every epoch)."""
        self.epoch = epoch

    def skip_next(self, samples: int) -> None:
        """Leave out the first ``samples`` of the next pass only (resuming mid-epoch)."""
        self._skip = samples

    def __len__(self) -> int:
        return -(-self.size // self.world)

    def __iter__(self):
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=gen).tolist()
        else:
            order = list(range(self.size))
        total = len(self) * self.world
        order = (order * (total // max(1, len(order)) + 1))[:total]  # pad by wrapping around
        mine = order[self.rank :: self.world]
        skip, self._skip = self._skip, 0
        return iter(mine[skip:])


class _FixedClassFolder(ImageFolder):
    """ImageFolder whose class list is given (the training classes), so label ids match train."""

    def __init__(self, root: Path, classes: list[str], transform: Any) -> None:
        self._fixed_classes = list(classes)
        super().__init__(str(root), transform=transform, allow_empty=True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self._fixed_classes, {c: i for i, c in enumerate(self._fixed_classes)}


def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ``(train_indices, val_indices)`` holding out ``val_fraction`` of every class."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_val = round(len(idx) * val_fraction)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def make_synthetic(
    size: int, image_size: int = 32, seed: int = SYNTHETIC_DATA_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """``size`` uint8 RGB images, 10 classes: class k = stripes of hue k/10 at angle k*18 degrees.

    Phase, frequency and pixel noise are random (seeded), so the class is carried only by colour and
    orientation, which a classifier can learn and which survive crops.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(size) % 10
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32) / image_size
    images = np.empty((size, image_size, image_size, 3), dtype=np.uint8)
    for i, k in enumerate(labels):
        theta = np.pi * k / 10
        freq = rng.uniform(3.0, 5.0)
        wave = np.sin(2 * np.pi * (freq * (xx * np.cos(theta) + yy * np.sin(theta)) + rng.random()))
        colour = np.array(colorsys.hsv_to_rgb(k / 10, 0.9, 0.9), dtype=np.float32)
        image = colour * (0.6 + 0.4 * wave[..., None])
        image = image + rng.normal(0.0, 0.05, image.shape)
        images[i] = np.clip(image * 255.0, 0, 255).round().astype(np.uint8)
    return images, labels


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 8x8 digits (values 0..16) as uint8 grey images and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * 255.0 / 16.0).clip(0, 255).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def _check_cfg(cfg: DataConfig) -> None:
    """Refuse values that would fail later with an obscure error."""
    if cfg.image_size <= 0 or cfg.batch_size <= 0 or cfg.num_workers < 0:
        raise ConfigError(
            f"data.image_size={cfg.image_size}, data.batch_size={cfg.batch_size} must be positive "
            f"and data.num_workers={cfg.num_workers} must be >= 0."
        )
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={cfg.val_fraction} must be in [0, 1) (e.g. 0.2).")
    if not 0.0 < cfg.crop_scale_min <= 1.0:
        raise ConfigError(f"data.crop_scale_min={cfg.crop_scale_min} must be in (0, 1].")
    if cfg.name == "synthetic" and cfg.synthetic_size < 10:
        raise ConfigError(
            f"data.synthetic_size={cfg.synthetic_size} must be >= 10 (one per class)."
        )


class HeatDataModule(L.LightningDataModule):
    """Train/val loaders for one :class:`DataConfig`; ``setup`` builds the datasets once."""

    def __init__(self, cfg: DataConfig, seed: int = 0) -> None:
        super().__init__()
        _check_cfg(cfg)
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
            self._torchvision_split(train=True, transform=None)
            self._torchvision_split(train=False, transform=None)

    def setup(self, stage: str | None = None) -> None:
        """Build train and val datasets; later calls are no-ops."""
        if self._train is not None:
            return
        cfg = self.cfg
        train_tf = build_transform(cfg.image_size, True, cfg.augment, cfg.crop_scale_min)
        val_tf = build_transform(cfg.image_size, False)
        if cfg.name in ("digits", "synthetic"):
            if cfg.name == "digits":
                images, labels = _load_digits()
            else:
                images, labels = make_synthetic(cfg.synthetic_size)
            tr, va = stratified_split(labels, cfg.val_fraction, self.seed)
            size = max(cfg.image_size, 32)
            self._train = ArrayImageDataset(images[tr], labels[tr], size, train_tf)
            self._val = ArrayImageDataset(images[va], labels[va], size, val_tf)
            self._class_names = [str(k) for k in range(10)]
        elif cfg.name == "imagefolder":
            self._setup_imagefolder(train_tf, val_tf)
        elif cfg.name in ("cifar10", "stl10"):
            self._train = self._torchvision_split(train=True, transform=train_tf)
            self._val = self._torchvision_split(train=False, transform=val_tf)
            self._class_names = list(self._train.classes)
        else:
            raise ConfigError(
                f"data.name={cfg.name!r} is not allowed. Allowed values: "
                "'digits', 'imagefolder', 'cifar10', 'stl10', 'synthetic'."
            )

    def _setup_imagefolder(self, train_tf: Any, val_tf: Any) -> None:
        """``root/train/<class>/*`` plus optional ``root/val/<class>/*`` via ImageFolder."""
        layout = "<root>/train/<class>/*.jpg and optionally <root>/val/<class>/*.jpg"
        root = Path(self.cfg.root or "")
        if not self.cfg.root or not root.is_dir():
            raise ConfigError(
                f"data.root='{self.cfg.root}' is not a folder. data.name=imagefolder expects "
                f"{layout}. Set data.root=/path/to/dataset."
            )
        if not (root / "train").is_dir():
            raise ConfigError(
                f"No 'train' folder in data.root='{root}'. Expected {layout}; move your class "
                f"folders into {root / 'train'} or point data.root at the folder that holds train/."
            )
        try:
            full = ImageFolder(str(root / "train"))
        except FileNotFoundError as err:
            raise ConfigError(f"Cannot read {root / 'train'}: {err}. Expected {layout}.") from err
        self._class_names = list(full.classes)
        on_bad = self.cfg.on_bad_image
        val_root = root / "val"
        if not val_root.is_dir():
            tr, va = stratified_split(np.array(full.targets), self.cfg.val_fraction, self.seed)
            train_samples = [full.samples[i] for i in tr]
            val_samples = [full.samples[i] for i in va]
        else:
            val_classes = sorted(p.name for p in val_root.iterdir() if p.is_dir())
            extra = [c for c in val_classes if c not in full.class_to_idx]
            if extra:
                raise ConfigError(
                    f"{val_root} has class folder(s) {extra} that {root / 'train'} lacks; labels "
                    f"would not match. Add them to train/ or remove them from val/."
                )
            train_samples = full.samples
            val_samples = _FixedClassFolder(val_root, full.classes, None).samples
        self._train = ImageFiles(train_samples, train_tf, on_bad, fill=True)
        self._val = ImageFiles(val_samples, val_tf, on_bad, fill=False)
        check_readable(self._train, "train")
        if len(self._val):
            check_readable(self._val, "val")

    def _torchvision_split(self, train: bool, transform: Any) -> Dataset:
        """CIFAR10 or STL10 train/test split; torchvision errors become ConfigError."""
        cfg = self.cfg
        root = cfg.root or f"data/{cfg.name}"
        try:
            if cfg.name == "cifar10":
                return CIFAR10(root, train=train, transform=transform, download=cfg.download)
            split = "train" if train else "test"
            return STL10(root, split=split, transform=transform, download=cfg.download)
        except (RuntimeError, OSError) as err:
            if not cfg.download:
                raise ConfigError(
                    f"{cfg.name} files not found under data.root='{root}'. Set data.download=true "
                    f"to fetch them (needs network), or put the extracted files there."
                ) from err
            raise ConfigError(
                f"Downloading {cfg.name} into '{root}' failed ({err}). Check network access, or "
                f"download it elsewhere and copy it there with data.download=false."
            ) from err

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
            worker_init_fn=_seed_worker,
            generator=torch.Generator().manual_seed(self.seed),
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
            raise ValueError(f"split={split!r}: allowed 'train', 'val'.")
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


def _seed_worker(worker_id: int) -> None:
    """Seed numpy and ``random`` in each worker from torch's per-worker seed (itself seeded)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def loader_throughput(
    loader: DataLoader, batches: int = 50, warmup: int = 5, progress: bool = True
) -> dict[str, float]:
    """Images per second of the input pipeline alone (decode, augment, collate; no model).

    ``warmup`` batches (worker start-up, first reads) are not timed. Compare the result with the
    training step's images/s: the pipeline must be faster, or the accelerator waits on it.
    """
    if batches <= 0 or warmup < 0:
        raise ConfigError(f"loader benchmark: batches={batches} must be > 0, warmup={warmup} >= 0.")
    images, timed, start = 0, 0, time.perf_counter()
    total = min(len(loader), warmup + batches) if hasattr(loader, "__len__") else warmup + batches
    bar = tqdm(total=total, desc="loader", disable=not progress, leave=False)
    for i, batch in enumerate(loader):
        bar.update()
        if i == warmup:
            start = time.perf_counter()
        if i >= warmup:
            images += batch[0].shape[0]
            timed += 1
        if timed >= batches:
            break
    bar.close()
    seconds = time.perf_counter() - start
    if timed == 0:
        raise ConfigError(
            f"loader benchmark: the loader gave {warmup} batches or fewer, all used for warm-up. "
            "Use a larger dataset or --warmup 0."
        )
    return {
        "images_per_second": images / seconds,
        "batches": timed,
        "images": images,
        "seconds": seconds,
        "num_workers": loader.num_workers,
        "batch_size": loader.batch_size or 0,
    }


def build_datamodule(cfg: DataConfig, seed: int = 0) -> HeatDataModule:
    """The data module for ``cfg`` (datasets are built lazily by ``setup``)."""
    return HeatDataModule(cfg, seed=seed)
