"""Learning-rate rules."""

import itertools

import pytest

from heatssl.schedule import scaled_lr, warmup_cosine


def test_warmup_then_cosine():
    assert warmup_cosine(0, warmup=10, total=100) == pytest.approx(0.1)
    assert warmup_cosine(9, warmup=10, total=100) == pytest.approx(1.0)
    assert warmup_cosine(10, warmup=10, total=100) == pytest.approx(1.0)
    assert warmup_cosine(55, warmup=10, total=100) == pytest.approx(0.5)
    assert warmup_cosine(100, warmup=10, total=100, min_ratio=0.1) == pytest.approx(0.1)
    mids = [warmup_cosine(s, 10, 100) for s in range(10, 100)]
    assert all(a >= b for a, b in itertools.pairwise(mids))  # never rises after warm-up


def test_lr_scales_with_batch():
    assert scaled_lr(1.5e-4, 256) == pytest.approx(1.5e-4)
    assert scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)
