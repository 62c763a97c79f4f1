"""The DALI loader on CPU ops: the PIL path's batches, order, crops, bad-file policy and epochs."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from heatssl.data import dali as dali_module
from heatssl.data.dali import DaliLoader, dali_available, require_dali
from heatssl.data.datasets import ImageFiles, collate_batch
from heatssl.data.images import read_image
from heatssl.data.sampler import EpochSampler
from heatssl.data.transforms import CROP_RATIO, CropResize
from heatssl.errors import BadImageError, ConfigError
from tests.helpers import ODD_READABLE, UNREADABLE, write_odd_and_bad_images

# pytest.importorskip("nvidia.dali") per test rather than for the module: the last test checks that
# heatssl.data.dali imports and explains the install without DALI, where it matters most.
needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")

SIZE = 32  # output side; the files are 48 x 40, so evaluation and most crops shrink
COUNT = 30


def _photo(rng: np.random.Generator) -> Image.Image:
    """A smooth random 48 x 40 RGB image (blurred noise: distinct, but not all high frequency)."""
    small = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((48, 40), Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[tuple[str, int]]:
    """30 images, JPEG and every fifth PNG, labelled by their index (so labels name the file)."""
    root = tmp_path_factory.mktemp("dali_images")
    rng = np.random.default_rng(0)
    samples = []
    for i in range(COUNT):
        path = root / f"c{i % 3}" / f"{i:03d}.{'png' if i % 5 == 0 else 'jpg'}"
        path.parent.mkdir(exist_ok=True)
        _photo(rng).save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))
        samples.append((str(path), i))
    return samples


def _loader(samples, sampler=None, **kw) -> DaliLoader:
    args = {
        "image_size": SIZE,
        "train": False,
        "batch_size": 8,
        "sampler": sampler or EpochSampler(len(samples), shuffle=False),
        "drop_last": False,
        "num_threads": 2,
        "device_id": None,
        "seed": 1,
    }
    return DaliLoader(samples, **{**args, **kw})


def _labels(loader) -> list[int]:
    return [label for _, labels, _ in loader for label in labels.tolist()]


def _mad(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.int() - b.int()).abs().float().mean().item()


def _pil_reference(path: str) -> torch.Tensor:
    return CropResize(SIZE, train=False)(read_image(path))


# ----- 1. what a batch holds ----------------------------------------------------------------------
@needs_dali
def test_eval_batches_are_uint8_images_equal_to_the_pil_path(files):
    batches = list(_loader(files))
    assert [b[0].shape[0] for b in batches] == [8, 8, 8, 6]
    for images, labels, skipped in batches:
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, SIZE, SIZE)
        assert labels.dtype == torch.int64 and labels.shape == (images.shape[0],)
        assert skipped == []
        for image, label in zip(images, labels.tolist(), strict=True):
            assert _mad(image, _pil_reference(files[label][0])) < 3.0  # Resize + CenterCrop


@needs_dali
def test_odd_modes_and_formats_mean_what_they_mean_to_pil(tmp_path):
    """Grey, CMYK, RGBA (on white), 16-bit, palette with transparency, tiny, EXIF-rotated, GIF, TIFF."""
    write_odd_and_bad_images(tmp_path)
    rng = np.random.default_rng(1)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: upright it is 40 wide, 48 high
    _photo(rng).save(tmp_path / "rotated.jpg", quality=95, exif=exif.tobytes())
    _photo(rng).save(tmp_path / "anim.gif")
    _photo(rng).save(tmp_path / "scan.tif", compression="tiff_lzw")
    rgba = np.array(_photo(rng).convert("RGBA"))
    rgba[..., 3] = 90  # see-through: PIL composites it on white, DALI alone would drop alpha
    Image.fromarray(rgba).save(tmp_path / "glass.webp", lossless=True)
    names = [n for n in sorted(p.name for p in tmp_path.iterdir()) if n not in UNREADABLE]
    names.remove("notes.txt")
    assert len(names) == len(ODD_READABLE) + 4
    samples = [(str(tmp_path / name), i) for i, name in enumerate(names)]
    images, labels, skipped = next(iter(_loader(samples, batch_size=len(samples))))
    assert skipped == [] and labels.tolist() == list(range(len(samples)))
    for image, (path, _) in zip(images, samples, strict=True):
        assert _mad(image, _pil_reference(path)) < 3.0, path


# ----- 2. order: the sampler's, per epoch, per rank, resumable --------------------------------
@needs_dali
def test_order_follows_the_sampler_epochs_ranks_and_skip_next(files):
    sampler = EpochSampler(COUNT, seed=3, shuffle=True)
    loader = _loader(files, sampler, batch_size=7)
    first = _labels(loader)
    assert first == list(iter(sampler)) and first != list(range(COUNT))
    sampler.set_epoch(1)
    second = _labels(loader)
    assert second == list(iter(sampler)) and second != first
    sampler.skip_next(10)  # resuming: the batches already trained on are left out, once
    assert _labels(loader) == second[10:]
    assert _labels(loader) == second

    shards = []
    for rank in (0, 1):
        shard = EpochSampler(COUNT, seed=3, shuffle=True, rank=rank, world=2)
        shards.append(_labels(_loader(files, shard, batch_size=4)))
        assert shards[-1] == list(iter(shard))
    assert len(shards[0]) == len(shards[1]) == COUNT // 2
    assert sorted(shards[0] + shards[1]) == list(range(COUNT))


# ----- 3. batches per epoch --------------------------------------------------------------------
@needs_dali
@pytest.mark.parametrize(("drop_last", "sizes"), [(True, [8, 8, 8]), (False, [8, 8, 8, 6])])
def test_len_and_drop_last(files, drop_last, sizes):
    loader = _loader(files, train=True, drop_last=drop_last)
    assert len(loader) == len(sizes)
    assert [images.shape[0] for images, _, _ in loader] == sizes
    shard = EpochSampler(COUNT, shuffle=False, rank=1, world=4)  # 8 indices (padded)
    assert len(_loader(files, shard, batch_size=3, drop_last=drop_last)) == (2 if drop_last else 3)


# ----- 4. training crops and flips -------------------------------------------------------------
def _ramp(tmp_path) -> str:
    """48 x 40 PNG: red rises 4 per column, green 4 per row, blue constant: a crop's place shows."""
    ys, xs = np.mgrid[0:40, 0:48]
    pixels = np.stack([40 + 4 * xs, 40 + 4 * ys, np.full_like(xs, 128)], axis=-1)
    Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "ramp.png")
    return str(tmp_path / "ramp.png")


@needs_dali
def test_train_crops_are_random_resized_crops_of_the_source_flipped_half_the_time(tmp_path):
    samples = [(_ramp(tmp_path), 0)] * 40
    Image.new("RGB", (48, 40), (200, 30, 90)).save(tmp_path / "flat.jpg", quality=100)
    loader = _loader(samples, train=True, batch_size=40, crop_scale_min=0.35)
    images = torch.cat([next(iter(loader))[0] for _ in range(2)]).float()
    red, green, blue = images[:, 0], images[:, 1], images[:, 2]
    assert (blue - 128).abs().max() <= 1
    # green rises down every column: crops are never flipped vertically
    assert (green[:, -1, :] > green[:, 0, :]).all()
    # red rises along each row, or falls: flipped horizontally about half the time
    flipped = red[:, :, 0].mean(1) > red[:, :, -1].mean(1)
    assert 15 <= int(flipped.sum()) <= 65
    # crop size from the ramps: a span of (S - 1) output pixels covers (S - 1) / S of the crop
    width = (red[:, :, 0] - red[:, :, -1]).abs().mean(1) / 4 * SIZE / (SIZE - 1)
    height = (green[:, -1, :] - green[:, 0, :]).mean(1) / 4 * SIZE / (SIZE - 1)
    area = width * height / (48 * 40)
    assert (area > 0.35 - 0.06).all() and (area < 1.03).all()
    ratio = width / height
    assert (ratio > CROP_RATIO[0] - 0.08).all() and (ratio < CROP_RATIO[1] + 0.08).all()
    assert area.std() > 0.05 and ratio.std() > 0.02  # random crops, not one fixed box
    # the crop lies inside the source: its ramp values are the source's
    assert red.min() >= 40 - 1 and red.max() <= 40 + 4 * 47 + 1
    assert green.min() >= 40 - 1 and green.max() <= 40 + 4 * 39 + 1

    full = _loader(samples, train=True, batch_size=40, crop_scale_min=1.0)
    whole = next(iter(full))[0]
    resized = Image.open(samples[0][0]).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    reference = torch.from_numpy(np.array(resized)).permute(2, 0, 1)
    for image in whole:  # the whole image (up to DALI's rounding by a pixel), maybe flipped
        assert min(_mad(image, reference), _mad(image, reference.flip(-1))) < 4.0

    flat = _loader([(str(tmp_path / "flat.jpg"), 0)] * 8, train=True, crop_scale_min=0.1)
    colour = torch.tensor([200, 30, 90]).view(1, 3, 1, 1)
    assert (next(iter(flat))[0].int() - colour).abs().max() <= 3


# ----- 5. unreadable files ---------------------------------------------------------------------
def _with_bad_files(files, tmp_path, at: tuple[int, int] = (3, 4)) -> list[tuple[str, int]]:
    """``files`` with a truncated JPEG and a text file named .jpg at the indices ``at``."""
    good = Path(files[1][0]).read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "text.jpg").write_text("not an image")
    samples = list(files)
    samples[at[0]] = (str(tmp_path / "truncated.jpg"), at[0])
    samples[at[1]] = (str(tmp_path / "text.jpg"), at[1])
    return samples


def _pil_batches(samples, fill: bool, batch_size: int = 4):
    dataset = ImageFiles(samples, CropResize(SIZE, train=False), fill=fill)
    sampler = EpochSampler(len(samples), shuffle=False)
    return DataLoader(dataset, batch_size, sampler=sampler, collate_fn=collate_batch)


def _files_named(skipped: list[str]) -> list[str]:
    return [entry.split(": ")[0] for entry in skipped]


@needs_dali
@pytest.mark.parametrize("fill", [True, False])
def test_unreadable_files_are_skipped_and_named_like_the_pil_path(files, tmp_path, fill):
    samples = _with_bad_files(files, tmp_path)
    dali = list(_loader(samples, batch_size=4, fill=fill))
    pil = list(_pil_batches(samples, fill))
    assert len(dali) == len(pil) == 8
    for (images, labels, skipped), (_, pil_labels, pil_skipped) in zip(dali, pil, strict=True):
        assert labels.tolist() == pil_labels.tolist()
        assert images.shape == (len(labels), 3, SIZE, SIZE)
        assert _files_named(skipped) == _files_named(pil_skipped)
    if fill:  # the slots of 3 and 4 take file 5: batches keep their size
        assert dali[0][1].tolist() == [0, 1, 2, 5] and dali[1][1].tolist() == [5, 5, 6, 7]
    else:  # left out
        assert dali[0][1].tolist() == [0, 1, 2] and dali[1][1].tolist() == [5, 6, 7]
    assert "truncated JPEG" in dali[0][2][0]


@needs_dali
def test_on_bad_error_stops_at_the_batch_with_the_file(files, tmp_path):
    samples = _with_bad_files(files, tmp_path, at=(9, 20))
    loader = _loader(samples, batch_size=4, on_bad="error")
    seen = []
    with pytest.raises(BadImageError, match=r"truncated\.jpg: truncated JPEG") as err:
        for _, labels, _ in loader:
            seen.append(labels.tolist())
    assert seen == [[0, 1, 2, 3], [4, 5, 6, 7]]  # the batches before it, as the PIL path gives
    assert "data.on_bad_image=skip" in str(err.value)
    assert _labels(_loader(files, batch_size=4, on_bad="error")) == list(range(COUNT))


@needs_dali
def test_a_batch_of_only_unreadable_files_is_empty_in_evaluation(files, tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    samples = [*files[:4], *[(str(tmp_path / "empty.jpg"), 99)] * 4, *files[4:8]]
    batches = list(_loader(samples, batch_size=4, fill=False))
    assert [b[1].tolist() for b in batches] == [[0, 1, 2, 3], [], [4, 5, 6, 7]]
    images, labels, skipped = batches[1]
    assert images.shape == (0, 3, SIZE, SIZE) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and len(skipped) == 4 and "empty file" in skipped[0]


@needs_dali
def test_a_file_only_dali_fails_on_stops_with_its_name_and_the_loader_recovers(files, tmp_path):
    # a JPEG whose markers look complete but whose tables are missing: passes the check, not DALI
    broken = tmp_path / "broken.jpg"
    frame = b"\xff\xc0\x00\x11\x08\x00\x10\x00\x10\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    scan = b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" + b"\x12\x34" * 20
    broken.write_bytes(b"\xff\xd8" + frame + scan + b"\xff\xd9")
    samples = list(files[:12])
    samples[9] = (str(broken), 9)
    loader = _loader(samples, batch_size=4)
    seen = []
    with pytest.raises(BadImageError, match=r"broken\.jpg") as err:
        for _, labels, _ in loader:
            seen.append(labels.tolist())
    assert seen == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert "data.backend=pil" in str(err.value)
    loader.samples[9] = files[9]  # fixed: the next pass builds a fresh pipeline and runs
    assert _labels(loader) == list(range(12))


# ----- 6. epochs in a row ----------------------------------------------------------------------
@needs_dali
def test_epochs_in_a_row_each_yield_every_batch_in_their_own_order(files):
    sampler = EpochSampler(COUNT, seed=0, shuffle=True)
    loader = _loader(files, sampler, train=True, batch_size=8, drop_last=True)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader) == 3
        assert all(images.shape == (8, 3, SIZE, SIZE) for images, _, _ in batches)
        orders.append([label for _, labels, _ in batches for label in labels.tolist()])
        assert orders[-1] == list(iter(sampler))[:24]
    assert orders[0] != orders[1] != orders[2]

    sampler.set_epoch(5)
    for _ in loader:
        break  # a pass left early (prefetched batches still in DALI) ...
    sampler.set_epoch(6)
    assert _labels(loader) == list(iter(sampler))[:24]  # ... does not leak into the next


class _CollectingDataset(torch.utils.data.Dataset):
    """Items that run the garbage collector in the loader worker first, as any worker may."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> int:
        gc.collect()
        return index


@needs_dali
def test_pil_loader_workers_forked_after_a_dali_pass_survive_garbage_collection(files):
    """A pipeline left in a reference cycle (as inside a Lightning trainer) must not crash workers.

    Its threads do not come along with the fork, so the child's garbage collector destroying it
    killed the worker with SIGSEGV or hung it (seen in CI: a PIL run after a DALI run).
    """
    gc.disable()  # keep the cycle alive until the workers are forked
    try:
        loader = _loader(files)
        assert len(list(loader)) == 4
        loader.cycle = loader
        del loader
        workers = DataLoader(_CollectingDataset(), batch_size=2, num_workers=2, timeout=60)
        assert [batch.tolist() for batch in workers] == [[0, 1], [2, 3]]
    finally:
        gc.enable()
        gc.collect()


# ----- 6b. the training thread does not wait --------------------------------------------------------
@needs_dali
def test_files_are_read_in_parallel_outside_the_training_thread(files, monkeypatch):
    """Reading and checking every file in the training thread capped a process at 1-3k images/s
    on a shared file system: the batches are read ahead in other threads, several files at once."""
    import threading
    import time

    from heatssl.data import encoded

    readers: list[int] = []
    real = encoded.encoded_image

    def slow(path, *args):
        readers.append(threading.get_ident())
        time.sleep(0.01)  # a cold file system
        return real(path, *args)

    monkeypatch.setattr(encoded, "encoded_image", slow)
    labels = _labels(_loader(files, num_threads=4))
    assert labels == list(range(COUNT))  # the sampler's order, whatever thread read a file
    assert threading.get_ident() not in readers
    assert len(set(readers)) > 1


@needs_dali
def test_labels_are_handed_over_on_the_cpu_whatever_device_holds_the_images(files, monkeypatch):
    """Moving labels from pageable memory to the GPU in the loader synchronised the stream every
    batch: they stay on the CPU (pinned on a GPU run) and Lightning moves them."""
    loader = _loader(files)
    loader.device = torch.device("meta")  # images "elsewhere", as on a GPU
    monkeypatch.setattr(
        DaliLoader,
        "_images",
        lambda self, out: torch.empty(len(out), 3, SIZE, SIZE, dtype=torch.uint8, device="meta"),
    )
    batches = list(loader)
    assert all(images.device.type == "meta" for images, _, _ in batches)
    assert all(labels.device.type == "cpu" for _, labels, _ in batches)
    assert [int(x) for _, labels, _ in batches for x in labels] == list(range(COUNT))


# ----- 7. without DALI ---------------------------------------------------------------------------
def test_without_dali_the_module_imports_and_names_the_install(monkeypatch, files):
    monkeypatch.setattr(dali_module, "dali_available", lambda: False)
    with pytest.raises(ConfigError, match=r"\.\[dali\]"):
        require_dali()
    with pytest.raises(ConfigError, match=r"data\.backend=pil"):
        DaliLoader(
            files,
            image_size=SIZE,
            train=True,
            batch_size=4,
            sampler=EpochSampler(COUNT),
            drop_last=True,
            num_threads=1,
            device_id=None,
            seed=0,
        )
