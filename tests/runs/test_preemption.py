"""Signals, for real on the CPU. SLURM preemption: two processes started as ``srun`` would start them
(a faked SLURM environment, gloo), a real SIGUSR1, a stand-in ``scontrol`` that records the requeue.
Ctrl-C and SIGTERM: a real signal to a real ``heatssl pretrain`` process group, then ``--resume``."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from heatssl.runs.checkpoints import safe_torch_load
from tests.helpers import same_on_every_rank, tiny_settings

ENTRY = Path(__file__).parents[1] / "kill_entry.py"
SRUN_TIMEOUT_S = 240  # a job step runs in about 30 s alone; a stall fails instead of hanging
STEPS = 9  # 48 images, 8 per process and step, 2 processes: 3 steps per epoch, 3 epochs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(run_dir: Path) -> list[str]:
    return [
        *same_on_every_rank(run_dir),
        "data.synthetic_size=48",
        "data.batch_size=8",
        "data.num_workers=1",
        "trainer.max_epochs=3",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.log_every_n_steps=1",
    ]


def _srun(
    tmp: Path, run_dir: Path, log: Path, rank1_run_dir: Path | None = None, **env: str
) -> list[subprocess.CompletedProcess]:
    """Both SLURM tasks of a job step, each in its own session, as srun starts them.

    ``rank1_run_dir``: process 1 sees another run folder (as on a node-local disk).
    """
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\n')
    scontrol.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    base.update(
        SLURM_NTASKS="2",
        SLURM_NTASKS_PER_NODE="2",
        SLURM_NNODES="1",
        SLURM_NODEID="0",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="heatssl-test",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        SCONTROL_LOG=str(tmp / "scontrol.log"),
        HEATSSL_STEP_LOG=str(log),
        OMP_NUM_THREADS="1",
        **env,
    )
    command = [sys.executable, str(ENTRY), "pretrain", "-c", "demo", *_overrides(run_dir)]
    own = {0: [], 1: [f"run_dir={rank1_run_dir}"] if rank1_run_dir else []}
    procs = [
        subprocess.Popen(
            [*command, *own[rank], "--resume=auto"],
            env={**base, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for rank in (0, 1)
    ]
    deadline = time.monotonic() + SRUN_TIMEOUT_S
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    except subprocess.TimeoutExpired:
        # a stalled rank must fail the test with what both printed, not hang the suite
        tails = []
        for rank, proc in enumerate(procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            tails.append(f"--- rank {rank} (exit {proc.returncode}) stderr:\n{err[-2500:]}")
        pytest.fail(f"the job step did not end in {SRUN_TIMEOUT_S} s:\n" + "\n".join(tails))
    return done


def _steps(log: Path) -> list[int]:
    return [int(line.split()[0]) for line in log.read_text().splitlines()]


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory) -> dict[str, torch.Tensor]:
    tmp = tmp_path_factory.mktemp("unbroken")
    for proc in _srun(tmp, tmp / "run", tmp / "steps.log"):
        assert proc.returncode == 0, proc.stderr[-3000:]
    last = safe_torch_load(tmp / "run" / "checkpoints" / "last.ckpt")
    assert last["global_step"] == STEPS
    assert not (tmp / "scontrol.log").exists()  # no signal, no requeue
    return last["state_dict"]


@pytest.mark.parametrize("target", ["process", "group"])
def test_sigusr1_saves_every_rank_at_one_step_requeues_and_resumes_to_the_same_weights(
    tmp_path, unbroken, target
):
    """SIGUSR1 to process 0 only (``process``), or to its whole process group with its loader
    worker (``group``): both processes stop after the same step, ``last.ckpt`` holds that step,
    process 0 alone calls ``scontrol requeue``, and the requeued run (``--resume=auto``) ends with
    the weights of a run that was never interrupted."""
    run_dir, log = tmp_path / "run", tmp_path / "steps.log"
    first = _srun(tmp_path, run_dir, log, HEATSSL_SIGNAL_AT_STEP="4", HEATSSL_SIGNAL_TARGET=target)
    for proc in first:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "preemption signal: saved" in proc.stderr
    assert (tmp_path / "scontrol.log").read_text().splitlines() == ["requeue 4242"]
    saved = safe_torch_load(run_dir / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 5  # the signal came as step 4 began; saved after it
    ranks = [_steps(Path(f"{log}.rank{r}")) for r in (0, 1)]
    assert ranks[0] == ranks[1] == list(range(5))  # both trained exactly steps 0..4

    # the requeued job; process 1 sees an empty folder: process 0's choice still holds for both
    elsewhere = tmp_path / "node_local"
    second = _srun(tmp_path, run_dir, tmp_path / "resumed.log", rank1_run_dir=elsewhere)
    for proc in second:
        assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        assert _steps(Path(f"{tmp_path / 'resumed.log'}.rank{rank}")) == list(range(5, STEPS))
    final = safe_torch_load(run_dir / "checkpoints" / "last.ckpt")
    assert final["global_step"] == STEPS
    for key, value in unbroken.items():
        assert torch.allclose(final["state_dict"][key].float(), value.float(), atol=1e-5), key


@pytest.mark.parametrize("name", ["SIGUSR1", "SIGINT", "SIGTERM"])
def test_a_loader_worker_survives_the_signal_that_would_kill_it(name):
    """Without the ignore, the signal's default action ends a worker (and the run)."""
    # both start from the default action: a shell's background job inherits SIGINT ignored
    default = f"import os, signal, time; signal.signal(signal.{name}, signal.SIG_DFL); "
    code = (
        f"{default}from heatssl.data.sampler import seed_worker; seed_worker(0); "
        f"os.kill(os.getpid(), signal.{name}); time.sleep(0.1); print('alive')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "alive"
    bare = subprocess.run(
        [sys.executable, "-c", f"{default}os.kill(os.getpid(), signal.{name}); time.sleep(0.1)"],
        capture_output=True,
    )
    assert bare.returncode == -getattr(signal, name)


def _one_process_run(tmp: Path, run_dir: Path, log: Path, *extra: str, **env: str):
    """``heatssl pretrain`` in its own session (as a terminal's foreground job), logging steps."""
    overrides = [
        *(s for s in tiny_settings(run_dir) if s != "data.num_workers=0"),
        "data.num_workers=1",  # a loader worker in the process group, as in a real run
        "data.augment=none",  # no random draw in the transform: checksums compare batches
        "trainer.max_epochs=2",  # 3 steps per epoch (24 train images, batch 8)
    ]
    command = [sys.executable, str(ENTRY), "pretrain", "-c", "demo", *overrides, *extra]
    full_env = {**os.environ, "HEATSSL_STEP_LOG": str(log), "PYTHONPATH": os.getcwd(), **env}
    return subprocess.Popen(
        command,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _checksums(log: Path) -> dict[int, float]:
    lines = log.read_text().split() if log.exists() else []
    return {int(s): float(c) for s, c in zip(lines[::2], lines[1::2], strict=True)}


@pytest.fixture(scope="module")
def unbroken_one(tmp_path_factory) -> tuple[dict[int, float], dict[str, torch.Tensor]]:
    tmp = tmp_path_factory.mktemp("unbroken_one")
    proc = _one_process_run(tmp, tmp / "run", tmp / "steps.log")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    last = safe_torch_load(tmp / "run" / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 6
    return _checksums(tmp / "steps.log"), last["state_dict"]


def _wait_for_steps(log: Path, proc: subprocess.Popen, steps: int) -> None:
    deadline = time.monotonic() + 240
    while len(_checksums(log)) < steps and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_checksums(log)) >= steps, proc.stderr.read()[-3000:] if proc.poll() else "slow"


@pytest.mark.parametrize(
    ("sig", "at"),
    [(signal.SIGINT, 1), (signal.SIGTERM, 1), (signal.SIGINT, 2)],
    ids=["SIGINT", "SIGTERM", "SIGINT-last-step-of-an-epoch"],
)
def test_ctrl_c_or_sigterm_saves_last_stops_and_resume_continues_on_the_same_data(
    tmp_path, unbroken_one, sig, at
):
    """The signal goes to the whole process group (as Ctrl-C in a terminal; a scheduler's SIGTERM
    reaches every process too), loader worker included: the run finishes the step in flight, saves
    ``last.ckpt`` at it, exits 128 + signal with the resume command, and ``--resume`` trains the
    remaining steps on the unbroken run's batches and ends with its weights."""
    run_dir, log = tmp_path / "run", tmp_path / "steps.log"
    proc = _one_process_run(tmp_path, run_dir, log, HEATSSL_STEP_SLEEP="2")
    sleeping = Path(f"{log}.sleeping")
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if sleeping.exists() and sleeping.read_text() == str(at):
            break  # step `at` sleeps before training: 1 is mid-epoch, 2 the epoch's last
        time.sleep(0.05)
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in err
    stopped = [line for line in err.splitlines() if line.startswith("heatssl: stopped:")]
    assert len(stopped) == 1 and "saved" in stopped[0]
    assert f"heatssl pretrain -c {run_dir / 'config.yaml'} --resume" in stopped[0]
    before = _checksums(log)
    saved = safe_torch_load(run_dir / "checkpoints" / "last.ckpt")
    # right after the step in flight; after the epoch's last step, after the next one (the
    # epoch's own end runs first, as in an unbroken run)
    assert saved["global_step"] == len(before) == (at + 2 if at == 2 else at + 1)

    resumed_log = tmp_path / "resumed.log"
    again = _one_process_run(
        tmp_path, run_dir, resumed_log, "--resume", "-c", str(run_dir / "config.yaml")
    )
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    after = _checksums(resumed_log)
    assert sorted(after) == list(range(len(before), 6))  # only the steps the checkpoint lacked
    reference, weights = unbroken_one
    assert {**before, **after} == pytest.approx(reference, rel=1e-9)  # same batches, in order
    final = safe_torch_load(run_dir / "checkpoints" / "last.ckpt")
    assert final["global_step"] == 6
    for key, value in weights.items():
        assert torch.allclose(final["state_dict"][key].float(), value.float(), atol=1e-5), key


def test_a_second_ctrl_c_stops_at_once_without_saving(tmp_path):
    """Two Ctrl-Cs within one (slow) step: no checkpoint is written for it, exit 130, one line."""
    run_dir, log = tmp_path / "run", tmp_path / "steps.log"
    proc = _one_process_run(tmp_path, run_dir, log, HEATSSL_STEP_SLEEP="4")
    sleeping = Path(f"{log}.sleeping")
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if sleeping.exists() and sleeping.read_text() == "1":
            break  # step 0 trained (nothing saved: mid-epoch); step 1 sleeps 4 s before training
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert "a second time: stopped at once, without saving" in err
    assert not (run_dir / "checkpoints" / "last.ckpt").exists()  # nothing saved mid-epoch 0


_COMPILE_POOL = """
import signal, sys
from torch._inductor.async_compile import AsyncCompile
from heatssl.runs.preemption import start_compile_workers
signal.signal(signal.SIGUSR1, lambda *a: None)  # the run's own handler (SignalCheckpoint)
start_compile_workers()
assert signal.getsignal(signal.SIGUSR1) is not signal.SIG_IGN  # this process still listens
print(AsyncCompile.process_pool().process.pid)
"""


def test_compile_workers_ignore_the_preemption_signal(tmp_path):
    """SLURM's SIGUSR1 reaches the compile workers too, whose default action is to die: the sbatch
    script compiled in one thread because of it. They are started with the signal ignored."""
    env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "2"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _COMPILE_POOL + "sys.stdin.read()"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        pid = int(proc.stdout.readline())
        status = Path(f"/proc/{pid}/status").read_text()
        ignored = int(
            next(x for x in status.splitlines() if x.startswith("SigIgn:")).split()[1], 16
        )
        assert ignored & (1 << (signal.SIGUSR1 - 1)), status
    finally:
        proc.communicate("", timeout=60)
    assert proc.returncode == 0
