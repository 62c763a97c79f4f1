"""Probes of a frozen backbone on cached features: linear, tran-1 and kNN (docs/method.md).

- linear: :class:`~heatssl.model.heads.LinearHead` on the pooled features (MAE's protocol), SGD or
  LARS with lr = base_lr x batch / 256 and a warm-up + cosine schedule.
- tran-1: :class:`~heatssl.model.heads.Tran1Head` over the grid's tokens, AdamW.
- kNN: k nearest train features by cosine similarity, votes weighted by ``exp(sim / T)``.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.optim import Lars
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from tqdm.auto import tqdm

from heatssl.config import ProbeConfig, config_keys
from heatssl.errors import check_choice
from heatssl.model.heads import LinearHead, Tran1Head
from heatssl.model.optim import scaled_lr, warmup_cosine
from heatssl.probing.features import FeatureCache

ProbeOptimizer = Literal["sgd", "lars", "adamw"]
"""``sgd`` or ``lars`` (momentum 0.9) for the linear probe, ``adamw`` for tran-1."""


def _optimizer(
    name: ProbeOptimizer, params: Any, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    check_choice("optimizer", name, ProbeOptimizer)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "lars":
        return Lars(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def train_head(
    head: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    epochs: int,
    batch_size: int,
    optimizer: ProbeOptimizer,
    base_lr: float,
    weight_decay: float = 0.0,
    warmup_epochs: int = 0,
    desc: str = "probe",
    seed: int = 0,
) -> list[float]:
    """Train ``head`` on cached ``inputs`` with cross-entropy; return the mean loss of each epoch."""
    device = next(head.parameters()).device
    n = inputs.shape[0]
    batch_size = min(batch_size, n)
    steps_per_epoch = max(1, n // batch_size)
    total = epochs * steps_per_epoch
    opt = _optimizer(optimizer, head.parameters(), scaled_lr(base_lr, batch_size), weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, warmup_epochs * steps_per_epoch, total)
    )
    gen = torch.Generator().manual_seed(seed)
    head.train()
    history = []
    for _ in tqdm(range(epochs), desc=desc, unit="epoch", leave=False):
        order = torch.randperm(n, generator=gen)
        running = 0.0
        for i in range(steps_per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            x = inputs[idx].to(device).float()
            loss = F.cross_entropy(head(x), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item()
        history.append(running / steps_per_epoch)
    head.eval()
    return history


@torch.no_grad()
def predict(head: nn.Module, inputs: Tensor, batch_size: int = 1024) -> Tensor:
    """Logits of ``head`` (in eval mode) for all ``inputs``, in batches."""
    head.eval()
    device = next(head.parameters()).device
    out = [
        head(inputs[i : i + batch_size].to(device).float()).cpu()
        for i in range(0, len(inputs), batch_size)
    ]
    return torch.cat(out)


def topk_accuracy(scores: Tensor, labels: Tensor, num_classes: int) -> dict[str, float]:
    """Top-1 and top-5 accuracy in percent (top-5 is top-C when there are fewer than 5 classes)."""
    out = {}
    for name, k in (("top1", 1), ("top5", min(5, num_classes))):
        metric = MulticlassAccuracy(num_classes=num_classes, top_k=k, average="micro")
        out[name] = 100.0 * float(metric(scores, labels))
    return out


@torch.no_grad()
def knn_scores(
    train: Tensor,
    train_labels: Tensor,
    query: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> Tensor:
    """Class scores (Nq, C): each of the k most cosine-similar train features votes exp(sim / T)."""
    train = F.normalize(train.float(), dim=1)
    k = min(k, train.shape[0])
    scores = []
    for i in range(0, query.shape[0], chunk):
        q = F.normalize(query[i : i + chunk].float(), dim=1)
        sim, idx = (q @ train.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def run_probes(
    cache: FeatureCache, cfg: ProbeConfig, device: torch.device | None = None
) -> tuple[dict[str, Any], dict[str, nn.Module]]:
    """Train and score every probe in ``cfg.kinds`` on ``cache``; return metrics and trained heads."""
    device = device or torch.device("cpu")
    c = cache.num_classes
    metrics: dict[str, Any] = {}
    heads: dict[str, nn.Module] = {}
    for kind in cfg.kinds:
        start = time.perf_counter()
        if kind == "knn":
            scores = knn_scores(
                cache.train.pooled,
                cache.train.labels,
                cache.val.pooled,
                c,
                cfg.knn_k,
                cfg.knn_temperature,
            )
            metrics[kind] = {**topk_accuracy(scores, cache.val.labels, c), "k": cfg.knn_k}
        else:
            if kind == "linear":
                head: nn.Module = LinearHead(cache.train.grids.shape[1], c)
                x_train, x_val = cache.train.pooled, cache.val.pooled
                args = (cfg.epochs, cfg.optimizer, cfg.base_lr, cfg.weight_decay, cfg.warmup_epochs)
            else:
                d, h, w = cache.train.grids.shape[1:]
                with config_keys(heads="probe.tran1_heads"):
                    head = Tran1Head(d, c, tokens=h * w, heads=cfg.tran1_heads)
                x_train, x_val = cache.train.grids, cache.val.grids
                args = (cfg.tran1_epochs, "adamw", cfg.tran1_base_lr, 0.05, 1)
            epochs, optimizer, base_lr, wd, warmup = args
            head.to(device)
            history = train_head(
                head,
                x_train,
                cache.train.labels,
                epochs,
                cfg.batch_size,
                optimizer,
                base_lr,
                wd,
                warmup,
                desc=f"{kind} probe",
            )
            scores = predict(head, x_val)
            metrics[kind] = {
                **topk_accuracy(scores, cache.val.labels, c),
                "epochs": epochs,
                "final_train_loss": history[-1],
            }
            heads[kind] = head.cpu()
        metrics[kind]["seconds"] = time.perf_counter() - start
    return metrics, heads
