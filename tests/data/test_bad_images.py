"""Bad image files in a dataset: odd modes converted, unreadable files skipped, counted and named."""

import numpy as np
import pytest
from PIL import Image

from heatssl.cli import main
from heatssl.config import ConfigError, DataConfig, load_config
from heatssl.data.datamodule import build_datamodule
from heatssl.errors import BadImageError
from heatssl.probing.probe import probe
from heatssl.train import pretrain as run
from tests.helpers import ODD_READABLE, UNREADABLE, tiny_settings, write_odd_and_bad_images


def _folder(root, bad_val: bool = True):
    """train/a: 6 photos + every odd and bad file; train/b: 8 photos; val: 3 + 3 (+1 broken).

    24 training files: batches of 4 visit every one each epoch (none falls in a dropped remainder).
    """
    rng = np.random.default_rng(0)
    for split, counts in (("train", (6, 8)), ("val", (3, 3))):
        for cls, count in zip(("a", "b"), counts, strict=True):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{cls}{i}.jpg")
    write_odd_and_bad_images(root / "train" / "a")
    if bad_val:
        (root / "val" / "b" / "broken.jpg").write_text("not an image")
    return root


def _data(root, **kw):
    cfg = DataConfig(name="imagefolder", root=str(root), image_size=16, batch_size=4, **kw)
    return build_datamodule(cfg)


def test_training_batches_keep_their_size_and_name_every_unreadable_file(tmp_path):
    dm = _data(_folder(tmp_path))
    assert len(dm.train_dataset) == 14 + len(ODD_READABLE) + len(UNREADABLE)
    skipped, sizes = set(), []
    for images, _, bad in dm.train_dataloader():
        sizes.append(images.shape[0])
        assert images.shape[1:] == (3, 16, 16) and bool(images.isfinite().all())
        skipped |= {b.split(":")[0].rsplit("/", 1)[-1] for b in bad}
    assert set(sizes) == {4}  # an unreadable file's slot took the next readable one
    assert skipped == set(UNREADABLE)


def test_evaluation_leaves_unreadable_files_out_instead_of_repeating_a_neighbour(tmp_path):
    dm = _data(_folder(tmp_path))
    seen, skipped = 0, []
    for images, labels, bad in dm.feature_dataloader("train"):
        seen += images.shape[0]
        assert images.shape[0] == labels.shape[0]
        skipped += bad
    assert seen == 14 + len(ODD_READABLE)
    assert sorted(b.split(":")[0].rsplit("/", 1)[-1] for b in skipped) == UNREADABLE
    val = [batch for batch in dm.val_dataloader()]
    assert sum(b[0].shape[0] for b in val) == 6
    assert [s.split(":")[0].rsplit("/", 1)[-1] for b in val for s in b[2]] == ["broken.jpg"]


def test_on_bad_image_error_stops_at_the_first_unreadable_file(tmp_path):
    with pytest.raises(BadImageError, match=r"(empty|text|truncated)\.jpg.*on_bad_image=skip"):
        _data(_folder(tmp_path), on_bad_image="error").setup()


def test_all_bad_or_empty_dataset_stops_before_training(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "bad" / "train" / cls).mkdir(parents=True)
        (tmp_path / "bad" / "train" / cls / "x.jpg").write_text("not an image")
        (tmp_path / "bad" / "train" / cls / "y.png").write_bytes(b"")
        (tmp_path / "empty" / "train" / cls).mkdir(parents=True)
    with pytest.raises(BadImageError, match="No readable image in the train split: all 4"):
        _data(tmp_path / "bad").setup()
    with pytest.raises(ConfigError, match=r"No image file .* class folder\(s\) a, b"):
        _data(tmp_path / "empty").setup()


@pytest.mark.parametrize("backend", ["pil", "dali", "torchvision"])
def test_pretraining_reports_the_bad_files_each_epoch(tmp_path, capsys, backend):
    """Every backend, through Lightning: same steps, same files named, every epoch."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    root = _folder(tmp_path / "data")
    settings = tiny_settings(tmp_path / "run")
    cfg = load_config(
        "demo",
        [
            *settings,
            "data.name=imagefolder",
            f"data.root={root}",
            f"data.backend={backend}",
            "data.num_workers=1",
            "data.batch_size=4",
            "trainer.max_epochs=2",
            "probe.online=true",  # validation runs, so the val split's broken file is met too
        ],
    )
    result = run.pretrain(cfg)
    assert result.global_step == 2 * ((14 + len(ODD_READABLE) + len(UNREADABLE)) // 4)
    lines = (result.run_dir / "bad_images.txt").read_text().splitlines()
    by_epoch = {}
    for line in lines:
        epoch, entry = line.split("\t")
        by_epoch.setdefault(epoch, set()).add(entry.split(":")[0].rsplit("/", 1)[-1])
    assert by_epoch == {f"epoch {e}": {*UNREADABLE, "broken.jpg"} for e in (0, 1)}
    err = capsys.readouterr().err
    assert err.count("skipped 4 unreadable image file(s)") == 2
    # the file lists were scanned once, into the run folder, for every process and requeue
    assert {p.name for p in (result.run_dir / "file_index").iterdir()} == {
        "train.json.gz",
        "val.json.gz",
    }
    if backend == "dali":  # the probe's feature extraction reads through DALI too
        probed = probe(str(result.run_dir / "checkpoints" / "last.ckpt"), cfg, tmp_path / "probe")
        assert probed.metrics["train_images"] == 21 and probed.metrics["val_images"] == 6


def test_cli_exits_2_with_the_file_named(tmp_path, capsys):
    root = _folder(tmp_path / "data")
    args = ["data.name=imagefolder", f"data.root={root}", "data.on_bad_image=error"]
    code = main(["pretrain", "-c", "demo", *tiny_settings(tmp_path / "run"), *args])
    assert code == 2
    assert "on_bad_image" in capsys.readouterr().err
