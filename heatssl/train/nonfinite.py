"""A NaN or infinite loss, caught without a host sync on every step.

Reading a loss on the host (``.item()``, ``bool(...)``) makes the CPU wait for the GPU at every step.
:class:`NonFiniteWatch` keeps its state on the device instead: each step folds "was this loss finite,
on any process" into a flag (an all-reduce, not a host read), and the flag is read on the host only
every few steps and before a checkpoint is written. Until it is read, the optimiser skips every
step from the first bad one on: fused AdamW takes the flag as ``found_inf``, the protocol torch's
GradScaler uses, and leaves weights and moments as they were. So no non-finite value reaches the
weights or a checkpoint, and the run stops at the next read, naming the first bad step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class NonFiniteWatch:
    """The first non-finite loss of a run, noted on the device."""

    def __init__(self) -> None:
        self.step: Tensor | None = None  # training batches so far, on the device
        self.per_step = 1  # batches per optimiser step (gradient accumulation)
        self.first_bad: Tensor | None = None  # the first bad step, or -1
        self.parts: Tensor | None = None  # the loss parts at that step
        self.names: list[str] = []

    def start(self, global_step: int, device: torch.device, per_step: int = 1) -> None:
        """Begin counting at ``global_step`` of ``per_step`` batches each (one host-to-device copy)."""
        self.per_step = max(1, per_step)
        self.step = torch.tensor(global_step * self.per_step, device=device)
        self.first_bad = torch.tensor(-1, device=device)
        self.parts = None

    def note(self, parts: dict[str, Tensor]) -> Tensor:
        """Fold this step's loss parts in (the first is the total); return the sticky flag (0./1.).

        Every process must call it at the same steps (it all-reduces under torch.distributed).
        """
        if self.step is None:
            self.start(0, parts[next(iter(parts))].device)
        values = torch.stack([v.detach().float().reshape(()) for v in parts.values()])
        bad = (~torch.isfinite(values[0])).float()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # any process: all skip and stop together
        if self.parts is None:
            self.names, self.parts = [k.split("/")[-1] for k in parts], torch.zeros_like(values)
        newly = (bad > 0) & (self.first_bad < 0)
        self.first_bad = torch.where(newly, self.step, self.first_bad)
        self.parts = torch.where(newly, values, self.parts)
        self.step = self.step + 1
        return (self.first_bad >= 0).float()

    def seen(self) -> tuple[int, str] | None:
        """The first bad step and its loss parts as text, or None (reads the flag: a host sync)."""
        if self.first_bad is None or int(self.first_bad) < 0:
            return None
        values = ", ".join(
            f"{n}={v:.4g}" for n, v in zip(self.names, self.parts.tolist(), strict=True)
        )
        return int(self.first_bad) // self.per_step, values
