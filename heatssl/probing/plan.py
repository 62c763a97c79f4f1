"""What a probe run will cost, said before it extracts anything, and refused where it cannot fit.

On ImageNet a probe pass reads 1.33M images and tran-1's grids take tens to hundreds of gigabytes,
so the cost is stated first, in one line: images to extract and the time that takes (timed on two
batches of random images through the backbone), the pooled features' memory, the linear and tran-1
training time (timed on a few steps of each head) and the grids' bytes on disk, with the space left
there. Grids that do not fit the folder's disk are refused with the numbers and the fixes.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from heatssl.config import ProbeConfig
from heatssl.console import byte_size, duration
from heatssl.errors import ConfigError
from heatssl.model.heads import LinearHead, Tran1Head

TIMED_STEPS = 3
"""Head training steps timed per probe (after one warm-up step)."""


@dataclass
class ProbePlan:
    """Sizes and estimated seconds of one probe run."""

    train_images: int
    val_images: int
    grid_shape: tuple[int, int, int]
    grid_train_images: int  # tran-1's training subset (0 without tran-1)
    extract_seconds: float
    linear_seconds: float
    tran1_seconds: float
    pooled_bytes: int
    grid_bytes: int
    grid_dir: Path | None
    free_bytes: int | None

    def line(self) -> str:
        """The plan in one line, for the terminal."""
        d, h, w = self.grid_shape
        n = self.train_images + self.val_images
        parts = [
            f"extract {self.train_images:,} train + {self.val_images:,} val images ({h}x{w}x{d} "
            f"grid) in about {duration(self.extract_seconds)}",
            f"pooled features {byte_size(self.pooled_bytes)} in memory",
        ]
        if self.linear_seconds:
            parts.append(f"linear probe about {duration(self.linear_seconds)}")
        if self.grid_dir is not None:
            free = f", {byte_size(self.free_bytes)} free" if self.free_bytes is not None else ""
            parts.append(
                f"tran-1 on {self.grid_train_images:,} train images about "
                f"{duration(self.tran1_seconds)}, its grids {byte_size(self.grid_bytes)} in "
                f"{self.grid_dir}{free}"
            )
        rate = n / self.extract_seconds if self.extract_seconds else float("inf")
        return f"probe plan: {'; '.join(parts)} (backbone timed at {rate:,.0f} images/s)"


def grid_folder(setting: str | None, out: Path) -> Path:
    """Where tran-1's grids go: ``out`` (null), the system's temporary folder (``tmp``: ``$TMPDIR``,
    node-local scratch on most clusters) or the folder named; a fresh sub-folder is made in it."""
    if setting is None:
        base = out
    elif setting == "tmp":
        base = Path(tempfile.gettempdir())
    else:
        base = Path(setting).expanduser()
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="heatssl-grids-", dir=base))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _extract_rate(backbone: nn.Module, size: int, batch: int, device: torch.device) -> tuple:
    """(grid shape, seconds per image) of the frozen backbone on random images."""
    was_training = backbone.training
    backbone.eval()
    x = torch.randn(batch, 3, size, size, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    try:
        with autocast:
            grid = backbone(x)  # warm-up: kernels, allocator
            _sync(device)
            start = time.perf_counter()
            backbone(x)
            _sync(device)
    finally:
        backbone.train(was_training)
    return tuple(grid.shape[1:]), (time.perf_counter() - start) / batch


def _step_seconds(head: nn.Module, shape: tuple[int, ...], classes: int, device: torch.device):
    """Seconds of one training step of ``head`` on a random batch of inputs of ``shape``."""
    head = head.to(device).train()
    opt = torch.optim.SGD(head.parameters(), lr=0.0)
    x = torch.randn(shape, device=device)
    y = torch.randint(0, classes, (shape[0],), device=device)
    for i in range(TIMED_STEPS + 1):
        if i == 1:
            _sync(device)
            start = time.perf_counter()
        loss = nn.functional.cross_entropy(head(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _sync(device)
    return (time.perf_counter() - start) / TIMED_STEPS


def plan_probe(
    backbone: nn.Module,
    cfg: ProbeConfig,
    image_size: int,
    batch: int,
    train_images: int,
    val_images: int,
    classes: int,
    grid_train_images: int,
    grid_dir: Path | None,
    device: torch.device,
) -> ProbePlan:
    """Time the backbone and the heads on random data; size the features and the grids; refuse
    grids that do not fit ``grid_dir``'s disk (a :class:`ConfigError` with the numbers)."""
    backbone.to(device)
    (d, h, w), per_image = _extract_rate(backbone, image_size, min(batch, 64), device)
    linear = tran1 = 0.0
    rows = min(cfg.batch_size, max(1, train_images))
    if "linear" in cfg.kinds:
        step = _step_seconds(LinearHead(d, classes), (rows, d), classes, device)
        linear = step * cfg.epochs * max(1, train_images // rows)
    grid_bytes, free = 0, None
    if grid_dir is not None:
        grid_bytes = (grid_train_images + val_images) * d * h * w * 2
        heads = Tran1Head(d, classes, tokens=h * w, heads=cfg.tran1_heads)
        step = _step_seconds(heads, (rows, d, h, w), classes, device)
        tran1 = step * cfg.tran1_epochs * max(1, grid_train_images // rows)
        free = shutil.disk_usage(grid_dir).free
    plan = ProbePlan(
        train_images,
        val_images,
        (d, h, w),
        grid_train_images if grid_dir is not None else 0,
        per_image * (train_images + val_images),
        linear,
        tran1,
        (train_images + val_images) * d * 2,
        grid_bytes,
        grid_dir,
        free,
    )
    if free is not None and grid_bytes > free:
        per_row = d * h * w * 2
        fits = max(0, (free - val_images * per_row) // per_row)
        raise ConfigError(
            f"tran-1's feature grids need {byte_size(grid_bytes)} ({grid_train_images:,} train + "
            f"{val_images:,} val images of {h}x{w}x{d} in float16) in {grid_dir.parent}, which has "
            f"{byte_size(free)} free. Set probe.grid_dir to a folder with room (probe.grid_dir=tmp "
            f"for node-local scratch), probe.tran1_max_images={int(fits)} (what fits), or leave "
            f"tran1 out of probe.kinds."
        )
    return plan
