"""Checkpoints on disk: a kill mid-write keeps the previous file; files needing pickle are refused."""

import argparse
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from heatssl.cli import main
from heatssl.config import load_config
from heatssl.errors import CheckpointError
from heatssl.train import run
from heatssl.train.checkpoint import (
    AtomicCheckpointIO,
    atomic_torch_save,
    safe_torch_load,
    trusted_checkpoints,
)

# A child process writes a good checkpoint, then a second one whose write stalls halfway (the bytes
# written so far are flushed to the file); the parent kills it there with SIGKILL.
CHILD = textwrap.dedent(
    """
    import io, sys, time, torch
    import heatssl.train.checkpoint as cio

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


def test_a_checkpoint_that_needs_pickle_is_refused_unless_trusted(tiny_overrides, capsys):
    cfg = load_config("demo", tiny_overrides)
    ckpt = run.pretrain(cfg).last_checkpoint
    data = torch.load(ckpt, weights_only=True)
    data["hyper_parameters"]["extra"] = argparse.Namespace(note="a pickled object")
    torch.save(data, ckpt)

    assert main(["export", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "pickled Python objects" in err and "--trust-checkpoint" in err
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        run.pretrain(cfg, resume="last")  # resuming reads the same file: refused too

    assert main(["export", str(ckpt), "--trust-checkpoint"]) == 0  # the explicit opt-in
    with trusted_checkpoints():
        assert safe_torch_load(ckpt)["hyper_parameters"]["extra"].note == "a pickled object"
    with pytest.raises(CheckpointError):
        safe_torch_load(ckpt)  # the opt-in ends with its block
