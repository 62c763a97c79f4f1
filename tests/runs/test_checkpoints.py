"""Checkpoints on disk: a kill mid-write keeps the previous file; files needing pickle are refused."""

import argparse
import signal
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

from heatssl.cli import main
from heatssl.config import load_config
from heatssl.errors import CheckpointError
from heatssl.runs.checkpoints import (
    atomic_torch_save,
    safe_torch_load,
    trusted_checkpoints,
)
from heatssl.runs.exports import export_checkpoint
from heatssl.runs.sources import checkpoint_config, qbheat_from_checkpoint
from heatssl.runs.trainer import AtomicCheckpointIO
from heatssl.train import pretrain as run
from heatssl.train.pretrain_module import HeatPretrainModule
from tests.helpers import same_on_every_rank, tiny_settings

# A child process writes a good checkpoint, then a second one whose write stalls halfway (the bytes
# written so far are flushed to the file); the parent kills it there with SIGKILL.
CHILD = textwrap.dedent(
    """
    import io, sys, time, torch
    import heatssl.runs.checkpoints as cio
    from heatssl.runs.trainer import AtomicCheckpointIO

    path = sys.argv[1]
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.ones(100_000)}, path)

    real_save = torch.save

    def stalling_save(obj, f):
        buf = io.BytesIO()
        real_save(obj, buf)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        print("half written", flush=True)
        time.sleep(120)
        f.write(data[len(data) // 2 :])

    cio.torch.save = stalling_save
    AtomicCheckpointIO().save_checkpoint({"step": 2, "w": torch.zeros(100_000)}, path)
    """
)


def test_a_kill_mid_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "half written"
        partial = [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
        assert partial and partial[0].stat().st_size > 0  # the new file was really half written
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.ones(100_000))


def test_atomic_save_replaces_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "a.ckpt"
    atomic_torch_save({"step": 1}, path)
    AtomicCheckpointIO().save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.ckpt"]


def test_a_checkpoint_that_needs_pickle_is_refused_unless_trusted(tiny_overrides, capsys):
    cfg = load_config("demo", tiny_overrides)
    ckpt = run.pretrain(cfg).last_checkpoint
    data = torch.load(ckpt, weights_only=True)
    data["hyper_parameters"]["extra"] = argparse.Namespace(note="a pickled object")
    torch.save(data, ckpt)

    assert main(["export", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "pickled Python objects" in err and "--trust-checkpoint" in err
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        run.pretrain(cfg, resume="last")  # resuming reads the same file: refused too

    assert main(["export", str(ckpt), "--trust-checkpoint"]) == 0  # the explicit opt-in
    with trusted_checkpoints():
        assert safe_torch_load(ckpt)["hyper_parameters"]["extra"].note == "a pickled object"
    with pytest.raises(CheckpointError):
        safe_torch_load(ckpt)  # the opt-in ends with its block


# ------------------------------------------------------------------ damaged and foreign input files


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory):
    """A checkpoint and its export as `heatssl pretrain` / `heatssl export` write them (tiny run)."""
    folder = tmp_path_factory.mktemp("real")
    ckpt = run.pretrain(load_config("demo", tiny_settings(folder / "run"))).last_checkpoint
    return ckpt, export_checkpoint(ckpt)


def _record_start(path, name_end: str) -> tuple[int, int]:
    """(first data byte, size) of the zip record whose name ends with ``name_end``."""
    with zipfile.ZipFile(path) as z:
        info = max(
            (i for i in z.infolist() if i.filename.endswith(name_end)), key=lambda i: i.file_size
        )
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def _damaged(path, match: str, mmap: bool = False) -> str:
    with pytest.raises(CheckpointError, match=match) as caught:
        safe_torch_load(path, mmap=mmap)
    message = str(caught.value)
    assert str(path) in message and "--trust-checkpoint" not in message and "\n" not in message
    return message


def test_truncated_empty_and_foreign_files_say_what_they_are(real_checkpoint, tmp_path):
    ckpt, export = real_checkpoint
    data = ckpt.read_bytes()
    for cut in (100, len(data) // 2, len(data) - 10):  # a copy cut short anywhere
        (tmp_path / "cut.ckpt").write_bytes(data[:cut])
        for mmap in (False, True):  # the resume check maps the file
            message = _damaged(
                tmp_path / "cut.ckpt", "is truncated: it ends before its zip directory", mmap
            )
            assert f"{cut} bytes" in message and "cut short" in message
            assert "RUN/checkpoints/last.ckpt" in message
    (tmp_path / "empty.ckpt").write_bytes(b"")
    _damaged(tmp_path / "empty.ckpt", r"is empty \(0 bytes\).*Copy it again")
    (tmp_path / "text.ckpt").write_text("hello\n")
    _damaged(tmp_path / "text.ckpt", "is not a PyTorch checkpoint: it is a text file .*'hello'")
    renamed = tmp_path / "backbone.ckpt"
    renamed.write_bytes(export.read_bytes())  # a real export under a checkpoint's name
    message = _damaged(renamed, r"not a PyTorch checkpoint but a heatssl backbone export \(safe")
    assert "`heatssl probe` and `heatssl heatmaps` read it under a .safetensors name" in message
    with zipfile.ZipFile(tmp_path / "notes.ckpt", "w") as z:
        z.writestr("notes/readme.txt", "not a checkpoint")
    _damaged(tmp_path / "notes.ckpt", r"it is a zip archive of other files \(notes/readme.txt\)")
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "model.ckpt")
    _damaged(tmp_path / "model.ckpt", r"it is a TorchScript model \(torch.jit.save\)")
    _damaged(tmp_path / "nowhere.ckpt", "does not exist")


def test_bytes_damaged_inside_an_intact_zip_are_refused_not_loaded_or_trusted(
    real_checkpoint, tmp_path
):
    ckpt, _ = real_checkpoint
    for record in ("/data.pkl", "/0"):  # the pickled structure, then a tensor's bytes
        data = bytearray(ckpt.read_bytes())
        start, size = _record_start(ckpt, record)
        data[start + size // 3 : start + size // 3 + 16] = b"\xff" * 16
        bad = tmp_path / "bad.ckpt"
        bad.write_bytes(bytes(data))
        _damaged(bad, r"is damaged: .*Bad CRC-32 for file '.*" + record + "'.*Copy it again")
    # torch itself reads the damaged tensor without a word: the check above is heatssl's
    torch.load(bad, weights_only=True)


def test_a_legacy_format_checkpoint_loads_and_a_cut_one_is_damaged(real_checkpoint, tmp_path):
    ckpt, _ = real_checkpoint
    state = torch.load(ckpt, weights_only=True)
    legacy = tmp_path / "legacy.ckpt"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    for mmap in (False, True):  # torch cannot map the legacy format: read instead
        loaded = safe_torch_load(legacy, mmap=mmap)
        assert loaded["global_step"] == state["global_step"]
    data = legacy.read_bytes()
    for cut in (300, len(data) // 2):
        (tmp_path / "cut.ckpt").write_bytes(data[:cut])
        _damaged(tmp_path / "cut.ckpt", "is damaged: ")


def test_a_checkpoint_whose_weights_are_of_another_architecture_is_refused(
    real_checkpoint, tmp_path
):
    ckpt, _ = real_checkpoint  # test_resnet
    data = torch.load(ckpt, weights_only=True)
    vit = HeatPretrainModule(load_config("demo", same_on_every_rank(tmp_path / "vit")))
    data["state_dict"] = vit.state_dict()  # real weights of a test_vit run under its config
    torch.save(data, tmp_path / "swapped.ckpt")
    with pytest.raises(CheckpointError) as caught:
        qbheat_from_checkpoint(tmp_path / "swapped.ckpt")
    message = str(caught.value)
    assert "swapped.ckpt: its weights do not fit the model its config describes" in message
    assert "model.backbone=test_resnet" in message and "missing" in message
    assert "unexpected (e.g. " in message and "another architecture" in message
    assert "--trust-checkpoint" not in message
    data["hyper_parameters"] = {}
    torch.save(data, tmp_path / "bare.ckpt")
    with pytest.raises(CheckpointError, match="not a heatssl pretraining checkpoint"):
        checkpoint_config(tmp_path / "bare.ckpt")
