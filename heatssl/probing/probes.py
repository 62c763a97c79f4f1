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
from heatssl.errors import ArgumentError, check_choice
from heatssl.model.heads import LinearHead, Tran1Head
from heatssl.model.optim import scaled_lr, warmup_cosine, weight_decay_groups
from heatssl.probing.features import FeatureCache, subset_rows

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
    groups = weight_decay_groups(head, weight_decay)  # no decay on biases, norms, positions
    opt = _optimizer(optimizer, groups, scaled_lr(base_lr, batch_size), weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, warmup_epochs * steps_per_epoch, total)
    )
    gen = torch.Generator().manual_seed(seed)
    head.train()
    # each epoch's summed loss stays on the device: no host read until the end of training
    sums = torch.zeros(epochs, device=device)
    for epoch in tqdm(range(epochs), desc=desc, unit="epoch", leave=False):
        order = torch.randperm(n, generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            x = inputs[idx].to(device, non_blocking=True).float()
            loss = F.cross_entropy(head(x), labels[idx].to(device, non_blocking=True))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            sums[epoch] += loss.detach()
    head.eval()
    return (sums / steps_per_epoch).tolist()


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
    train_chunk: int = 16384,
    device: torch.device | None = None,
) -> Tensor:
    """Class scores (Nq, C): each of the k most cosine-similar train features votes exp(sim / T).

    The train features are compared ``train_chunk`` rows at a time against every query (keeping
    each query's running top k), so no float32 copy of the whole train set is made and each train
    row is moved to ``device`` once; the scores are on the CPU.
    """
    device = device or torch.device("cpu")
    k = min(k, train.shape[0])
    queries = [
        F.normalize(query[i : i + chunk].to(device).float(), dim=1)
        for i in range(0, query.shape[0], chunk)
    ]
    best_sim = [torch.empty(q.shape[0], 0, device=device) for q in queries]
    best_idx = [torch.empty(q.shape[0], 0, dtype=torch.long, device=device) for q in queries]
    for j in range(0, train.shape[0], train_chunk):  # each train row is moved and normalised once
        block = F.normalize(train[j : j + train_chunk].to(device).float(), dim=1)
        for n, q in enumerate(queries):
            block_sim, block_idx = (q @ block.T).topk(min(k, block.shape[0]), dim=1)
            sim = torch.cat([best_sim[n], block_sim], dim=1)
            idx = torch.cat([best_idx[n], block_idx + j], dim=1)
            best_sim[n], pick = sim.topk(min(k, sim.shape[1]), dim=1)
            best_idx[n] = idx.gather(1, pick)
    scores = []
    for sims, idx in zip(best_sim, best_idx, strict=True):
        votes = torch.zeros(sims.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[idx.cpu()], (sims.cpu() / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


class _Rows:
    """The rows ``index`` of ``data`` (a tensor or a grid store), indexable like a tensor."""

    def __init__(self, data: Any, index: Tensor) -> None:
        self.data, self.index = data, index
        self.shape = (len(index), *tuple(data.shape[1:]))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, rows: Any) -> Tensor:
        return self.data[self.index[rows]]


def run_probes(
    cache: FeatureCache, cfg: ProbeConfig, device: torch.device | None = None
) -> tuple[dict[str, Any], dict[str, nn.Module]]:
    """Train and score every probe in ``cfg.kinds`` on ``cache``; return metrics and trained heads.

    The heads train on ``device`` (default: the GPU when there is one); the features stay on the
    CPU (or on disk) and move a batch at a time.
    """
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
                device=device,
            )
            metrics[kind] = {**topk_accuracy(scores, cache.val.labels, c), "k": cfg.knn_k}
        else:
            y_train = cache.train.labels
            if kind == "linear":
                head: nn.Module = LinearHead(cache.train.grid_shape[0], c)
                x_train, x_val = cache.train.pooled, cache.val.pooled
                args = (cfg.epochs, cfg.optimizer, cfg.base_lr, cfg.weight_decay, cfg.warmup_epochs)
            else:
                if cache.train.grids is None or cache.val.grids is None:
                    raise ArgumentError(
                        "kinds=['tran1'] needs the feature grids: build the cache with grid_dir."
                    )
                d, h, w = cache.train.grid_shape
                with config_keys(heads="probe.tran1_heads"):
                    head = Tran1Head(d, c, tokens=h * w, heads=cfg.tran1_heads)
                x_train, x_val = cache.train.grids, cache.val.grids
                if cache.train.grid_rows is not None:  # only the subset's grids were kept
                    y_train = y_train[cache.train.grid_rows]
                else:
                    subset = subset_rows(len(y_train), cfg.tran1_max_images)
                    if subset is not None:
                        x_train, y_train = _Rows(x_train, subset), y_train[subset]
                args = (cfg.tran1_epochs, "adamw", cfg.tran1_base_lr, 0.05, 1)
            epochs, optimizer, base_lr, wd, warmup = args
            head.to(device)
            history = train_head(
                head,
                x_train,
                y_train,
                epochs,
                cfg.batch_size,
                optimizer,
                base_lr,
                wd,
                warmup,
                desc=f"{kind} probe",
            )
            scores = predict(head, x_val, batch_size=cfg.batch_size)
            metrics[kind] = {
                **topk_accuracy(scores, cache.val.labels, c),
                "epochs": epochs,
                "train_images": len(y_train),
                "final_train_loss": history[-1],
            }
            heads[kind] = head.cpu()
        metrics[kind]["seconds"] = time.perf_counter() - start
    return metrics, heads
