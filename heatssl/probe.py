"""Probes of a frozen backbone on cached features: linear, tran-1 and kNN (METHOD.md section 4).

- linear: BatchNorm without affine, then Linear, on the pooled features (MAE's protocol), SGD or LARS
  with lr = base_lr x batch / 256 and a warm-up + cosine schedule.
- tran-1: one transformer block (timm's ``Block``) over the grid's tokens, then the linear head.
- kNN: k nearest train features by cosine similarity, votes weighted by ``exp(sim / T)``.

Heads are plain modules, saved as safetensors with their sizes and class names as metadata.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import Block
from timm.optim import Lars
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from tqdm.auto import tqdm

from heatssl.config import ConfigError, ProbeConfig
from heatssl.features import FeatureCache
from heatssl.schedule import scaled_lr, warmup_cosine

HEAD_FORMAT = "heatssl-head-v1"


class LinearHead(nn.Module):
    """BatchNorm1d without affine (feature standardisation), then Linear: MAE's linear probe."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(in_dim, affine=False, eps=1e-6)
        self.fc = nn.Linear(in_dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, pooled: Tensor) -> Tensor:
        """Logits (N, C) from pooled features (N, d)."""
        return self.fc(self.bn(pooled))

    def folded(self) -> tuple[Tensor, Tensor]:
        """Weight (C, d) and bias (C,) of the equivalent single Linear (eval-mode BN folded in).

        ``logits = W' x + b'`` for pooled features x; with average pooling, ``W'`` applied at every
        grid cell gives the class activation map whose spatial mean is the logit minus ``b'``.
        """
        scale = torch.rsqrt(self.bn.running_var + self.bn.eps)
        weight = self.fc.weight * scale
        bias = self.fc.bias - weight @ self.bn.running_mean
        return weight, bias


class Tran1Head(nn.Module):
    """One transformer block over the (h x w) grid tokens, mean-pooled, then a :class:`LinearHead`."""

    def __init__(self, in_dim: int, num_classes: int, tokens: int, heads: int = 0) -> None:
        super().__init__()
        heads = heads or max(1, in_dim // 64)
        if in_dim % heads:
            raise ConfigError(f"probe.tran1_heads={heads} must divide the feature width {in_dim}.")
        self.pos = nn.Parameter(torch.zeros(1, tokens, in_dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.block = Block(in_dim, num_heads=heads, mlp_ratio=4.0, qkv_bias=True)
        self.norm = nn.LayerNorm(in_dim)
        self.head = LinearHead(in_dim, num_classes)

    def forward(self, grid: Tensor) -> Tensor:
        """Logits (N, C) from feature grids (N, d, h, w)."""
        tokens = grid.flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.block(tokens)).mean(dim=1))


def _optimizer(name: str, params: Any, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "lars":
        return Lars(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(
        f"probe optimizer {name!r}: allowed 'sgd', 'lars' (linear), 'adamw' (tran-1)."
    )


def train_head(
    head: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    epochs: int,
    batch_size: int,
    optimizer: str,
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


def save_head(head: nn.Module, path: str | Path, class_names: list[str], **meta: Any) -> Path:
    """Write a trained head as safetensors with what is needed to rebuild it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = "linear" if isinstance(head, LinearHead) else "tran1"
    reserved = {"format", "kind", "class_names", "tokens", "heads", "in_dim", "num_classes"}
    if reserved & set(meta):
        raise ValueError(f"save_head metadata may not set {sorted(reserved & set(meta))}.")
    info = {"format": HEAD_FORMAT, "kind": kind, "class_names": class_names, **meta}
    if isinstance(head, Tran1Head):
        info["tokens"] = head.pos.shape[1]
        info["heads"] = head.block.attn.num_heads
    linear = head if isinstance(head, LinearHead) else head.head
    info["in_dim"], info["num_classes"] = linear.fc.in_features, linear.fc.out_features
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(tensors, str(path), metadata={"heatssl": json.dumps(info)})
    return path


def load_head(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a head saved by :func:`save_head`; return it (eval mode) and its metadata."""
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("heatssl")
    info = json.loads(raw) if raw else {}
    if info.get("format") != HEAD_FORMAT:
        raise ConfigError(f"{path} is not a heatssl probe head (write one with `heatssl probe`).")
    c = info["num_classes"]
    if info["kind"] == "linear":
        head: nn.Module = LinearHead(info["in_dim"], c)
    else:
        head = Tran1Head(info["in_dim"], c, tokens=info["tokens"], heads=info["heads"])
    head.load_state_dict(load_file(str(path)))
    return head.eval(), info


def metrics_markdown(metrics: dict[str, Any], title: str) -> str:
    """A short markdown table of top-1 / top-5 per probe."""
    lines = [f"### {title}", "", "| probe | top-1 | top-5 | seconds |", "| --- | --- | --- | --- |"]
    for kind, m in metrics.items():
        lines.append(f"| {kind} | {m['top1']:.2f} | {m['top5']:.2f} | {m['seconds']:.1f} |")
    return "\n".join(lines) + "\n"
