"""Tests for heatssl.data.transforms: uint8 crops, reduced JPEG decoding, normalisation on the device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from heatssl.data.images import read_image
from heatssl.data.transforms import (
    CropResize,
    build_transform,
    denormalize,
    normalize,
    to_model_input,
)
from heatssl.errors import ArgumentError


def photo(width: int = 480, height: int = 360, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: smooth gradients, a few edges, mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            128 + 90 * np.sin(xx / 37.0 + c) * np.cos(yy / 23.0 - c) + 20 * (xx > width * 0.6)
            for c in range(3)
        ],
        axis=-1,
    )
    base += rng.normal(0, 4, base.shape)
    return Image.fromarray(base.clip(0, 255).astype(np.uint8))


def test_transform_gives_uint8_crops_of_the_size_asked() -> None:
    image = Image.fromarray(np.zeros((40, 25), dtype=np.uint8), mode="L")
    for train, augment in [(True, "ssl"), (True, "none"), (False, "ssl")]:
        out = build_transform(24, train=train, augment=augment)(image)
        assert out.shape == (3, 24, 24) and out.dtype == torch.uint8


def test_train_crops_are_torchvision_s_random_resized_crop_and_flip() -> None:
    """Same seed, same draws: torchvision's crops and flips (pixels differ by rounding only).

    PIL resizes the box in place of crop-then-resize, so filter taps at the box's edge read the
    pixels beyond it: a grey level here and there, while a different crop or flip differs a lot.
    """
    image = photo(120, 90)
    ours = build_transform(32, train=True, crop_scale_min=0.35)
    theirs = v2.Compose(
        [
            v2.RandomResizedCrop(32, scale=(0.35, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.PILToTensor(),
        ]
    )
    for seed in range(20):
        torch.manual_seed(seed)
        a = ours(image)
        torch.manual_seed(seed)
        b = theirs(image)
        assert (a.float() - b.float()).abs().mean() < 0.5, seed


def test_eval_is_resize_and_centre_crop() -> None:
    image = photo(150, 100)
    ours = build_transform(48, train=False)(image).float()
    ref = v2.Compose([v2.Resize(48, antialias=True), v2.CenterCrop(48), v2.PILToTensor()])
    assert (ours - ref(image).float()).abs().mean() < 2.0
    torch.manual_seed(0)
    again = build_transform(48, train=False)(image).float()
    assert torch.equal(ours, again)  # deterministic


def _decode(path, tf, draft: bool) -> tuple[torch.Tensor, tuple[int, int]]:
    sizes = []

    def spy(image: Image.Image) -> None:
        tf.draft(image)
        sizes.append(image.size)

    image = read_image(path, spy if draft else None)
    return tf(image), (sizes[0] if sizes else image.size)


@pytest.mark.parametrize("train", [True, False])
def test_reduced_jpeg_decoding_keeps_the_crops_and_their_pixels(tmp_path, train) -> None:
    """Same draws with and without reduced decoding: the same crop and flip, the same pixels.

    The box is drawn from the header before decoding, so the crops' distribution is unchanged;
    a wrong box or scale would move the picture and the difference would be large.
    """
    path = tmp_path / "photo.jpg"
    photo(480, 360).save(path, quality=92)
    tf = build_transform(40, train=train, crop_scale_min=0.35)
    reduced, diffs = 0, []
    for seed in range(40):
        torch.manual_seed(seed)
        full, _ = _decode(path, tf, draft=False)
        torch.manual_seed(seed)
        drafted, size = _decode(path, tf, draft=True)
        reduced += size[0] < 480
        diffs.append((full.float() - drafted.float()).abs().mean().item())
    assert reduced >= 30  # most crops decode at 1/2 .. 1/8 of the pixels
    assert np.mean(diffs) < 3.0 and max(diffs) < 6.0, diffs  # grey levels of 255


def test_draft_is_skipped_for_rotated_jpegs(tmp_path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    photo(480, 360).save(path, exif=exif, quality=92)
    tf = build_transform(40, train=False)
    calls = []
    out = tf(read_image(path, calls.append))
    assert calls == []  # the decoder was not asked to reduce: the box would be for the wrong side
    upright = read_image(path)
    assert upright.size == (360, 480)
    assert torch.equal(out, build_transform(40, train=False)(upright))


def test_a_stale_plan_is_never_applied_to_another_image() -> None:
    tf = CropResize(16, train=False)
    big = photo(200, 100)
    tf.draft(big)  # planned for a 200 x 100 image, never decoded
    small = photo(60, 30, seed=1)
    assert torch.equal(tf(small), CropResize(16, train=False)(small))


def test_to_model_input_normalises_on_the_device_side() -> None:
    pixels = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    x = to_model_input(pixels)
    assert x.dtype == torch.float32
    assert torch.allclose(x, normalize(pixels.float() / 255), atol=1e-5)
    assert torch.allclose(denormalize(x), pixels.float() / 255, atol=1e-5)
    cl = to_model_input(pixels, channels_last=True)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.allclose(cl, x)
    assert to_model_input(x) is x  # already normalised floats pass
    with pytest.raises(ArgumentError, match="int64"):
        to_model_input(pixels.long())


def test_normalize_and_denormalize_are_inverse() -> None:
    y = torch.rand(2, 3, 4, 4)
    assert torch.allclose(denormalize(normalize(y)), y, atol=1e-6)
    assert denormalize(torch.full((2, 3, 4, 4), 100.0)).max() == 1.0


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ArgumentError, match="scale_min"):
        CropResize(16, train=True, scale_min=0.0)
