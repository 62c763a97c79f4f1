"""Checkpoint writes survive a kill: the target path holds the old checkpoint or the new, never half."""

import signal
import subprocess
import sys
import textwrap

import torch

from heatssl.checkpoint_io import AtomicCheckpointIO, atomic_torch_save

# A child process writes a good checkpoint, then a second one whose write stalls halfway (the bytes
# written so far are flushed to the file); the parent kills it there with SIGKILL.
CHILD = textwrap.dedent(
    """
    import io, sys, time, torch
    import heatssl.checkpoint_io as cio

    path = sys.argv[1]
    cio.AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.ones(100_000)}, path)

    real_save = torch.save

    def stalling_save(obj, f):
        buf = io.BytesIO()
        real_save(obj, buf)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        print("half written", flush=True)
        time.sleep(120)
        f.write(data[len(data) // 2 :])

    cio.torch.save = stalling_save
    cio.AtomicCheckpointIO().save_checkpoint({"step": 2, "w": torch.zeros(100_000)}, path)
    """
)


def test_a_kill_mid_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "half written"
        partial = [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
        assert partial and partial[0].stat().st_size > 0  # the new file was really half written
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.ones(100_000))


def test_atomic_save_replaces_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "a.ckpt"
    atomic_torch_save({"step": 1}, path)
    AtomicCheckpointIO().save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.ckpt"]
