"""What every batch of the data layer must look like (shared by the data tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch


def check_batch(batch, batch_size: int, image_size: int, num_classes: int = 10) -> None:
    """Shapes, dtypes, value range and labels of one ``(images, labels, skipped)`` batch.

    Loaders give uint8 images (0..255); the model's normalisation runs on the device later.
    """
    images, labels, skipped = batch
    assert skipped == []
    assert images.shape == (batch_size, 3, image_size, image_size)
    assert images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels.shape == (batch_size,)
    assert images.float().std() > 25.0  # not a constant image
    assert labels.min() >= 0 and labels.max() < num_classes


def _run(settings, log, *extra, **env):
    entry = Path(__file__).parents[1] / "kill_entry.py"
    full = {**os.environ, "HEATSSL_STEP_LOG": str(log), **env}
    return subprocess.Popen(
        [sys.executable, str(entry), "pretrain", "-c", "demo", *settings, *extra],
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _steps(log) -> dict[int, str]:
    lines = log.read_text().split() if log.exists() else []
    return dict(zip(map(int, lines[::2]), lines[1::2], strict=True))


def check_sigterm_then_resume(tmp_path, settings: list[str], batches_per_epoch: int) -> None:
    """The documented rule for every source: SIGTERM during the third step of the first epoch, then
    ``--resume``, trains the remaining steps on the batches of an unbroken run, in its order;
    nothing skipped, nothing repeated (two epochs, no augmentation, batches logged by digest)."""
    settings = [*settings, "data.augment=none", "trainer.max_epochs=2"]
    unbroken = _run([*settings, f"run_dir={tmp_path / 'a'}"], tmp_path / "a.log")
    assert unbroken.wait(300) == 0, unbroken.stderr.read()[-3000:]
    reference = _steps(tmp_path / "a.log")
    assert len(reference) == 2 * batches_per_epoch

    log, run_dir = tmp_path / "b.log", tmp_path / "b"
    first = _run([*settings, f"run_dir={run_dir}"], log, HEATSSL_STEP_SLEEP="1")
    sleeping = Path(f"{log}.sleeping")
    deadline = time.monotonic() + 240
    while first.poll() is None and time.monotonic() < deadline:
        if sleeping.exists() and sleeping.read_text() == "2":
            break
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGTERM)
    assert first.wait(120) == 128 + signal.SIGTERM
    before = _steps(log)
    assert 0 < len(before) < batches_per_epoch
    resumed = _run([*settings, f"run_dir={run_dir}"], tmp_path / "c.log", "--resume")
    assert resumed.wait(300) == 0, resumed.stderr.read()[-3000:]
    after = _steps(tmp_path / "c.log")
    assert sorted(after) == list(range(len(before), 2 * batches_per_epoch))
    assert {**before, **after} == reference
