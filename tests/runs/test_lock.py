"""One run per run folder: a real second process is refused, stale locks are taken over, --force."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from heatssl.cli import main
from heatssl.runs.lock import LOCK_NAME, RunFolderBusy, RunLock
from tests.helpers import tiny_settings

ENTRY = Path(__file__).parents[1] / "kill_entry.py"


def _write_lock(run_dir: Path, age_s: float = 0.0, **holder) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    path.write_text(
        json.dumps({"host": socket.gethostname(), "command": "heatssl pretrain", **holder})
    )
    if age_s:
        then = time.time() - age_s
        os.utime(path, (then, then))
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_process_in_a_live_run_folder_is_refused_and_the_first_goes_on(tmp_path, capsys):
    run_dir, log = tmp_path / "run", tmp_path / "steps.log"
    settings = [*tiny_settings(run_dir), "trainer.max_epochs=2"]
    env = {
        **os.environ,
        "HEATSSL_STEP_LOG": str(log),
        "HEATSSL_STEP_SLEEP": "0.5",
        "PYTHONPATH": os.getcwd(),
    }
    first = subprocess.Popen(
        [sys.executable, str(ENTRY), "pretrain", "-c", "demo", *settings],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not log.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert log.exists(), first.stderr.read()[-3000:]

    assert main(["pretrain", "-c", "demo", *settings]) == 2  # a second run, same folder
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"process {first.pid} on host {socket.gethostname()}" in err
    assert "--force" in err

    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err[-3000:]  # the first run was not disturbed
    assert len(log.read_text().splitlines()) == 6  # every step, once
    assert not (run_dir / LOCK_NAME).exists()  # released at the end


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_note(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _write_lock(run_dir, pid=_dead_pid())
    assert main(["pretrain", "-c", "demo", *tiny_settings(run_dir)]) == 0
    err = capsys.readouterr().err
    assert "no longer exists on this host" in err
    assert not (run_dir / LOCK_NAME).exists()


def test_force_takes_a_live_holders_lock(tmp_path, capsys):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = _write_lock(run_dir, pid=holder.pid)
        assert main(["pretrain", "-c", "demo", *tiny_settings(run_dir)]) == 2
        assert f"process {holder.pid}" in capsys.readouterr().err
        assert json.loads(lock.read_text())["pid"] == holder.pid  # refused: untouched
        assert main(["pretrain", "-c", "demo", *tiny_settings(run_dir), "--force"]) == 0
        assert "forced with --force" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()


def test_another_hosts_lock_counts_as_left_when_its_heartbeat_is_old(tmp_path):
    run_dir = tmp_path / "run"
    _write_lock(run_dir, pid=1, host="node-elsewhere", age_s=10)
    with pytest.raises(RunFolderBusy, match="node-elsewhere"):
        RunLock(run_dir, stale_after_s=60).acquire()
    _write_lock(run_dir, pid=1, host="node-elsewhere", age_s=120)
    lock = RunLock(run_dir, stale_after_s=60).acquire()
    try:
        assert "heartbeat is 2 minutes old" in lock.note
        assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not (run_dir / LOCK_NAME).exists()


def test_a_requeued_slurm_job_takes_over_its_earlier_starts_lock(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    _write_lock(run_dir, pid=1, host="node-a", slurm_job="77", slurm_restart="0")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")  # the same start: a job started twice
    with pytest.raises(RunFolderBusy):
        RunLock(run_dir).acquire()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the requeued start
    with RunLock(run_dir) as lock:
        assert "earlier start of SLURM job 77" in lock.note


def test_the_heartbeat_refreshes_the_lock_while_the_run_lives(tmp_path):
    with RunLock(tmp_path, heartbeat_s=0.05) as lock:
        then = time.time() - 100
        os.utime(lock.path, (then, then))
        time.sleep(0.3)
        assert time.time() - lock.path.stat().st_mtime < 5
