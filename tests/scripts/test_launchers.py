"""The GPU launch scripts: what their --dry-run resolves for given GPUS / NODES / BATCH variables.

A dry run prints the command and the resolved config without running anything, so these tests check
on a CPU what a GPU node would launch.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import SCRIPTS

HEATSSL = str(Path(sys.executable).with_name("heatssl"))


def _dry(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CUDA_VISIBLE"))}
    environ.update(HEATSSL=HEATSSL, **env)
    return subprocess.run(
        ["bash", str(SCRIPTS / script), *args, "--dry-run"],
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_pretrain_dry_run_on_four_gpus():
    out = _dry(
        "pretrain.sh", "imagenet_resnet50", "data.root=/data", GPUS="4", BATCH="64", ACCUM="2"
    )
    assert out.returncode == 0, out.stderr
    command = next(line for line in out.stdout.splitlines() if line.startswith("+ "))
    for part in (
        "pretrain -c imagenet_resnet50",
        "trainer.accelerator=gpu",
        "trainer.devices=4",
        "trainer.strategy=ddp",
        "trainer.precision=bf16-mixed",
        "trainer.channels_last=true",
        "trainer.accumulate_grad_batches=2",
        "data.batch_size=64",
        "data.root=/data",
    ):
        assert part in command
    assert "torchrun" not in command  # one node: Lightning starts the processes
    # 64 x 4 GPUs x 1 node x 2 accumulation = 512; lr = 1.5e-4 x 512 / 256
    assert (
        "effective batch 512 = 64 per device x 4 devices x 1 nodes x 2 accumulation" in out.stdout
    )
    assert "lr 0.0003 = base_lr 0.00015 x 512 / 256" in out.stdout
    assert "precision: bf16-mixed" in out.stdout  # the resolved config follows


def test_pretrain_dry_run_multi_node_uses_torchrun():
    out = _dry("pretrain.sh", "imagenet_vit_small", GPUS="8", NODES="2", MASTER_ADDR="node0")
    assert out.returncode == 0, out.stderr
    assert "torchrun --nnodes=2 --nproc_per_node=8" in out.stdout
    assert "--master_addr=node0" in out.stdout
    assert "x 8 devices x 2 nodes" in out.stdout
    assert "data.num_workers=auto" in out.stdout  # each process uses its share of the cores


def test_pretrain_dry_run_without_gpu_runs_on_cpu():
    out = _dry("pretrain.sh", "demo", GPUS="0", WORKERS="1")
    assert out.returncode == 0, out.stderr
    assert "trainer.accelerator=cpu trainer.devices=1" in out.stdout
    assert "trainer.precision=32-true" in out.stdout and "channels_last=true" not in out.stdout
    assert "data.num_workers=1" in out.stdout


@pytest.mark.parametrize(
    ("env", "message"),
    [({"GPUS": "two"}, "GPUS=two must be a whole number"), ({"BATCH": "0"}, "BATCH")],
)
def test_bad_variables_are_refused(env, message):
    out = _dry("pretrain.sh", "demo", **env)
    assert out.returncode == 2 and message in out.stderr


def test_multi_node_without_master_addr_is_refused():
    environ = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR",)}
    environ.update(GPUS="2", NODES="2", HEATSSL=HEATSSL)
    out = subprocess.run(
        ["bash", str(SCRIPTS / "pretrain.sh"), "demo"], env=environ, capture_output=True, text=True
    )
    assert out.returncode == 2 and "MASTER_ADDR" in out.stderr


def test_linear_eval_and_heatmaps_dry_runs():
    out = _dry("linear_eval.sh", "resnet18", "-c", "imagenette", GPUS="2", BATCH="512")
    assert out.returncode == 0, out.stderr
    assert "probe resnet18" in out.stdout and "probe.batch_size=512" in out.stdout
    assert "CUDA_VISIBLE_DEVICES=0" in out.stdout  # one GPU: heads train on cached features
    assert "batch_size: 512" in out.stdout
    out = _dry("heatmaps.sh", "run/last.ckpt", "--head", "h.safetensors", GPUS="0", WORKERS="2")
    assert out.returncode == 0, out.stderr
    assert "heatmaps run/last.ckpt data.num_workers=2 --head h.safetensors" in out.stdout


def test_finetune_dry_run_on_four_gpus_keeps_the_users_overrides():
    out = _dry(
        "finetune.sh",
        "resnet18",
        "-c",
        "imagenette",
        "data.label_fraction=0.1",
        GPUS="4",
        BATCH="96",
    )
    assert out.returncode == 0, out.stderr
    assert "finetune resnet18 trainer.accelerator=gpu trainer.devices=4" in out.stdout
    assert "trainer.strategy=ddp" in out.stdout and "data.batch_size=96" in out.stdout
    assert "label_fraction: 0.1" in out.stdout and "recipe: cnn" in out.stdout


def test_scripts_without_arguments_print_usage():
    for script in ("pretrain.sh", "linear_eval.sh", "heatmaps.sh", "finetune.sh"):
        out = subprocess.run(["bash", str(SCRIPTS / script)], capture_output=True, text=True)
        assert out.returncode == 2 and "usage:" in out.stderr


def test_the_sbatch_script_survives_requeues_as_documented():
    text = (SCRIPTS / "slurm_pretrain.sbatch").read_text()
    directives = [ln for ln in text.splitlines() if ln.startswith("#SBATCH")]
    assert "#SBATCH --signal=SIGUSR1@120" in directives  # every process of the step, not B:
    assert "#SBATCH --requeue" in directives and "#SBATCH --open-mode=append" in directives
    assert "export SRUN_CPUS_PER_TASK=" in text  # srun no longer inherits --cpus-per-task
    assert "--resume=auto" in text
    assert subprocess.run(["bash", "-n", str(SCRIPTS / "slurm_pretrain.sbatch")]).returncode == 0
