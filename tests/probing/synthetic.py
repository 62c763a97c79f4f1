"""Synthetic cached features for the probe tests: separable clusters and grids, a trained head."""

from __future__ import annotations

import torch

from heatssl.model.heads import LinearHead
from heatssl.probing.probes import train_head


def clusters(n_per_class: int, classes: int, dim: int, seed: int, spread: float = 4.0):
    """Gaussian clusters with well separated means (shared across seeds), labels interleaved."""
    means = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * spread
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat(n_per_class)
    x = means[labels] + torch.randn(len(labels), dim, generator=gen)
    return x + 3.0, labels  # an offset the BatchNorm has to remove


def grids(n_per_class: int, classes: int, d: int, seed: int):
    """(N, d, 2, 2) grids: a fixed random pattern of 4 tokens per class (shared across seeds) + noise."""
    patterns = torch.randn(classes, 4, d, generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat(n_per_class)
    tokens = patterns[labels] + torch.randn(len(labels), 4, d, generator=gen)
    return tokens.transpose(1, 2).reshape(len(labels), d, 2, 2), labels


def train_linear(x, y, classes, epochs=20, seed=0):
    head = LinearHead(x.shape[1], classes)
    train_head(head, x, y, epochs, 64, "sgd", base_lr=1.0, warmup_epochs=1, seed=seed)
    return head


def trained_linear_head() -> tuple[LinearHead, torch.Tensor]:
    """A linear head trained on 3 clusters of 8-d features with unequal variances, and the features."""
    torch.manual_seed(0)
    x, y = clusters(30, 3, 8, seed=4)
    x = x * torch.linspace(0.5, 4.0, 8)  # unequal variances per feature
    return train_linear(x, y, 3, epochs=5), x
