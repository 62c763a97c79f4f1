"""No work lost to a file name, a picture, a run of bad files, a lock race or a refused resume."""

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from heatssl.cli import main
from heatssl.config import load_config
from heatssl.runs.lock import LOCK_NAME, RunFolderBusy, RunLock
from heatssl.train import pretrain as run
from heatssl.train.pictures import ReconstructionPictures
from tests.helpers import tiny_settings


def _folder(root: Path, good: int = 12, bad_names: tuple[bytes, ...] = ()) -> Path:
    for split, count in (("train", good), ("val", 2)):
        for cls in ("a", "b"):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.new("RGB", (16, 16), (i * 20, 30, 60)).save(folder / f"{i:02d}.png")
    for name in bad_names:
        with open(os.path.join(os.fsencode(root / "train" / "a"), name), "wb") as f:
            f.write(b"not an image")
    return root


def _imagefolder(root, tmp_path, *extra):
    return [
        *tiny_settings(tmp_path / "run"),
        "data.name=imagefolder",
        f"data.root={root}",
        "data.batch_size=4",
        *extra,
    ]


def test_a_file_name_that_is_not_utf8_does_not_stop_the_run(tmp_path):
    """bad_images.txt was opened as strict UTF-8: every epoch end failed before its checkpoint."""
    root = _folder(tmp_path / "data", bad_names=(b"caf\xe9.png",))
    result = run.pretrain(load_config("demo", _imagefolder(root, tmp_path, "trainer.max_epochs=2")))
    assert result.global_step > 0 and (result.run_dir / "checkpoints" / "epoch001.ckpt").is_file()
    assert "caf" in (result.run_dir / "bad_images.txt").read_text(errors="replace")


def test_a_failing_picture_leaves_the_checkpoint_and_says_so_in_one_line(
    tmp_path, monkeypatch, capsys
):
    def broken(self, pl_module, epoch):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ReconstructionPictures, "draw", broken)
    result = run.pretrain(
        load_config("demo", [*tiny_settings(tmp_path / "run"), "trainer.max_epochs=2"])
    )
    assert (result.run_dir / "checkpoints" / "epoch001.ckpt").is_file()
    err = capsys.readouterr().err
    assert err.count("reconstruction picture") == 2 and "No space left" in err


def test_more_than_64_unreadable_files_in_a_row_are_all_skipped(tmp_path):
    """64 or more in a row stopped the run with BadImageError even with on_bad_image=skip."""
    root = _folder(
        tmp_path / "data", good=6, bad_names=tuple(f"0{i:03d}.png".encode() for i in range(80))
    )
    cfg = load_config("demo", _imagefolder(root, tmp_path, "data.on_bad_image=skip"))
    result = run.pretrain(cfg)
    skipped = (result.run_dir / "bad_images.txt").read_text().splitlines()
    assert result.global_step > 0 and len({line.split(":")[0] for line in skipped}) >= 64


def _claim(path: str, results) -> None:
    try:
        lock = RunLock(path, stale_after_s=0.0).acquire()
    except RunFolderBusy:
        results.put("refused")
        return
    results.put("won")
    time.sleep(1.0)
    lock.release()


def test_three_processes_on_a_stale_lock_leave_one_winner(tmp_path):
    """Taking over a stale lock was read-decide-replace: two of three won in 5 of 30 trials."""
    ctx = mp.get_context("fork")
    for trial in range(10):
        folder = tmp_path / f"run{trial}"
        folder.mkdir()
        (folder / LOCK_NAME).write_text(
            json.dumps({"pid": 999_999_999, "host": os.uname().nodename})
        )
        results = ctx.Queue()
        procs = [ctx.Process(target=_claim, args=(str(folder), results)) for _ in range(3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        outcomes = sorted(results.get(timeout=5) for _ in procs)
        assert outcomes == ["refused", "refused", "won"], (trial, outcomes)


def test_a_suspended_process_keeps_its_lock(tmp_path):
    """The age rule took the lock from a live but stopped (SIGSTOP) process on the same host."""
    code = (
        "import sys, time\nfrom heatssl.runs.lock import RunLock\n"
        f"RunLock({str(tmp_path)!r}, heartbeat_s=0.05).acquire()\nprint('held', flush=True)\n"
        "time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        os.kill(holder.pid, signal.SIGSTOP)
        old = time.time() - 3600
        os.utime(tmp_path / LOCK_NAME, (old, old))
        with pytest.raises(RunFolderBusy, match=str(holder.pid)):
            RunLock(tmp_path, stale_after_s=1.0).acquire()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()


def test_a_refused_resume_leaves_the_runs_config_as_it_was(tmp_path, capsys):
    first = load_config("demo", tiny_settings(tmp_path / "run"))
    run.pretrain(first)
    config = tmp_path / "run" / "config.yaml"
    before = config.read_text()
    (tmp_path / "run" / "checkpoints" / "broken.ckpt").write_bytes(b"PK\x03\x04 cut short")
    args = ["pretrain", "-c", "demo", *tiny_settings(tmp_path / "run"), "seed=7"]
    assert main([*args, f"--resume={tmp_path / 'run' / 'checkpoints' / 'broken.ckpt'}"]) == 2
    assert config.read_text() == before
