"""Run folders: pretraining end to end, resume, export from a checkpoint."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import timm
import torch

from heatssl.config import ConfigError, load_config
from heatssl.data.datamodule import build_datamodule
from heatssl.errors import ArgumentError, CheckpointError, NonFiniteLossError
from heatssl.runs.checkpoints import safe_torch_load
from heatssl.runs.exports import export_checkpoint
from heatssl.runs.layout import RunLayout
from heatssl.runs.resume import resolve_resume
from heatssl.runs.sources import (
    backbone_from_checkpoint,
    qbheat_from_checkpoint,
    read_export_metadata,
)
from heatssl.runs.trainer import launch_plan, planned_devices
from heatssl.train import pretrain as run
from tests.helpers import tiny_settings


def test_pretrain_writes_a_complete_run_folder(tiny_overrides):
    cfg = load_config("demo", tiny_overrides)
    result = run.pretrain(cfg)
    folder = result.run_dir
    train_images = len(build_datamodule(cfg.data).train_dataset)
    assert result.global_step == train_images // 8  # one optimiser step per full batch
    assert load_config(folder / "config.yaml").to_dict() == cfg.to_dict()  # repeatable
    assert (folder / "checkpoints" / "last.ckpt").is_file()
    assert (folder / "pictures" / "reconstruction_epoch001.png").stat().st_size > 1000
    rows = list(csv.DictReader((folder / "metrics.csv").open()))
    logged = {k for row in rows for k, v in row.items() if v}
    assert {"train/loss", "train/rec", "train/heat", "train/commute"} <= logged
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize(("keep", "kept"), [(1, ["epoch002.ckpt"]), (0, []), (2, None)])
def test_only_the_newest_epoch_checkpoints_are_kept(tiny_overrides, keep, kept):
    """trainer.keep_checkpoints: older epoch files go as newer ones come; last.ckpt stays."""
    overrides = [*tiny_overrides, "trainer.max_epochs=3", f"trainer.keep_checkpoints={keep}"]
    if kept is None:  # resuming keeps counting the files the first part wrote
        run.pretrain(load_config("demo", [*overrides, "trainer.max_epochs=2"]))
        result = run.pretrain(load_config("demo", overrides), resume="last")
        kept = ["epoch001.ckpt", "epoch002.ckpt"]
    else:
        result = run.pretrain(load_config("demo", overrides))
    files = sorted(p.name for p in (result.run_dir / "checkpoints").iterdir())
    assert files == sorted([*kept, "last.ckpt"])
    last = safe_torch_load(result.run_dir / "checkpoints" / "last.ckpt")
    assert last["global_step"] == result.global_step  # the newest state is never deleted
    assert load_config("demo").trainer.keep_checkpoints == 0  # the demo keeps only last.ckpt


def test_resume_continues_the_step_count(tiny_overrides):
    first = run.pretrain(load_config("demo", tiny_overrides))
    resumed = run.pretrain(
        load_config("demo", [*tiny_overrides, "trainer.max_epochs=2"]), resume="last"
    )
    assert resumed.global_step == 2 * first.global_step
    assert (resumed.run_dir / "checkpoints" / "epoch001.ckpt").is_file()


def test_resume_without_checkpoint_is_refused(tiny_overrides):
    with pytest.raises(ConfigError, match="no checkpoint"):
        run.pretrain(load_config("demo", tiny_overrides), resume="last")


def test_export_from_checkpoint_matches_the_trained_backbone(tiny_overrides, tmp_path):
    result = run.pretrain(load_config("demo", tiny_overrides))
    out = export_checkpoint(result.last_checkpoint, tmp_path / "b.safetensors")
    trained = backbone_from_checkpoint(result.last_checkpoint).eval()
    meta = read_export_metadata(out)
    plain = timm.create_model(
        "test_resnet",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(out)),
        **meta["create_kwargs"],
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = trained(x)
        got = plain.forward_intermediates(x, indices=[-1], intermediates_only=True)[0]
    torch.testing.assert_close(got, ref)
    # training changed the weights: a fresh model gives other features
    fresh = timm.create_model("test_resnet", **meta["create_kwargs"]).eval()
    with torch.no_grad():
        assert not torch.allclose(
            fresh.forward_intermediates(x, indices=[-1], intermediates_only=True)[0], ref
        )


def test_online_probe_is_logged_and_checkpoints_still_load(tiny_overrides):
    cfg = load_config("demo", [*tiny_overrides, "probe.online=true", "trainer.max_epochs=2"])
    result = run.pretrain(cfg)
    rows = list(csv.DictReader((result.run_dir / "metrics.csv").open()))
    val = [float(r["online/val_top1"]) for r in rows if r.get("online/val_top1")]
    train = [float(r["online/train_top1"]) for r in rows if r.get("online/train_top1")]
    assert len(val) == 2 and len(train) == 2  # once per epoch each
    assert all(0.0 <= v <= 1.0 for v in val + train)
    backbone = backbone_from_checkpoint(result.last_checkpoint)  # online head in the state
    assert backbone.name == "test_resnet"


def test_resume_auto_starts_afresh_then_continues(tiny_overrides):
    cfg = load_config("demo", tiny_overrides)
    assert resolve_resume(cfg, "auto") is None  # nothing yet: a first start, no error
    first = run.pretrain(cfg, resume="auto")
    assert resolve_resume(cfg, "auto") == str(first.last_checkpoint)
    cfg2 = load_config("demo", [*tiny_overrides, "trainer.max_epochs=2"])
    assert run.pretrain(cfg2, resume="auto").global_step == 2 * first.global_step


def test_launch_plan_states_effective_batch_and_lr():
    cfg = load_config(
        "demo",
        [
            "trainer.devices=4",
            "trainer.num_nodes=2",
            "trainer.accumulate_grad_batches=2",
            "data.batch_size=32",
            "optim.base_lr=1e-3",
        ],
    )
    plan = launch_plan(cfg)
    assert "effective batch 512 = 32 per device x 4 devices x 2 nodes x 2 accumulation" in plan
    assert "lr 0.002 = base_lr 0.001 x 512 / 256" in plan
    assert planned_devices(load_config("demo", ["trainer.devices=0,1,3"])) == 3
    assert planned_devices(load_config("demo", ["trainer.devices=auto"])) == 1  # no GPU here


def test_sync_batchnorm_without_gpu_is_refused(tiny_overrides):
    cfg = load_config("demo", [*tiny_overrides, "trainer.sync_batchnorm=true"])
    with pytest.raises(ConfigError, match="sync_batchnorm=false"):
        run.pretrain(cfg)


def test_loader_benchmark_counts_images(tiny_overrides):
    cfg = load_config("demo", tiny_overrides)
    stats = run.benchmark_loader(cfg, batches=2, warmup=1)
    assert stats["batches"] == 2 and stats["images"] == 16  # batch 8, warm-up batch not counted
    assert stats["images_per_second"] > 0
    with pytest.raises(ArgumentError, match="warm-up"):
        run.benchmark_loader(cfg, batches=3, warmup=100)


def test_loader_benchmark_sizes_auto_workers_by_the_processes_share(tiny_overrides, monkeypatch):
    """On an 8-GPU node each process gets an eighth of the cores: the benchmark measured the
    loader with the whole node's, overstating a process's images/s by up to 8x."""
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(32)))
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    one = load_config("demo", [*tiny_overrides, "data.num_workers=auto", "trainer.devices=1"])
    eight = load_config("demo", [*tiny_overrides, "data.num_workers=auto", "trainer.devices=8"])
    monkeypatch.setattr(run, "loader_throughput", lambda loader, *a, **k: loader.num_workers)
    assert run.benchmark_loader(one) == 30  # 32 cores less the two the process keeps
    assert run.benchmark_loader(eight) == 2  # 32 / 8 = 4, less two


def test_compiled_channels_last_run_trains_and_keeps_plain_keys(tiny_overrides):
    cfg = load_config(
        "demo", [*tiny_overrides, "trainer.compile=true", "trainer.channels_last=true"]
    )
    result = run.pretrain(cfg)
    state = torch.load(result.last_checkpoint, weights_only=True)["state_dict"]
    assert not any("_orig_mod" in k for k in state)  # in-place compile: checkpoints stay portable
    _, qbheat = qbheat_from_checkpoint(result.last_checkpoint)  # loads into a plain module
    assert all(torch.isfinite(p).all() for p in qbheat.parameters())


class _PoisonBatch(L.Callback):
    """Turn the images of one training step into NaN (a real fault, injected from outside)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:  # the uint8 batch cannot hold NaN: its float input
            pl_module.model_input = lambda images: torch.full(images.shape, float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pl_module.__dict__.pop("model_input", None)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_overrides):
    cfg = load_config("demo", [*tiny_overrides, "trainer.max_epochs=3"])
    steps_per_epoch = len(build_datamodule(cfg.data).train_dataset) // 8
    bad_step = steps_per_epoch + 1  # the second step of the second epoch
    with pytest.raises(NonFiniteLossError, match=f"step {bad_step}: .*lower optim.base_lr"):
        run.pretrain(cfg, callbacks=[_PoisonBatch(bad_step)])
    last = torch.load(RunLayout(Path(cfg.run_dir)).last_checkpoint, weights_only=True)
    assert last["global_step"] == steps_per_epoch  # the end of the first epoch: the last good one
    assert all(
        torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point()
    )
    assert not (RunLayout(Path(cfg.run_dir)).checkpoints / "epoch001.ckpt").exists()


def _step_log(path):
    """``{global step: checksum}`` from a kill_entry step log."""
    lines = path.read_text().split() if path.exists() else []
    return {int(s): float(c) for s, c in zip(lines[::2], lines[1::2], strict=True)}


def test_sigkill_mid_epoch_then_resume_trains_the_same_steps_on_the_same_data(tmp_path):
    """A real SIGKILL in the middle of an epoch, then ``--resume last``: the resumed run ends at
    the uninterrupted step count, trains the remaining steps on exactly the batches an unbroken
    run sees (same order, mid-epoch skip), and ends with the same weights (RNG state restored)."""
    entry = Path(__file__).parents[1] / "kill_entry.py"
    settings = [
        *tiny_settings(tmp_path / "broken"),
        "trainer.max_epochs=2",
        "trainer.checkpoint_every_n_steps=1",
        "data.augment=none",  # the transform draws no random numbers: checksums compare batches
    ]  # 3 steps per epoch (24 train images, batch 8): step 4 is the middle of the second epoch

    def cli(run_dir, log, hang=None):
        env = {**os.environ, "HEATSSL_STEP_LOG": str(log), "PYTHONPATH": os.getcwd()}
        if hang is not None:
            env["HEATSSL_HANG_AT_STEP"] = str(hang)
        overrides = [s for s in settings if not s.startswith("run_dir=")] + [f"run_dir={run_dir}"]
        return [sys.executable, str(entry), "pretrain", "-c", "demo", *overrides], env

    ref_cmd, ref_env = cli(tmp_path / "ref", tmp_path / "ref.log")
    subprocess.run(ref_cmd, env=ref_env, check=True, capture_output=True, timeout=300)

    cmd, env = cli(tmp_path / "broken", tmp_path / "broken.log", hang=4)
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = Path(f"{tmp_path / 'broken.log'}.hang")
    deadline = time.monotonic() + 240
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), "the run never reached step 4"
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL
    last = tmp_path / "broken" / "checkpoints" / "last.ckpt"
    assert safe_torch_load(last)["global_step"] == 4  # mid-epoch: 1 of epoch 1's 3 steps
    assert sorted(p.name for p in last.parent.iterdir()) == ["epoch000.ckpt", "last.ckpt"]

    resume_cmd, resume_env = cli(tmp_path / "broken", tmp_path / "resumed.log")
    subprocess.run(
        [*resume_cmd, "--resume", "last"],
        env=resume_env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    ref, before, after = (_step_log(tmp_path / f"{n}.log") for n in ("ref", "broken", "resumed"))
    assert sorted(ref) == list(range(6)) and sorted(before) == list(range(4))
    assert sorted(after) == [4, 5]  # only the steps the checkpoint lacked
    assert {**before, **after} == pytest.approx(ref, rel=1e-9)  # the same batches, in order
    final = safe_torch_load(last)
    reference = safe_torch_load(tmp_path / "ref" / "checkpoints" / "last.ckpt")
    assert final["global_step"] == reference["global_step"] == 6
    for key, value in reference["state_dict"].items():
        assert torch.allclose(final["state_dict"][key].float(), value.float(), atol=1e-5), key
    assert backbone_from_checkpoint(last) is not None  # the resumed result loads


class _Weights(L.Callback):
    """A checksum of the weights after every step."""

    def __init__(self) -> None:
        self.sums: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        total = sum(float(p.detach().double().sum()) for p in pl_module.parameters())
        self.sums[trainer.global_step] = total


def test_a_non_finite_step_is_skipped_on_the_device_until_the_next_read(tiny_overrides):
    """Read every 3 steps: the bad step and the ones after it change no weight, then it stops."""
    cfg = load_config(
        "demo", [*tiny_overrides, "trainer.max_epochs=3", "trainer.log_every_n_steps=3"]
    )
    bad_step = 4
    weights = _Weights()
    with pytest.raises(NonFiniteLossError, match=f"step {bad_step}: loss=nan"):
        run.pretrain(cfg, callbacks=[_PoisonBatch(bad_step), weights])
    after_bad = [weights.sums[s] for s in sorted(weights.sums) if s > bad_step]
    assert after_bad and all(v == weights.sums[bad_step] for v in after_bad)
    assert all(torch.isfinite(torch.tensor(list(weights.sums.values()))))
    assert max(weights.sums) <= bad_step + 3  # stopped at the first read after the bad step


class _CrashAt(L.Callback):
    """Raises as the given step starts (the checkpoint of the step before it is on disk)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("crash for the test")


def test_resume_with_another_dataset_size_is_refused_mid_epoch_and_said_at_an_epoch_start(
    tiny_overrides, capsys
):
    """A mid-epoch checkpoint cannot continue its epoch in another order: refused, naming what
    changed and the epoch checkpoint to use. An epoch-end checkpoint goes on with the new data and
    says so. (The same check covers the process count and batch size.)"""
    two = [*tiny_overrides, "trainer.max_epochs=2", "trainer.checkpoint_every_n_steps=1"]
    cfg = load_config("demo", two)
    with pytest.raises(RuntimeError, match="crash for the test"):
        run.pretrain(cfg, callbacks=[_CrashAt(4)])  # 3 steps per epoch: 1 batch into epoch 1
    ckpts = RunLayout(Path(cfg.run_dir)).checkpoints
    assert safe_torch_load(ckpts / "last.ckpt")["global_step"] == 4
    train_images = len(build_datamodule(cfg.data).train_dataset)

    more = load_config("demo", [*two, "data.synthetic_size=80"])
    with pytest.raises(CheckpointError) as refused:
        run.pretrain(more, resume="last")
    message = str(refused.value)
    assert "middle of epoch 1 (1 batches in)" in message
    assert f"training images: {train_images} in the checkpoint" in message
    assert "epochNNN.ckpt" in message
    assert safe_torch_load(ckpts / "last.ckpt")["global_step"] == 4  # nothing written

    result = run.pretrain(more, resume=str(ckpts / "epoch000.ckpt"))
    assert "resuming at the start of epoch 1 with changed data" in capsys.readouterr().err
    new_images = len(build_datamodule(more.data).train_dataset)
    assert result.global_step == 3 + new_images // 8  # epoch 1 over the larger set


def test_a_time_budget_ends_the_run_with_a_checkpoint_and_a_schedule_that_ends_with_it(
    tiny_overrides,
):
    """``trainer.max_time``: the run stops at the budget (not after max_epochs), writes last.ckpt
    and pictures, and the learning rate warms up and then decays to about zero by the end."""
    budget_s = 12.0
    overrides = [*tiny_overrides, "data.synthetic_size=16", "optim.min_lr_ratio=0"]
    cfg = load_config("demo", [*overrides, f"trainer.max_time={budget_s / 60}"])
    result = run.pretrain(cfg)
    # trainer.max_epochs=1 (one step of 8 of the 8 training images) would have ended it at once
    assert budget_s <= result.seconds < budget_s + 30
    assert result.global_step >= 3
    assert safe_torch_load(result.last_checkpoint)["global_step"] == result.global_step
    assert list((result.run_dir / "pictures").glob("reconstruction_epoch*.png"))
    rows = list(csv.DictReader((result.run_dir / "metrics.csv").open()))
    lrs = [float(r["lr-AdamW/pg1"]) for r in rows if r.get("lr-AdamW/pg1")]
    peak = max(lrs)
    assert lrs[0] < 0.7 * peak  # warming up
    assert lrs[-1] < peak  # decaying by the end (how far depends on the step speed: the clock
    # decides, tests/model/test_optim.py checks the schedule against a fake clock)


def test_a_time_budget_that_cannot_be_read_is_refused():
    with pytest.raises(ConfigError, match=r"trainer.max_time='15 minutes'.*HH:MM:SS"):
        load_config("demo", ["trainer.max_time=15 minutes"])
    cfg = load_config("demo", ["trainer.max_time=00:15:00"])
    assert cfg.trainer.max_time_seconds() == 900
    assert load_config("demo", ["trainer.max_time=2.5"]).trainer.max_time_seconds() == 150
    assert "time budget 15 min" in launch_plan(cfg)


def test_a_bf16_mixed_run_with_gradient_clipping_trains(tmp_path):
    """The GPU recipes' settings (bf16-mixed, fused AdamW, gradient_clip_val=1) on the CPU: the
    first GPU run stopped at its first step with Lightning's fused-optimiser clipping error."""
    cfg = load_config(
        "demo",
        [*tiny_settings(tmp_path / "run"), "trainer.precision=bf16-mixed", "trainer.max_epochs=1"],
    )
    assert cfg.trainer.gradient_clip_val == 1.0
    done = run.pretrain(cfg)
    assert done.global_step > 0 and done.last_checkpoint.exists()


def test_a_compiling_run_keeps_its_compile_cache_in_the_run_folder(tiny_overrides, monkeypatch):
    """inductor's default cache is node-local (/tmp): every requeue on another node compiled from
    scratch. A user's TORCHINDUCTOR_CACHE_DIR stands."""
    from heatssl.runs.trainer import build_trainer

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    cfg = load_config("demo", [*tiny_overrides, "trainer.compile=true"])
    build_trainer(cfg, Path(cfg.run_dir), "heatssl pretrain --resume")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(
        Path(cfg.run_dir).resolve() / "compile_cache"
    )
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")
    build_trainer(cfg, Path(cfg.run_dir), "heatssl pretrain --resume")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/else"
