"""Shared by scripts/bench_gpu.py: step clocks, sync and compile counters, one step measured.

- :func:`train_step`: one pretraining step as Lightning runs it (autocast, clipping, fused AdamW).
- :class:`StepClock`: per-step device time (CUDA events; ``perf_counter`` on the CPU).
- :class:`SyncCounter`: CUDA syncs (``set_sync_debug_mode("warn")``) and host reads of tensors.
- :func:`dynamo_counts`: frames compiled, graphs and graph breaks so far (to difference).
- :func:`measure_step`: warm-up, timed steps, counted steps and peak memory of one step.
- :class:`Runner`: one configuration after another, failures noted, none started past a budget.
- :class:`StepWatch`: the same figures from inside a Lightning run (loader + step end to end).
- :func:`environment`: the device, versions and cores the figures depend on; :func:`auto_workers`
  (``data.num_workers=auto``) and :func:`cores_per_process` from wherever heatssl keeps them.
"""

from __future__ import annotations

import importlib
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import timm
import torch
from bench_host_syncs import HostReads
from benchlib import machine
from steplib import summarize
from torch import Tensor, nn

import heatssl
from heatssl.config import Config
from heatssl.data.machine import auto_workers, cores_per_process
from heatssl.data.transforms import to_model_input
from heatssl.model.optim import can_fuse, scaled_lr, weight_decay_groups

SYNC_WARNING = "synchronizing CUDA operation"


def synchronize(device: torch.device) -> None:
    """Wait for the device (a no-op on the CPU); a sync of the benchmark's, so never counted."""
    if device.type == "cuda":
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode(mode)


class StepClock:
    """Per-step times: CUDA events on a GPU (the device's timeline), ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.marks: list[tuple[Any, Any]] = []

    def _now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self) -> None:
        self.marks.append((self._now(), None))

    def stop(self) -> None:
        self.marks[-1] = (self.marks[-1][0], self._now())

    def seconds(self) -> list[float]:
        """Every start-stop interval in seconds (waits for the device once)."""
        synchronize(self.device)
        if self.cuda:
            return [a.elapsed_time(b) / 1000 for a, b in self.marks if b is not None]
        return [b - a for a, b in self.marks if b is not None]

    def between_stops(self) -> float:
        """Seconds from the first interval's end to the last's (after :meth:`seconds`)."""
        first, last = self.marks[0][1], self.marks[-1][1]
        return first.elapsed_time(last) / 1000 if self.cuda else last - first


class SyncCounter:
    """Counts, between calls of :meth:`mark`, the CUDA operations that made the host wait (sync
    debug mode "warn", on a GPU) and the host reads of tensors (``.item()``, ``bool()``, ...).

    Other warnings met meanwhile are kept (their first lines, once each) in :attr:`others`.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.reads = HostReads()
        self.others: list[str] = []
        self._catch = warnings.catch_warnings(record=True)
        self._seen: list[Any] = []
        self._done = 0

    def __enter__(self) -> SyncCounter:
        self._seen = self._catch.__enter__() or []
        warnings.simplefilter("always")
        if self.cuda:
            torch.cuda.set_sync_debug_mode("warn")
        self.reads.install()
        return self

    def mark(self) -> tuple[int | None, int]:
        """``(CUDA syncs or None on the CPU, host reads)`` since the previous mark."""
        syncs = 0
        for w in self._seen[self._done :]:
            text = str(w.message)
            if SYNC_WARNING in text:
                syncs += 1
            elif text.splitlines()[0][:200] not in self.others and len(self.others) < 10:
                self.others.append(text.splitlines()[0][:200])
        self._done = len(self._seen)
        reads = sum(self.reads.calls.values())
        self.reads.calls.clear()
        return (syncs if self.cuda else None), reads

    def __exit__(self, *exc: object) -> None:
        self.reads.remove()
        if self.cuda:
            torch.cuda.set_sync_debug_mode(0)
        self._catch.__exit__(*exc)


def dynamo_counts() -> dict[str, int]:
    """torch.compile's running totals: frames compiled (a recompile adds one), graphs, breaks."""
    from torch._dynamo.utils import counters

    return {
        "frames_compiled": int(counters["frames"]["total"]),
        "graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }


def difference(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


def train_step(
    model: nn.Module, loss_of: Callable[[Tensor], Tensor], images: Tensor, cfg: Config
) -> Callable[[], None]:
    """One step as the Trainer runs the recipe: uint8 images to the normalised (channels_last)
    input on the device, forward under bf16 autocast when the precision says so, backward,
    gradient-norm clipping, fused AdamW (the module's groups and lr rule), ``zero_grad``.
    Nothing is read on the host."""
    t, opt = cfg.trainer, cfg.optim
    optimizer = torch.optim.AdamW(
        weight_decay_groups(model, opt.weight_decay),
        lr=scaled_lr(opt.base_lr, cfg.data.batch_size),
        betas=tuple(opt.betas),
        fused=can_fuse(model.parameters(), t.precision),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    bf16 = t.precision.startswith("bf16")

    def step() -> None:
        x = to_model_input(images, t.channels_last)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_of(x)
        loss.backward()
        if t.gradient_clip_val:
            torch.nn.utils.clip_grad_norm_(params, t.gradient_clip_val)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak GPU memory allocated since the last reset (None on the CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure_step(
    step: Callable[[], None],
    batch: int,
    device: torch.device,
    warmup: int,
    steps: int,
    counted: int,
) -> dict[str, Any]:
    """Warm up (compile, autotuning), time ``steps`` steps (median -> images/s), then count the
    syncs and host reads of ``counted`` more steps, apart from the timing."""
    reset_memory(device)
    at_start = dynamo_counts()
    for _ in range(warmup):
        step()
    synchronize(device)
    warm = dynamo_counts()
    clock = StepClock(device)
    for _ in range(steps):
        clock.start()
        step()
        clock.stop()
    times = clock.seconds()
    timed = dynamo_counts()
    syncs, reads = [], []
    with SyncCounter(device) as counter:
        for _ in range(counted):
            step()
            s, r = counter.mark()
            syncs.append(s)
            reads.append(r)
    synchronize(device)
    stats = summarize(times, batch)
    return {
        "images_per_second": stats["img_per_s_median"],
        "step_ms_median": stats["median_s"] * 1000,
        "step_ms_min": stats["min_s"] * 1000,
        "step_ms_max": stats["max_s"] * 1000,
        "timed_steps": len(times),
        "warmup_steps": warmup,
        "peak_memory_gib": peak_memory_gib(device),
        "cuda_syncs_per_step": syncs if device.type == "cuda" else None,
        "host_reads_per_step": reads,
        "compile_during_warmup": difference(warm, at_start),
        "compile_after_warmup": difference(timed, warm),
        "other_warnings": counter.others,
    }


class Runner:
    """Runs one configuration at a time: a failure is noted and the others still run; none starts
    once ``budget`` seconds have passed (the run stays within its time on a lent GPU)."""

    def __init__(self, device: torch.device, budget: float) -> None:
        self.device, self.deadline = device, time.perf_counter() + budget
        self.errors: list[str] = []
        self.skipped: list[str] = []

    def __call__(self, what: str, fn: Callable[..., dict], *args: Any) -> dict[str, Any]:
        if time.perf_counter() > self.deadline:
            self.skipped.append(what)
            return {"skipped": "the time budget (--budget) was spent"}
        print(f"  {what} ...", flush=True)
        start = time.perf_counter()
        try:
            out = fn(*args)
        except Exception as err:
            self.errors.append(f"{what}: {type(err).__name__}: {err}")
            print(f"  {what} FAILED: {type(err).__name__}: {err}", file=sys.stderr)
            out = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        torch._dynamo.reset()  # the next compile starts as in a fresh process (and frees this)
        reset_memory(self.device)
        seconds = time.perf_counter() - start
        print(f"  {what}: {seconds:.1f} s", flush=True)
        return {**out, "config_seconds": seconds}


class StepWatch(L.Callback):
    """Inside a Lightning run, after ``warmup`` batches: each step's time (from batch start, the
    batch already sent to the device, to batch end: CUDA events on a GPU), the time from the first
    timed step's end to the last's (wall time on the device's timeline, the loader's waits
    included), and per batch the syncs and host reads of ``counter`` (a logging step and the one
    after it, where the reads after this hook land, are marked as in bench_host_syncs). The
    counter runs from the last warm-up batch's end (compiling is not counted); :meth:`close` it."""

    def __init__(self, warmup: int, counter: SyncCounter, device: torch.device) -> None:
        self.warmup, self.counter, self.cuda = warmup, counter, device.type == "cuda"
        self.counting = False
        self.clock = StepClock(device)
        self.sizes: list[int] = []
        self.per_batch: list[dict[str, Any]] = []
        self.compile: dict[str, dict[str, int]] = {}

    def _count(self) -> None:
        if not self.counting:
            self.counter.__enter__()
            self.counting = True

    def close(self) -> None:
        """Stop counting (restores the warning filters, the sync mode and the tensor methods)."""
        if self.counting:
            self.counter.__exit__(None, None, None)
            self.counting = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self._count()  # no-op unless there was no warm-up batch
            self.compile["at_warmup"] = dynamo_counts()
        if batch_idx >= self.warmup:
            self.sizes.append(batch[0].shape[0])
            self.clock.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.warmup - 1:
            self._count()
        if batch_idx < self.warmup:
            return
        self.clock.stop()
        syncs, reads = self.counter.mark()
        every = max(1, trainer.log_every_n_steps)
        logs = batch_idx % every in (0, every - 1)
        self.per_batch.append({"batch": batch_idx, "logs": logs, "syncs": syncs, "reads": reads})

    def on_train_end(self, trainer, pl_module) -> None:
        self.compile["at_end"] = dynamo_counts()
        self.close()

    def figures(self) -> dict[str, Any]:
        """Images/s over the wall time of all timed steps but the first (each with the wait for
        its batch), the share of that time the device spent in steps, the counts."""
        steps = self.clock.seconds()
        wall = self.clock.between_stops()
        plain = [b for b in self.per_batch if not b["logs"]]
        return {
            "images_per_second": sum(self.sizes[1:]) / wall,
            "busy_fraction": sum(steps[1:]) / wall,
            "step_ms_median": statistics.median(steps) * 1000,
            "wall_seconds": wall,
            "timed_steps": len(steps),
            "per_batch": self.per_batch,
            "cuda_syncs_per_plain_step": [b["syncs"] for b in plain] if self.cuda else None,
            "host_reads_per_plain_step": [b["reads"] for b in plain],
            "logging_steps": sum(b["logs"] for b in self.per_batch),
            "compile_after_warmup": difference(self.compile["at_end"], self.compile["at_warmup"]),
        }


def environment(gpus_per_node: int, device: torch.device) -> dict[str, Any]:
    """Device, versions and cores: what the figures depend on."""
    cuda = device.type == "cuda"
    try:
        dali = importlib.import_module("nvidia.dali").__version__
    except Exception:
        dali = None
    return {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "gpu_memory_gib": (
            torch.cuda.get_device_properties(device).total_memory / 2**30 if cuda else None
        ),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "timm": timm.__version__,
        "lightning": L.__version__,
        "heatssl": heatssl.__version__,
        "dali": dali,
        "cpu_cores": cores_per_process(1),
        "gpus_per_node": gpus_per_node,
        "cores_per_process": cores_per_process(gpus_per_node),
        "workers_per_process": auto_workers(gpus_per_node),
        "workers_whole_machine": auto_workers(1),
        "machine": machine(),
    }
