"""WebDataset shards: heatssl convert writes them, and every stage reads them (data.name=webdataset)."""

import io
import json
import tarfile

import pytest

from heatssl.cli import main
from heatssl.config import load_config
from heatssl.data import wds
from heatssl.data.datamodule import build_datamodule
from heatssl.errors import ConfigError
from tests.data.checks import check_sigterm_then_resume
from tests.helpers import tiny_settings, write_image_folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """An image folder (3 classes x 8 train, x 2 val) converted to shards of 5 images."""
    root = tmp_path_factory.mktemp("wds")
    folder = write_image_folder(root / "folder")
    args = ["convert", "-c", "demo", "data.name=imagefolder", f"data.root={folder}"]
    assert main([*args, "-o", str(root / "shards"), "--per-shard", "5"]) == 0
    return root / "shards"


def _settings(tmp_path, root, *extra):
    return [*tiny_settings(tmp_path / "run"), "data.name=webdataset", f"data.root={root}", *extra]


def test_convert_writes_shards_with_an_index_and_refuses_a_used_folder(shards, capsys):
    index = json.loads((shards / "train" / "index.json").read_text())
    assert index["classes"] == ["a", "b", "c"] and index["samples"] == 24
    assert [s["samples"] for s in index["shards"]] == [5, 5, 5, 5, 4]
    with tarfile.open(shards / "train" / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert names[:2] == ["000000000.jpg", "000000000.cls"]
    args = ["convert", "-c", "demo", "data.name=imagefolder", f"data.root={shards}"]
    assert main([*args, "-o", str(shards)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_shards_are_named_by_a_folder_a_brace_pattern_or_a_list(shards, tmp_path):
    folder = wds.shard_paths(str(shards / "train"))
    assert len(folder) == 5
    assert wds.shard_paths(str(shards / "train" / "shard-{000000..000004}.tar")) == folder
    listing = shards / "train" / "list.txt"
    listing.write_text("\n".join(p.rsplit("/", 1)[1] for p in folder))
    assert wds.shard_paths(str(listing)) == folder
    listing.unlink()
    with pytest.raises(ConfigError, match=r"No tar shards.*missing"):
        wds.shard_paths(str(shards / "train" / "shard-{000000..000009}.tar"))


def test_without_an_index_the_shards_are_scanned_once_into_the_run_folder(shards, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    for tar in (shards / "train").glob("*.tar"):
        (plain / tar.name).write_bytes(tar.read_bytes())
    found, classes = wds.split_shards(str(plain), tmp_path / "run", 0, "train")
    assert sum(s.count for s in found) == 24 and classes == ["0", "1", "2"]
    assert (tmp_path / "run" / "file_index" / "shards_train.json.gz").is_file()


def test_pretraining_probing_and_fine_tuning_read_the_shards(shards, tmp_path, capsys):
    settings = _settings(tmp_path, shards, "data.num_workers=2", "data.batch_size=4")
    assert main(["pretrain", "-c", "demo", *settings]) == 0
    ckpt = str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    probe = ["probe.kinds=[linear,knn]", "probe.epochs=2"]
    assert main(["probe", ckpt, *probe, "-o", str(tmp_path / "probe")]) == 0
    metrics = json.loads((tmp_path / "probe" / "metrics.json").read_text())
    assert metrics["train_images"] == 24 and metrics["val_images"] == 6
    fine = [*settings, "finetune.epochs=1", f"finetune.out_dir={tmp_path / 'ft'}"]
    assert main(["finetune", "test_resnet", "-c", "demo", *fine]) == 0
    assert json.loads((tmp_path / "ft" / "metrics.json").read_text())["val_scored"] == 6


def test_a_damaged_member_is_one_line_naming_it(shards, tmp_path, capsys):
    broken = tmp_path / "broken"
    (broken / "train").mkdir(parents=True)
    (broken / "val").mkdir()
    for split in ("train", "val"):
        for tar in (shards / split).glob("*"):
            (broken / split / tar.name).write_bytes(tar.read_bytes())
    with tarfile.open(broken / "train" / "shard-000001.tar") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(broken / "train" / "shard-000001.tar", "w") as tar:
        for member, data in members:
            data = b"not a jpeg" if member.name == "000000006.jpg" else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    settings = _settings(tmp_path, broken, "data.on_bad_image=error", "data.batch_size=4")
    assert main(["pretrain", "-c", "demo", *settings]) == 2
    err = capsys.readouterr().err
    assert "shard-000001.tar:000000006" in err and "Traceback" not in err


def test_an_oversized_member_is_named_unread_and_other_members_are_not_read(
    shards, tmp_path, monkeypatch
):
    """A hostile shard cannot fill memory: members are judged by their tar header before reading."""
    shard = tmp_path / "hostile.tar"
    with tarfile.open(shard, "w") as tar:
        for name, size in (
            ("a.jpg", 5000),
            ("a.cls", 1),
            ("b.txt", 10**6),
            ("b.jpg", 10),
            ("b.cls", 1),
        ):
            member = tarfile.TarInfo(name)
            member.size = size
            tar.addfile(member, io.BytesIO(b"1" * size))
    monkeypatch.setattr(wds, "MAX_MEMBER_BYTES", 1000)
    records = list(wds.read_tar(wds.Shard(str(shard), 2)))
    assert [r.name.rsplit(":", 1)[1] for r in records] == ["a", "b"]
    assert records[0].data is None and "a.jpg: 5,000 bytes, over the limit" in records[0].error
    assert records[1].data == b"1" * 10 and records[1].label == 1 and records[1].error is None


def test_label_subsets_need_random_access(shards):
    cfg = load_config(
        "demo", ["data.name=webdataset", f"data.root={shards}", "data.label_fraction=0.5"]
    )
    from heatssl.data.datamodule import HeatDataModule

    with pytest.raises(ConfigError, match=r"label_fraction=0\.5.*stream"):
        HeatDataModule(cfg.data, labelled=True).setup()


def test_without_the_package_the_error_names_the_extra(shards, monkeypatch):
    monkeypatch.setattr(wds.importlib.util, "find_spec", lambda name: None)
    cfg = load_config("demo", ["data.name=webdataset", f"data.root={shards}"])
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[webdataset\]"'):
        build_datamodule(cfg.data).setup()


def test_sigterm_mid_epoch_then_resume_reads_the_rest_of_the_epoch_in_order(shards, tmp_path):
    """The documented rule: the resumed epoch re-reads (not decodes) what it had delivered and
    yields the remaining batches, in the unbroken run's order; nothing skipped or repeated."""
    settings = [*_settings(tmp_path, shards, "data.num_workers=2", "data.batch_size=4")]
    check_sigterm_then_resume(tmp_path, settings, batches_per_epoch=5)  # 24 images, 2 workers
