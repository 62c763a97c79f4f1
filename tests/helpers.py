"""Shared by the tests: a tiny run config (timm test_resnet, 32 px synthetic images, CPU) and image
folders holding every odd and unreadable kind of file."""

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from heatssl.cli import main

ROOT = Path(__file__).resolve().parents[1]
"""The repository root."""
SCRIPTS = ROOT / "scripts"
"""The launchers and benchmark scripts."""

UNREADABLE = ["empty.jpg", "text.jpg", "truncated.jpg"]
ODD_READABLE = ["rgb", "grey", "rgba", "cmyk", "deep", "palette", "tiny"]


def tiny_settings(run_dir) -> list[str]:
    """Overrides that make any recipe a seconds-long CPU run writing into ``run_dir``."""
    return [
        f"run_dir={run_dir}",
        "model.backbone=test_resnet",
        "model.output_stride=8",
        "data.name=synthetic",
        "data.synthetic_size=40",
        "data.image_size=32",
        "data.batch_size=8",
        "data.num_workers=0",
        "decoder.width=16",
        "trainer.max_epochs=1",
        "trainer.keep_checkpoints=-1",  # the tests look at epoch checkpoints (the demo keeps none)
        "trainer.progress_bar=false",
        "trainer.log_every_n_steps=1",
    ]


def pretrain_logged(run_dir, setting: str, column: str) -> list[float]:
    """The values of one ``metrics.csv`` column of a tiny demo pretraining run with ``setting``."""
    assert main(["pretrain", "-c", "demo", *tiny_settings(run_dir), setting]) == 0
    with (Path(run_dir) / "metrics.csv").open() as f:
        return [float(r[column]) for r in csv.DictReader(f) if r.get(column)]


def same_on_every_rank(run_dir) -> list[str]:
    """A run whose result does not depend on how its batch is split over processes.

    No random draw that could differ between processes: no augmentation, a fixed quadrant, the
    exact commutator; a ViT and a GroupNorm decoder: no BatchNorm statistics per process (torch's
    SyncBatchNorm, the fix on GPUs, refuses CPU modules). Synthetic 32 px images, CPU, no logger.
    """
    return [
        f"run_dir={run_dir}",
        "model.backbone=test_vit",
        "model.kwargs.patch_size=4",
        "model.output_stride=null",
        "data.name=synthetic",
        "data.val_fraction=0",
        "data.image_size=32",
        "data.augment=none",
        "heat.quadrant=top_left",
        "heat.commute_probes=0",
        "decoder.width=16",
        "decoder.norm=group",
        "optim.warmup_epochs=0",
        "trainer.accelerator=cpu",
        "trainer.progress_bar=false",
        "trainer.logger=none",
    ]


def write_odd_and_bad_images(folder, seed: int = 0) -> None:
    """Every kind of file a real image folder holds: odd modes PIL reads and files it cannot.

    Readable (``ODD_READABLE``): RGB JPEG, grey PNG, RGBA PNG, CMYK JPEG, 16-bit PNG, palette PNG
    with transparency, a 3 x 2 image smaller than any crop. Unreadable (``UNREADABLE``): a zero-byte
    file, a text file named .jpg and a truncated JPEG. Plus ``notes.txt``, not an image suffix.
    """
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(folder / "rgb.jpg")
    Image.fromarray(rng.integers(0, 255, (9, 7), dtype=np.uint8)).save(folder / "grey.png")
    Image.fromarray(rng.integers(0, 255, (12, 12, 4), dtype=np.uint8), "RGBA").save(
        folder / "rgba.png"
    )
    Image.new("CMYK", (10, 14), (10, 20, 30, 40)).save(folder / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65535, (8, 8), dtype=np.uint16)).save(folder / "deep.png")
    pal = Image.new("P", (6, 6))
    pal.putpalette([0, 0, 0, 255, 0, 0] * 128)
    pal.info["transparency"] = 0
    pal.save(folder / "palette.png")
    Image.fromarray(rng.integers(0, 255, (2, 3, 3), dtype=np.uint8)).save(folder / "tiny.png")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image")
    good = (folder / "rgb.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (folder / "notes.txt").write_text("ignored: not an image suffix")


def write_image_folder(root, train: int = 8, val: int = 2, classes=("a", "b", "c"), seed: int = 0):
    """``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``: small distinct JPEGs."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (36, 44, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.jpg", quality=90)
    return root
