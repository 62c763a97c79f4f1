"""Real multi-process DDP on the CPU (gloo): the same code path a multi-GPU run takes.

Two processes with per-device batch 8 must train the same weights as one process with batch 16 (the
same global batch), only rank 0 may write files, and a 2-process run resumed from a mid-run
checkpoint must end where the uninterrupted run ended.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from heatssl.cli import main
from heatssl.config import CONFIG_DIR, load_config
from heatssl.runs.build import build_backbone
from tests.helpers import same_on_every_rank, write_image_folder

ENTRY = Path(__file__).with_name("ddp_entry.py")


def _overrides(run_dir: Path, batch: int, devices: int) -> list[str]:
    # One step per epoch (16 training images), the same result however the batch is split.
    return [
        *same_on_every_rank(run_dir),
        "data.synthetic_size=16",
        f"data.batch_size={batch}",
        "data.num_workers=0",
        "optim.base_lr=0.01",
        "trainer.max_epochs=3",
        "trainer.keep_checkpoints=-1",  # epoch000.ckpt is compared and resumed from below
        f"trainer.devices={devices}",
        f"trainer.strategy={'ddp' if devices > 1 else 'auto'}",
    ]


def _ddp(args: list[str], writes: Path, **extra_env: str) -> subprocess.CompletedProcess:
    writes.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HEATSSL_WRITES_DIR": str(writes), "OMP_NUM_THREADS": "1", **extra_env}
    proc = subprocess.run(
        [sys.executable, str(ENTRY), "pretrain", "-c", "demo", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _weights(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v.double() for k, v in state.items() if v.is_floating_point()}


def _distance(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5


def test_two_process_ddp_matches_one_process_and_resumes(tmp_path):
    one = tmp_path / "one"
    assert main(["pretrain", "-c", "demo", *_overrides(one, batch=16, devices=1)]) == 0

    two = tmp_path / "two"
    proc = _ddp(_overrides(two, batch=8, devices=2), tmp_path / "writes")
    assert "effective batch 16 = 8 per device x 2 devices x 1 nodes" in proc.stdout

    # Only rank 0 wrote: checkpoints, pictures and the config; rank 1 wrote nothing.
    assert not (tmp_path / "writes" / "rank1.log").exists()
    written = (tmp_path / "writes" / "rank0.log").read_text().splitlines()
    assert any(w.startswith("save_checkpoint") and w.endswith("last.ckpt") for w in written)
    assert any(w.startswith("save_figure") for w in written)
    assert sum(w.startswith("save_config") for w in written) == 1

    ref_first = _weights(one / "checkpoints" / "epoch000.ckpt")
    ref = _weights(one / "checkpoints" / "last.ckpt")
    ddp = _weights(two / "checkpoints" / "last.ckpt")
    update = _distance(ref, ref_first)  # what steps 2 and 3 changed
    assert update > 0
    assert _distance(ddp, ref) < 1e-3 * update

    # Resume the 2-process run from its first-epoch checkpoint: it ends where it ended before.
    resumed = tmp_path / "resumed"
    args = [*_overrides(resumed, batch=8, devices=2)]
    resumed.mkdir()
    (resumed / "checkpoints").mkdir()
    start = resumed / "checkpoints" / "start.ckpt"
    start.write_bytes((two / "checkpoints" / "epoch000.ckpt").read_bytes())
    _ddp([*args, f"--resume={start}"], tmp_path / "writes_resume")
    again = _weights(resumed / "checkpoints" / "last.ckpt")
    assert _distance(again, ddp) < 1e-3 * update
    assert torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


def test_the_ema_teacher_is_identical_on_every_process(tmp_path):
    """loss.target=both on 2 gloo ranks: each rank updates its own teacher from the synchronised
    student, so the teachers must stay equal to each other (and have moved off the student)."""
    writes = tmp_path / "writes"
    args = [*_overrides(tmp_path / "run", batch=8, devices=2), "loss.target=both"]
    args += ["loss.teacher_momentum=0.5"]
    _ddp(args, writes, HEATSSL_DUMP_TEACHER="1")
    ranks = [torch.load(writes / f"teacher_rank{r}.pt", weights_only=True) for r in (0, 1)]
    teachers = [r["teacher"] for r in ranks]
    assert teachers[0].keys() == teachers[1].keys() and teachers[0]
    for key, value in teachers[0].items():
        assert torch.equal(value, teachers[1][key]), key
    student = ranks[0]["student"]
    moved = [
        k for k, v in student.items() if v.is_floating_point() and f"backbone.{k}" in teachers[0]
    ]
    assert moved and any(not torch.equal(student[k], teachers[0][f"backbone.{k}"]) for k in moved)


RECIPES = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _smallest_size(recipe: str) -> int:
    """The smallest image size the recipe's backbone splits into 2 x 2 quarter-block grids."""
    cfg = load_config(recipe)
    with torch.device("meta"):
        return 4 * build_backbone(cfg.model, cfg.data.image_size, check_size=False).reduction


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_pretrains_under_two_process_ddp(recipe, tmp_path):
    """Each shipped recipe's model, heat and decoder settings, at its smallest size, 2 gloo ranks:
    DDP refuses a parameter that no loss reaches, so this fails if the backbone keeps one."""
    run_dir = tmp_path / "run"
    overrides = [
        f"run_dir={run_dir}",
        "data.name=synthetic",
        "data.synthetic_size=16",
        "data.val_fraction=0",
        f"data.image_size={_smallest_size(recipe)}",
        "data.batch_size=4",
        "data.num_workers=0",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.precision=32-true",
        "trainer.max_epochs=1",
        "trainer.progress_bar=false",
        "trainer.logger=none",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "heatssl.cli", "pretrain", "-c", recipe, *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 2  # 16 images, 4 per rank, 2 ranks


FAMILIES = {
    "cnn": ["model.backbone=test_resnet", "model.output_stride=8"],
    "vit": ["model.backbone=test_vit", "model.kwargs.patch_size=4", "model.output_stride=null"],
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_finetuning_with_ema_under_two_process_ddp_scores_the_whole_val_split(family, tmp_path):
    """Fine-tuning on the pretraining Trainer, 2 gloo ranks, EMA on, each recipe family: the EMA
    holds no gradients (timm's copy keeps requires_grad, which stopped DDP at step 2), every val
    image is scored once (the metrics sync over processes) and process 0 alone writes the report
    and the timm folder."""
    out = tmp_path / "ft"
    overrides = [
        f"run_dir={tmp_path / 'run'}",
        *FAMILIES[family],
        "data.name=synthetic",
        "data.synthetic_size=40",
        "data.image_size=32",
        "data.batch_size=4",
        "data.num_workers=0",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.progress_bar=false",
        "finetune.epochs=1",
        "finetune.ema_decay=0.9",
        f"finetune.out_dir={out}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "heatssl.cli",
            "finetune",
            overrides[1].split("=")[1],
            "-c",
            "demo",
            *overrides,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["recipe"]["recipe"] == family and metrics["reported"] == "ema_top1"
    assert len(metrics["epochs"]) == 1 and metrics["epochs"][0]["epoch"] == 1
    assert metrics["val_scored"] == metrics["val_images"] == 10  # 40 images: one per class held out
    assert (out / "model_timm" / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def stream_sources(tmp_path_factory):
    """The same 3 x 8 + 3 x 2 images as WebDataset shards (5 a shard) and as Parquet files."""
    root = tmp_path_factory.mktemp("streams")
    folder = write_image_folder(root / "folder")
    args = ["convert", "-c", "demo", "data.name=imagefolder", f"data.root={folder}"]
    assert main([*args, "-o", str(root / "shards"), "--per-shard", "5"]) == 0
    datasets = pytest.importorskip("datasets")
    for split, hf_split in (("train", "train"), ("val", "validation")):
        files = sorted((folder / split).rglob("*.jpg"))
        table = datasets.Dataset.from_dict(
            {
                "image": [{"bytes": f.read_bytes(), "path": None} for f in files],
                "label": ["abc".index(f.parent.name) for f in files],
            },
            features=datasets.Features(
                {"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])}
            ),
        )
        for i in range(2 if split == "train" else 1):
            part = table.shard(2 if split == "train" else 1, i, contiguous=True)
            part.to_parquet(str(root / "parquet" / f"{hf_split}-{i:05d}.parquet"))
    return {
        "webdataset": ["data.name=webdataset", f"data.root={root / 'shards'}"],
        "hf-streaming": ["data.name=hf", f"data.root={root / 'parquet'}", "data.streaming=true"],
    }


@pytest.mark.parametrize("source", ["webdataset", "hf-streaming"])
def test_two_processes_stream_equal_batches_of_disjoint_images(source, stream_sources, tmp_path):
    """Shard streams under 2 gloo processes: the same number of batches on each (or DDP would hang)
    and no image on both."""
    log = tmp_path / "images"
    overrides = [
        *same_on_every_rank(tmp_path / "run"),
        *stream_sources[source],
        "data.batch_size=4",
        "data.num_workers=1",
        "trainer.max_epochs=1",
        "trainer.devices=2",
        "trainer.strategy=ddp",
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HEATSSL_STEP_LOG": str(tmp_path / "steps"),
        "HEATSSL_IMAGE_LOG": str(log),
    }
    entry = Path(__file__).parents[1] / "kill_entry.py"
    proc = subprocess.run(
        [sys.executable, str(entry), "pretrain", "-c", "demo", *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    seen = [Path(f"{log}.rank{r}").read_text().split() for r in (0, 1)]
    # shards of 5, 5, 5, 5, 4 dealt as 14 and 10 images: 2 batches of 4 each (the smaller share's);
    # two Parquet files of 12: 3 batches each
    assert len(seen[0]) == len(seen[1]) == {"webdataset": 8, "hf-streaming": 12}[source]
    assert not set(seen[0]) & set(seen[1])
