import json
import os
import shlex
import signal

import lightning as L
import pytest
import timm
import torch

from heatssl.cli import main
from heatssl.config import ConfigError, load_config
from heatssl.data.labels import read_label_subset
from heatssl.finetuning.finetune import finetune
from heatssl.runs.preemption import Interrupted
from tests.helpers import tiny_settings

PLAIN = [  # no augmentation or mixing: a few epochs learn the digits well above chance
    "finetune.mixup=0",
    "finetune.cutmix=0",
    "finetune.auto_augment=none",
    "finetune.re_prob=0",
    "finetune.smoothing=0",
    "finetune.warmup_epochs=0",
    "finetune.base_lr=3e-2",
]


def test_finetuning_learns_and_writes_metrics_confusion_and_a_timm_folder(tmp_path):
    out = tmp_path / "ft"
    cfg = load_config(
        "demo",
        [
            *tiny_settings(tmp_path / "run"),
            "data.synthetic_size=200",
            "data.batch_size=16",
            "finetune.epochs=3",
            f"finetune.out_dir={out}",
            *PLAIN,
        ],
    )
    result = finetune("test_resnet", cfg)
    m = json.loads((out / "metrics.json").read_text())
    assert [row["epoch"] for row in m["epochs"]] == [1, 2, 3]
    assert all(isinstance(row["epoch"], int) for row in m["epochs"])
    assert m["best"]["top1"] > 40, m["epochs"]  # 10 classes: chance is 10
    assert m["final"]["top5"] >= m["final"]["top1"]
    assert (out / "confusion.png").stat().st_size > 5000 and "best val top-1" in (
        out / "metrics.md"
    ).read_text()
    model = timm.create_model(f"local-dir:{result.model_dir}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    mine = result.model_dir  # the folder is a whole classifier: 10 outputs, same as the module's
    assert model(x).shape == (2, 10) and mine.name == "model_timm"
    saved = load_config(out / "config.yaml")
    assert saved.finetune.recipe == "cnn" and saved.finetune.layer_decay == 0.8  # resolved


def test_label_fraction_trains_on_a_saved_class_balanced_subset(tmp_path):
    out = tmp_path / "ft"
    cfg = load_config(
        "demo",
        [
            *tiny_settings(tmp_path / "run"),
            "data.synthetic_size=100",
            "data.label_fraction=0.25",
            "finetune.epochs=1",
            f"finetune.out_dir={out}",
        ],
    )
    result = finetune("test_resnet", cfg)
    subset = read_label_subset(out / "label_subset.json")
    assert result.metrics["train_images"] == subset["total"] == 20
    assert set(subset["per_class"].values()) == {2}


def test_a_vit_with_ema_reports_and_exports_the_ema(tmp_path):
    out = tmp_path / "ft"
    cfg = load_config(
        "demo",
        [
            *tiny_settings(tmp_path / "run"),
            "model.backbone=test_vit",
            "model.output_stride=null",
            "model.kwargs={patch_size: 4}",
            "finetune.epochs=1",
            "finetune.ema_decay=0.5",
            f"finetune.out_dir={out}",
        ],
    )
    result = finetune("test_vit", cfg)
    m = result.metrics
    assert m["recipe"]["recipe"] == "vit" and m["reported"] == "ema_top1"
    assert "ema_top1" in m["final"] and "EMA top-1" in (out / "metrics.md").read_text()


def test_the_command_fine_tunes_a_pretrained_checkpoint_and_refuses_dali(tmp_path, capsys):
    from heatssl.train.pretrain import pretrain

    cfg = load_config("demo", tiny_settings(tmp_path / "run"))
    done = pretrain(cfg)
    code = main(["finetune", str(done.last_checkpoint), "finetune.epochs=1"])
    assert code == 0
    assert (tmp_path / "run" / "finetune" / "model_timm" / "config.json").is_file()
    said = capsys.readouterr()
    assert "fine-tuned model in" in said.out
    # the start line spells out the batch and the lr that follows it, as pretraining's does
    assert "effective batch 8 = 8 per device x 1 devices x 1 nodes x 1 accumulation" in said.err
    assert "lr 3.125e-05 = base_lr 0.001 x 8 / 256" in said.err
    with pytest.raises(ConfigError, match=r"data\.backend=pil"):
        finetune(
            str(done.last_checkpoint),
            load_config(
                "demo",
                [
                    *tiny_settings(tmp_path / "run"),
                    "data.name=imagefolder",
                    f"data.root={tmp_path}",
                    "data.backend=dali",
                ],
            ),
        )


def test_resume_continues_the_run_and_keeps_every_epochs_metrics(tmp_path):
    out = tmp_path / "ft"
    base = [*tiny_settings(tmp_path / "run"), f"finetune.out_dir={out}"]
    finetune("test_resnet", load_config("demo", [*base, "finetune.epochs=1"]))
    first = json.loads((out / "metrics.json").read_text())["epochs"]
    resumed = finetune(
        "test_resnet", load_config("demo", [*base, "finetune.epochs=2"]), resume="last"
    )
    epochs = resumed.metrics["epochs"]
    assert [row["epoch"] for row in epochs] == [1, 2] and epochs[0] == first[0]
    with pytest.raises(ConfigError, match="no checkpoint"):
        finetune("test_resnet", load_config("demo", base), resume=str(tmp_path / "none.ckpt"))


class _SigtermAt(L.Callback):
    """Sends this process SIGTERM before training batch ``at`` (counted over the run)."""

    def __init__(self, at: int) -> None:
        self.at, self.seen = at, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.seen == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        self.seen += 1


def test_sigterm_saves_and_names_the_finetune_command_that_resumes_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "ft"
    base = [*tiny_settings(tmp_path / "run"), f"finetune.out_dir={out}", "finetune.epochs=2"]
    with pytest.raises(Interrupted) as stopped:
        finetune("test_resnet", load_config("demo", base), callbacks=[_SigtermAt(2)])
    hint = str(stopped.value).split("`")[1]
    assert hint == f"heatssl finetune test_resnet -c {out / 'config.yaml'} --resume", hint
    assert (out / "checkpoints" / "last.ckpt").is_file() and not (out / "metrics.json").exists()
    assert main(shlex.split(hint)[1:]) == 0  # the printed command is the one that works
    epochs = json.loads((out / "metrics.json").read_text())["epochs"]
    assert [row["epoch"] for row in epochs] == [1, 2]


def test_resume_auto_starts_afresh_without_a_checkpoint_and_resumes_with_one(tmp_path):
    out = tmp_path / "ft"
    base = [*tiny_settings(tmp_path / "run"), f"finetune.out_dir={out}"]
    fresh = finetune(
        "test_resnet", load_config("demo", [*base, "finetune.epochs=1"]), resume="auto"
    )
    assert [row["epoch"] for row in fresh.metrics["epochs"]] == [1]
    again = finetune(
        "test_resnet", load_config("demo", [*base, "finetune.epochs=2"]), resume="auto"
    )
    epochs = again.metrics["epochs"]
    assert [row["epoch"] for row in epochs] == [1, 2] and epochs[0] == fresh.metrics["epochs"][0]


def test_a_channels_last_run_writes_its_timm_folder(tmp_path):
    # the GPU setting: safetensors refuses the strided weights of a channels_last model
    out = tmp_path / "ft"
    cfg = load_config(
        "demo",
        [
            *tiny_settings(tmp_path / "run"),
            "finetune.epochs=1",
            f"finetune.out_dir={out}",
            "trainer.channels_last=true",
        ],
    )
    result = finetune("test_resnet", cfg)
    model = timm.create_model(f"local-dir:{result.model_dir}", pretrained=True).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
