"""Host reads of tensors per training step: each one makes the CPU wait for the GPU.

On a GPU, ``.item()``, ``.tolist()``, ``bool()``, ``int()``, ``float()`` and ``.numpy()`` of a device
tensor block until the device has caught up, so a training step that calls them cannot queue the
next step's work. This script counts those calls on the CPU: it wraps the methods of
``torch.Tensor`` and runs ``heatssl pretrain`` (the ``demo`` recipe on tiny settings, or any recipe
with overrides), counting the calls between the starts of consecutive training batches. Steps on
which the Trainer reads logs (every ``trainer.log_every_n_steps``, and the step after it, where the
reads made after the counter's own hook land) are counted apart. Where a GPU is
at hand, ``torch.cuda.set_sync_debug_mode("warn")`` shows the same syncs, with device-to-host
copies that cannot be counted from Python.

Usage::

    python scripts/bench_host_syncs.py --label after --out results/host_syncs.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import torch
from benchlib import machine

from heatssl.config import load_config
from heatssl.finetuning import finetune as finetuning
from heatssl.train import pretrain as run

READS = ("item", "tolist", "__bool__", "__int__", "__float__", "numpy")


class HostReads(L.Callback):
    """Counts the wrapped tensor reads made during each training batch."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.per_batch: list[dict[str, Any]] = []
        self._originals: dict[str, Any] = {}

    def install(self) -> None:
        """Wrap the read methods of torch.Tensor (undone by :meth:`remove`)."""
        for name in READS:
            original = getattr(torch.Tensor, name)
            self._originals[name] = original

            def counted(tensor: torch.Tensor, *args: Any, _name: str = name, _f: Any = original):
                self.calls[_name] += 1
                return _f(tensor, *args)

            setattr(torch.Tensor, name, counted)

    def remove(self) -> None:
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Record the reads since the previous batch ended (later callbacks' reads of a batch
        land in the next record, so every read is counted once)."""
        every = max(1, trainer.log_every_n_steps)
        logs = batch_idx % every in (0, every - 1)  # a logging step or the one right after it
        self.per_batch.append({"step": trainer.global_step, "logs": logs, **self.calls})
        self.calls.clear()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-c", "--config", default="demo")
    p.add_argument(
        "--task",
        choices=["pretrain", "finetune"],
        default="pretrain",
        help="count heatssl pretrain's steps or heatssl finetune's (from random init)",
    )
    p.add_argument("--steps", type=int, default=24, help="training batches (after one warm-up)")
    p.add_argument("--log-every", type=int, default=8, help="trainer.log_every_n_steps")
    p.add_argument("--label", default="run")
    p.add_argument("--out", default="results/host_syncs.json")
    p.add_argument("overrides", nargs="*", help="more key=value overrides")
    args = p.parse_args(argv)
    if args.steps < 2 or args.log_every < 1:
        p.error("--steps must be >= 2 and --log-every >= 1")
    return args


def count(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """Pretrain for ``--steps`` batches with the counter installed; per-step figures."""
    overrides = [
        f"run_dir={run_dir}",
        "model.backbone=test_resnet",
        "model.output_stride=8",
        "data.name=synthetic",
        f"data.synthetic_size={8 * (args.steps + 1)}",
        "data.val_fraction=0",
        "data.image_size=32",
        "data.batch_size=8",
        "data.num_workers=1",  # decoding and augmenting (CPU work, not syncs) in another process
        "decoder.width=16",
        "trainer.max_epochs=1",
        f"trainer.log_every_n_steps={args.log_every}",
        "trainer.checkpoint_every_n_minutes=30",
        "trainer.picture_every_n_epochs=0",
        "finetune.epochs=1",
        f"finetune.out_dir={run_dir / 'finetune'}",
        *args.overrides,
    ]
    cfg = load_config(args.config, overrides)
    counter = HostReads()
    counter.install()
    try:
        if args.task == "pretrain":
            run.pretrain(cfg, callbacks=[counter])
        else:
            finetuning.finetune(cfg.model.backbone, cfg, callbacks=[counter])
    finally:
        counter.remove()
    batches = counter.per_batch[1:]  # the first batch builds and warms up
    totals = [sum(b.get(r, 0) for r in READS) for b in batches]
    plain = [t for t, b in zip(totals, batches, strict=True) if not b["logs"]]
    logged = [t for t, b in zip(totals, batches, strict=True) if b["logs"]]
    return {
        "overrides": overrides,
        "per_batch": batches,
        "reads_per_step_median": statistics.median(plain) if plain else None,
        "reads_per_step_max": max(plain) if plain else None,
        "reads_per_logging_step_median": statistics.median(logged) if logged else None,
        "reads_per_step_mean_all": statistics.fmean(totals),
    }


def main(argv: list[str] | None = None) -> int:
    """Count, print and merge the result into the JSON under ``--label``."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="heatssl_syncs_") as tmp:
        result = count(args, Path(tmp) / "run")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = json.loads(out.read_text()) if out.is_file() else {"runs": {}}
    report["runs"][args.label if args.task == "pretrain" else f"{args.label} ({args.task})"] = {
        **result,
        "machine": machine(),
        "args": vars(args),
    }
    out.write_text(json.dumps(report, indent=2))
    print(
        f"[{args.label}] host reads per training step: median {result['reads_per_step_median']}, "
        f"max {result['reads_per_step_max']}; on logging steps (every {args.log_every}): median "
        f"{result['reads_per_logging_step_median']}; mean over all {result['reads_per_step_mean_all']:.2f}"
    )
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
