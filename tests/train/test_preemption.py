"""SLURM preemption, for real on the CPU: two processes started as ``srun`` would start them (a faked
SLURM environment, gloo), a real SIGUSR1, a stand-in ``scontrol`` that records the requeue."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from heatssl.train.checkpoint import safe_torch_load
from tests.helpers import same_on_every_rank

ENTRY = Path(__file__).with_name("kill_entry.py")
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
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
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


def test_a_loader_worker_survives_the_signal_that_would_kill_it():
    """Without the ignore, SIGUSR1's default action ends a worker (and the run)."""
    code = (
        "import os, signal, time; from heatssl.data.sampler import seed_worker; seed_worker(0); "
        "os.kill(os.getpid(), signal.SIGUSR1); time.sleep(0.1); print('alive')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "alive"
    bare = subprocess.run(
        [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGUSR1)"]
    )
    assert bare.returncode == -signal.SIGUSR1
