"""Tests for heatssl.data.transforms: output shapes and the normalisation and its inverse."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from heatssl.data.transforms import build_transform, denormalize, normalize


def test_denormalize_inverts_normalisation() -> None:
    tf = build_transform(8, train=False)
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    x = tf(Image.fromarray(pixels))
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    back = denormalize(x.unsqueeze(0))[0]
    expected = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    assert torch.allclose(back, expected, atol=1e-5)
    assert denormalize(torch.full((2, 3, 4, 4), 100.0)).max() == 1.0


def test_build_transform_shapes() -> None:
    image = Image.fromarray(np.zeros((40, 25), dtype=np.uint8), mode="L")
    for train, augment in [(True, "ssl"), (True, "none"), (False, "ssl")]:
        out = build_transform(24, train=train, augment=augment)(image)
        assert out.shape == (3, 24, 24) and out.dtype == torch.float32


def test_normalize_is_the_transform_s_normalisation():
    pixels = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    x = build_transform(8, train=False)(Image.fromarray(pixels))
    by_hand = normalize(torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
    assert torch.allclose(x, by_hand, atol=1e-6)
    y = torch.rand(2, 3, 4, 4)
    assert torch.allclose(denormalize(normalize(y)), y, atol=1e-6)
