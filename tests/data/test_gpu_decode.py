"""``data.backend=torchvision`` on the CPU: the PIL backend's crops, flips, order, resume and bad-file
report, with plain JPEGs decoded by ``torchvision.io.decode_jpeg`` in the training process."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from heatssl.cli import main
from heatssl.config import DataConfig
from heatssl.data import gpu_decode
from heatssl.data.datamodule import build_datamodule
from heatssl.data.gpu_decode import EncodedBatch, decode_batch
from heatssl.errors import BadImageError, ConfigError
from tests.helpers import ODD_READABLE, UNREADABLE, tiny_settings, write_odd_and_bad_images

SIZE = 16
CPU = torch.device("cpu")
# Measured on these files: 0-3.3 grey levels per image, 2.0 on average (PIL decodes big crops at
# 1/2 scale, and rounds its bilinear weights otherwise); the mirror image is 39+ levels away.
MAD_TOLERANCE = 5.0


def _smooth(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Blurred colour noise: distinct images whose crops and mirror images differ clearly."""
    coarse = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """train: 3 classes x 8 smooth JPEGs (96 x 80: big crops decode at 1/2 scale on the PIL path),
    one grey JPEG and one PNG per class; val: 2 JPEGs per class."""
    base = tmp_path_factory.mktemp("tv_images")
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 2)):
        for cls in ("a", "b", "c"):
            folder = base / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                _smooth(rng, 96, 80).save(folder / f"{i:03d}.jpg", quality=95)
            if split == "train":
                _smooth(rng, 64, 72).convert("L").save(folder / "grey.jpg", quality=95)
                _smooth(rng, 56, 48).save(folder / "still.png")
    return base


def _dm(root, backend: str, seed: int = 7, **kw):
    args = {"image_size": SIZE, "batch_size": 5, "num_workers": 0, **kw}
    cfg = DataConfig(name="imagefolder", root=str(root), backend=backend, **args)
    return build_datamodule(cfg, seed=seed)


def _batches(dm, loader=None, decode: bool = True) -> list:
    torch.manual_seed(0)  # num_workers=0: the draws come from this process's generator
    batches = list(loader if loader is not None else dm.train_dataloader())
    return [dm.decode(b, CPU) for b in batches] if decode else batches


def _mad(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference per image of two uint8 ``[N, 3, S, S]`` batches."""
    return (a.int() - b.int()).abs().float().mean(dim=(1, 2, 3))


# ----- 1. crops and flips ------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
def test_crops_and_flips_equal_the_pil_backend(root, workers):
    pil = _batches(_dm(root, "pil", num_workers=workers))
    tv_dm = _dm(root, "torchvision", num_workers=workers)
    raw = _batches(tv_dm, decode=False)
    flips = [f for encoded, _, _ in raw for f in encoded.flips]
    assert any(flips) and not all(flips)  # both kinds met: a swapped flip would show
    assert sum(len(encoded.paths) for encoded, _, _ in raw) == 24 + 3  # photos and grey JPEGs
    tv = [tv_dm.decode(b, CPU) for b in raw]
    assert len(pil) == len(tv) == 30 // 5
    worst = total = 0.0
    for (p_images, p_labels, p_bad), (t_images, t_labels, t_bad) in zip(pil, tv, strict=True):
        assert t_images.dtype == torch.uint8 and t_images.shape == (5, 3, SIZE, SIZE)
        assert t_labels.dtype == torch.int64 and t_labels.tolist() == p_labels.tolist()
        assert t_bad == p_bad == []
        worst = max(worst, _mad(p_images, t_images).max().item())
        mirrored = _mad(p_images, t_images.flip(-1))
        assert mirrored.min().item() > 4 * MAD_TOLERANCE  # a wrong flip is far outside
        total += _mad(p_images, t_images).sum().item()
    assert worst < MAD_TOLERANCE and total / 30 < 3.0


def test_evaluation_crops_equal_the_pil_backend(root):
    pil = _batches(_dm(root, "pil"), _dm(root, "pil").val_dataloader())
    dm = _dm(root, "torchvision")
    tv = _batches(dm, dm.val_dataloader())
    assert [b[1].tolist() for b in pil] == [b[1].tolist() for b in tv]
    for p, t in zip(pil, tv, strict=True):
        assert _mad(p[0], t[0]).max().item() < MAD_TOLERANCE


# ----- 2. odd and unreadable files: the PIL path, the same report -----------------------------
def test_odd_and_bad_files_take_the_pil_path_with_the_same_report(tmp_path):
    """Training (an unreadable file's slot filled) and evaluation (left out), as the PIL backend."""
    data, rng = tmp_path / "data", np.random.default_rng(3)
    for split, photos in (("train", 7), ("val", 2)):
        for cls in ("a", "b"):
            (data / split / cls).mkdir(parents=True)
        for i in range(photos):
            _smooth(rng, 96, 80).save(data / split / "b" / f"{i}.jpg", quality=95)
        write_odd_and_bad_images(data / split / "a")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: PIL turns it upright, so it must not reach decode_jpeg as it is
    _smooth(rng, 96, 80).save(data / "train" / "a" / "rotated.jpg", quality=95, exif=exif.tobytes())
    pil_dm, tv_dm = _dm(data, "pil", batch_size=6), _dm(data, "torchvision", batch_size=6)
    for train, photos, images in ((True, 7, 18), (False, 2, 2 + len(ODD_READABLE))):
        pick = "train_dataloader" if train else "val_dataloader"
        pil = _batches(pil_dm, getattr(pil_dm, pick)())
        raw = _batches(tv_dm, getattr(tv_dm, pick)(), decode=False)
        sent = {p.rsplit("/", 1)[-1] for encoded, _, _ in raw for p in encoded.paths}
        assert sent == {"rgb.jpg", *(f"{i}.jpg" for i in range(photos))}  # plain JPEGs only
        tv = [tv_dm.decode(b, CPU) for b in raw]
        assert [b[2] for b in tv] == [b[2] for b in pil]  # same files named, in the same batches
        named = {s.split(":")[0].rsplit("/", 1)[-1] for b in tv for s in b[2]}
        assert named == set(UNREADABLE)
        for p, t in zip(pil, tv, strict=True):
            assert t[1].tolist() == p[1].tolist() and t[0].shape == p[0].shape
            assert _mad(p[0], t[0]).max().item() < MAD_TOLERANCE
        assert sum(b[0].shape[0] for b in tv) == images


def _encoded(root, count: int = 3) -> tuple[EncodedBatch, torch.Tensor, list[str]]:
    dm = _dm(root, "torchvision", batch_size=count)
    return next(iter(dm._loader(dm.val_dataset, False)))


def test_a_jpeg_the_decoder_rejects_is_read_by_pil_or_named_and_left_out(root, monkeypatch):
    encoded, labels, _ = _encoded(root)
    expected = decode_batch((encoded, labels, []), CPU, SIZE)[0]
    real, second = gpu_decode.decode_jpeg, encoded.data[encoded.ends[0] : encoded.ends[1]]

    def picky(data, **kw):
        if isinstance(data, list) or torch.equal(data, second):
            raise RuntimeError("decode failed")
        return real(data, **kw)

    monkeypatch.setattr(gpu_decode, "decode_jpeg", picky)
    images, kept, skipped = decode_batch((encoded, labels, []), CPU, SIZE)
    assert skipped == [] and kept.tolist() == labels.tolist()
    assert _mad(images, expected).max().item() == 0.0  # PIL read the second: the same pixels

    cut = encoded.ends[0] + len(second) // 3  # the second JPEG truncated: PIL cannot read it
    broken = dataclasses.replace(
        encoded,
        data=torch.cat([encoded.data[:cut], encoded.data[encoded.ends[1] :]]),
        ends=[encoded.ends[0], cut, encoded.ends[2] - (encoded.ends[1] - cut)],
    )
    monkeypatch.setattr(gpu_decode, "decode_jpeg", lambda data, **kw: picky([], **kw))
    images, kept, skipped = decode_batch((broken, labels, ["before"]), CPU, SIZE)
    assert images.shape[0] == 2 and kept.tolist() == labels[[0, 2]].tolist()
    assert _mad(images, expected[[0, 2]]).max().item() == 0.0
    assert skipped[0] == "before" and skipped[1].startswith(f"{encoded.paths[1]}: ")
    with pytest.raises(BadImageError, match="on_bad_image=skip"):
        decode_batch((broken, labels, []), CPU, SIZE, on_bad="error")


# ----- 3. order and mid-epoch resume ---------------------------------------------------------
def test_order_and_mid_epoch_resume_equal_the_pil_backend(root):
    def epoch(backend: str, number: int, done: int = 0) -> tuple[list, list]:
        dm = _dm(root, backend, seed=11)
        dm.load_state_dict({"epoch": number, "batches_done": done})
        raw = _batches(dm, decode=False)
        paths = [getattr(b[0], "paths", None) for b in raw]
        return [dm.decode(b, CPU)[1].tolist() for b in raw], paths

    pil, _ = epoch("pil", 1)
    tv, paths = epoch("torchvision", 1)
    assert tv == pil and len(tv) == 6
    assert paths != epoch("torchvision", 0)[1]  # each epoch its own order
    resumed_pil, _ = epoch("pil", 1, done=2)
    resumed_tv, resumed_paths = epoch("torchvision", 1, done=2)
    assert resumed_tv == resumed_pil == tv[2:]
    assert resumed_paths == paths[2:]  # the very files an uninterrupted epoch read next


# ----- 4. end to end -------------------------------------------------------------------------
def test_pretrain_runs_end_to_end_on_the_cpu(tmp_path, root, monkeypatch):
    calls = []
    real = gpu_decode.decode_jpeg
    monkeypatch.setattr(
        gpu_decode, "decode_jpeg", lambda data, **kw: calls.append(1) or real(data, **kw)
    )
    run_dir = tmp_path / "run"
    args = [*tiny_settings(run_dir), "data.name=imagefolder", f"data.root={root}"]
    code = main(["pretrain", "-c", "demo", *args, "data.backend=torchvision", "probe.online=true"])
    assert code == 0
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert len(calls) >= 33 // 8 + 1  # every training batch, and validation, went through it


# ----- 5. the config ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["digits", "synthetic", "cifar10", "hf", "webdataset"])
def test_torchvision_backend_is_refused_for_sources_that_are_not_image_files(name):
    with pytest.raises(ConfigError) as err:
        DataConfig(name=name, root="somewhere", backend="torchvision").validate()
    message = str(err.value)
    assert f"data.name={name}" in message and "data.backend=torchvision" in message
    assert "data.name=imagefolder" in message and "Set data.backend=pil" in message
