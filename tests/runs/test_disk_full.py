"""A full disk while a checkpoint is written: the previous checkpoint stays, the run stops with the
folder and the space needed, and ``--resume`` continues once space is freed.

For real on a small tmpfs where this machine lets the tests mount one (root in a container), and
always with the write made to fail with ``ENOSPC``.
"""

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import heatssl.runs.checkpoints as checkpoint
from heatssl.cli import main
from heatssl.errors import DiskFullError
from heatssl.runs.checkpoints import atomic_torch_save, safe_torch_load
from tests.helpers import tiny_settings


def test_a_write_failing_with_enospc_keeps_the_previous_file_and_names_the_space(
    tmp_path, monkeypatch
):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": torch.tensor(1)}, path)
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if hasattr(f, "fileno"):  # a real file: write a little, then the disk is full
            f.write(b"x" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    big = {"weights": torch.zeros(512, 1024)}  # 2 MiB
    with pytest.raises(DiskFullError) as err:
        atomic_torch_save(big, path)
    message = str(err.value)
    assert f"no space left in {tmp_path} while writing last.ckpt: it needs 2.0 MB" in message
    assert "last.ckpt is unchanged (the previous checkpoint)" in message
    assert "--resume" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert int(safe_torch_load(path)["step"]) == 1


def test_another_write_error_is_not_called_a_full_disk(tmp_path, monkeypatch):
    def broken(obj, f, *args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(checkpoint.torch, "save", broken)
    with pytest.raises(OSError, match="Input/output error"):
        atomic_torch_save({"a": 1}, tmp_path / "x.ckpt")


@pytest.fixture
def small_fs(tmp_path):
    """A 24 MiB tmpfs, or a skip where mounting is not allowed."""
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the ENOSPC test covers it")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_real_full_disk_mid_run_keeps_last_ckpt_and_resume_continues(small_fs, capsys):
    run_dir = small_fs / "run"
    settings = [*tiny_settings(run_dir), "trainer.checkpoint_every_n_steps=1"]
    assert main(["pretrain", "-c", "demo", *settings]) == 0  # epoch 0: 3 steps
    last = run_dir / "checkpoints" / "last.ckpt"
    size = last.stat().st_size
    assert safe_torch_load(last)["global_step"] == 3

    # Fill the file system so that less than one checkpoint fits.
    free = shutil.disk_usage(small_fs).free
    filler = small_fs / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - size // 2))
    capsys.readouterr()
    more = [*settings, "trainer.max_epochs=2"]
    assert main(["pretrain", "-c", "demo", *more, "--resume"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith("heatssl: error: no space left in ")
    assert str(run_dir / "checkpoints") in err[0] and "MB are free" in err[0]
    assert safe_torch_load(last)["global_step"] == 3  # the previous checkpoint, intact
    assert not [p for p in last.parent.iterdir() if p.name.endswith(".tmp")]

    os.remove(filler)  # space freed: the same command continues
    assert main(["pretrain", "-c", "demo", *more, "--resume"]) == 0
    assert safe_torch_load(last)["global_step"] == 6
    assert not Path(run_dir / "run.lock").exists()
