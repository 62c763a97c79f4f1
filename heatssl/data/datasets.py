"""Datasets: every one yields ``(image, label)`` or, for image folders, ``(image, label, skipped)``.

``image`` is what the transform makes of a PIL image (a uint8 ``[3, S, S]`` tensor; normalisation
happens on the device), ``label`` an int; batches are ``(uint8 [N, 3, S, S], int64 [N], skipped)``
where ``skipped`` lists
unreadable files as ``path: reason`` (usually empty). Labels are never used for pretraining; they
feed the probes. ``digits`` (scikit-learn, bundled) and ``synthetic`` need no files or network.
"""

from __future__ import annotations

import colorsys
import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, get_worker_info
from torchvision.datasets import CIFAR10, STL10

from heatssl.config import DataConfig
from heatssl.data.file_index import class_folder_index
from heatssl.data.images import MAX_IMAGE_PIXELS, read_image, to_rgb
from heatssl.errors import BadImageError, ConfigError, UnreadableImageError

SYNTHETIC_DATA_SEED = 1234  # fixed: the synthetic images never change (the split: data.split_seed)
PRECHECK_IMAGES = 32  # files read at setup: none readable -> stop before any training
IMAGEFOLDER_LAYOUT = "<root>/train/<class>/*.jpg and optionally <root>/val/<class>/*.jpg"
FILE_INDEX_DIR = "file_index"  # in a run folder: the image folders' file lists, scanned once

Batch = tuple[Tensor, Tensor, list[str]]  # images, labels, unreadable files met (``path: reason``)


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
        max_pixels: int | None = MAX_IMAGE_PIXELS,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.on_bad = on_bad
        self.fill = fill
        self.max_pixels = max_pixels  # larger images are unreadable files (data.max_image_pixels)

    def __len__(self) -> int:
        return len(self.samples)

    def source(self, index: int) -> Any:
        """What :func:`~heatssl.data.images.read_image` opens for sample ``index``: its path here;
        a source keeping images elsewhere (rows of a table) gives an open binary file."""
        return self.samples[index][0]

    def read(self, index: int, draft: Any = None) -> Image.Image:
        """The RGB image of sample ``index``; :class:`UnreadableImageError` if it cannot be decoded."""
        return read_image(self.source(index), draft, self.max_pixels, name=self.samples[index][0])

    def select(self, indices: list[int]) -> ImageFiles:
        """A copy holding the samples ``indices`` only (same transform and policy)."""
        part = copy.copy(self)
        part.samples = [self.samples[i] for i in indices]
        return part

    def __getitem__(self, index: int) -> tuple[Any, int, list[str]]:
        skipped: list[str] = []
        # a run of unreadable files, however long, is skipped: the walk ends at a readable one
        for step in range(len(self.samples)):
            j = (index + step) % len(self.samples)
            try:
                image = self.read(j, getattr(self.transform, "draft", None))
            except UnreadableImageError as err:
                if self.on_bad == "error":
                    raise BadImageError(_bad_image_fix(str(err))) from err
                skipped.append(str(err))
                if not self.fill:
                    return None, self.samples[index][1], skipped
                continue
            image = self.transform(image) if self.transform else image
            return image, self.samples[j][1], skipped
        raise BadImageError(no_readable_file(self.samples, skipped))


def no_readable_file(samples: list[tuple[str, int]], reasons: list[str]) -> str:
    """The message when a walk over every file of a split found none readable."""
    return (
        f"None of the {len(samples)} image files of this split is readable (e.g. "
        f"{reasons[-1] if reasons else samples[0][0]}): the dataset is broken. Check the files "
        f"under data.root."
    )


def collate_batch(
    items: list[tuple[Any, ...]], stack: Callable[[list], Any] | None = None
) -> Batch:
    """``(images [N, 3, S, S], labels [N], skipped files)`` from dataset items.

    Items are ``(image, label)`` or ``(image, label, skipped)``; items whose image is ``None`` (an
    unreadable file in an evaluation split) are left out, so ``N`` may be smaller than the batch,
    even 0 (then ``images`` is an empty tensor). ``stack`` joins the images (default: one tensor).
    """
    images, labels, skipped = [], [], []
    for item in items:
        if len(item) > 2:
            skipped.extend(item[2])
        if item[0] is not None:
            images.append(item[0])
            labels.append(int(item[1]))
    return (stack or _stack)(images), torch.tensor(labels, dtype=torch.long), skipped


def _stack(images: list[Tensor]) -> Tensor:
    """One tensor of the images; in a loader worker it is written straight into shared memory.

    The batch then crosses to the training process without another copy (torch's default collate
    does the same). No images give an empty uint8 tensor.
    """
    if not images:
        return torch.empty(0, dtype=torch.uint8)
    out = None
    if get_worker_info() is not None:
        first = images[0]
        numel = sum(x.numel() for x in images)
        storage = first.untyped_storage()._new_shared(numel * first.element_size())
        out = first.new(storage).resize_(len(images), *first.shape)
    return torch.stack(images, out=out)


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


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 8x8 digits (values 0..16) as uint8 grey images and labels."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = np.round(digits.images * 255.0 / 16.0).clip(0, 255).astype(np.uint8)
    return images, digits.target.astype(np.int64)


Splits = tuple[Dataset, Dataset, list[str]]  # train, val, class names


def array_splits(cfg: DataConfig, seed: int, train_tf: Any, val_tf: Any, **_: Any) -> Splits:
    """``digits`` or ``synthetic``: in-memory images, a stratified ``val_fraction`` held out."""
    if cfg.name == "digits":
        images, labels = load_digits()
    else:
        images, labels = make_synthetic(cfg.synthetic_size)
    tr, va = stratified_split(labels, cfg.val_fraction, cfg.split_seed)
    size = max(cfg.image_size, 32)
    train = ArrayImageDataset(images[tr], labels[tr], size, train_tf)
    val = ArrayImageDataset(images[va], labels[va], size, val_tf)
    return train, val, [str(k) for k in range(10)]


def imagefolder_splits(
    cfg: DataConfig,
    seed: int,
    train_tf: Any,
    val_tf: Any,
    index_dir: str | Path | None = None,
    rank: int = 0,
) -> Splits:
    """``root/train/<class>/*`` plus optional ``root/val/<class>/*``, in ImageFolder's order.

    With ``index_dir`` the file lists are scanned once and shared by every process and later start
    through ``<index_dir>/file_index/`` (:func:`~heatssl.data.file_index.class_folder_index`).
    """
    root = Path(cfg.root or "")
    if not root.is_dir():
        raise ConfigError(
            f"data.root='{cfg.root}' is not a folder. data.name=imagefolder expects "
            f"{IMAGEFOLDER_LAYOUT}. Set data.root=/path/to/dataset."
        )
    if not (root / "train").is_dir():
        raise ConfigError(
            f"No 'train' folder in data.root='{root}'. Expected {IMAGEFOLDER_LAYOUT}; move your "
            f"class folders into {root / 'train'} or point data.root at the folder that holds train/."
        )

    def index_file(split: str) -> Path | None:
        return Path(index_dir) / FILE_INDEX_DIR / f"{split}.json.gz" if index_dir else None

    full = class_folder_index(root / "train", index_file("train"), rank)
    val_root = root / "val"
    if not val_root.is_dir():
        labels = np.array([label for _, label in full.samples])
        tr, va = stratified_split(labels, cfg.val_fraction, cfg.split_seed)
        train_samples = [full.samples[i] for i in tr]
        val_samples = [full.samples[i] for i in va]
    else:
        val_classes = sorted(p.name for p in val_root.iterdir() if p.is_dir())
        extra = [c for c in val_classes if c not in full.classes]
        if extra:
            raise ConfigError(
                f"{val_root} has class folder(s) {extra} that {root / 'train'} lacks; labels "
                f"would not match. Add them to train/ or remove them from val/."
            )
        train_samples = full.samples
        val = class_folder_index(val_root, index_file("val"), rank, full.classes, allow_empty=True)
        val_samples = val.samples
    train = ImageFiles(train_samples, train_tf, cfg.on_bad_image, True, cfg.max_image_pixels)
    val = ImageFiles(val_samples, val_tf, cfg.on_bad_image, False, cfg.max_image_pixels)
    check_readable(train, "train")
    if len(val):
        check_readable(val, "val")
    return train, val, list(full.classes)


def torchvision_split(cfg: DataConfig, train: bool, transform: Any) -> Dataset:
    """CIFAR10 or STL10 train/test split; a missing or failed download names the fix."""
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


def torchvision_splits(cfg: DataConfig, seed: int, train_tf: Any, val_tf: Any, **_: Any) -> Splits:
    """``cifar10`` or ``stl10``: torchvision's own train and test splits."""
    train = torchvision_split(cfg, True, train_tf)
    return train, torchvision_split(cfg, False, val_tf), list(train.classes)


def _hf_splits(*args: Any, **kwargs: Any) -> Splits:
    from heatssl.data.hf import hf_splits  # the optional datasets package, only when asked for

    return hf_splits(*args, **kwargs)


def _wds_splits(*args: Any, **kwargs: Any) -> Splits:
    from heatssl.data.wds import wds_splits  # the optional webdataset package, only when asked for

    return wds_splits(*args, **kwargs)


SPLITS = {
    "digits": array_splits,
    "synthetic": array_splits,
    "imagefolder": imagefolder_splits,
    "cifar10": torchvision_splits,
    "stl10": torchvision_splits,
    "hf": _hf_splits,
    "webdataset": _wds_splits,
}
"""How each ``data.name`` builds its train and val datasets (the config has checked the name)."""
