"""Tests for heatssl.runs.head_files: heads round-trip through safetensors; other files are refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from heatssl.errors import ArgumentError, CheckpointError
from heatssl.model.heads import LinearHead, Tran1Head
from heatssl.probing.probes import train_head
from heatssl.runs.head_files import load_head, load_linear_head, save_head
from tests.probing.synthetic import grids, trained_linear_head


@pytest.fixture(scope="module")
def trained_linear():
    return trained_linear_head()


# ----------------------------------------------------------------------------------- save / load


def test_save_load_linear_round_trip(tmp_path, trained_linear):
    head, x = trained_linear
    names = ["a", "b", "c"]
    path = save_head(head, tmp_path / "sub" / "linear.safetensors", names, backbone="r18", epoch=3)
    assert path.is_file()
    loaded, info = load_head(path)
    assert isinstance(loaded, LinearHead) and not loaded.training
    assert info["kind"] == "linear" and info["class_names"] == names
    assert info["in_dim"] == 8 and info["num_classes"] == 3
    assert info["backbone"] == "r18" and info["epoch"] == 3
    head.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), head(x))
    assert torch.equal(loaded.bn.running_var, head.bn.running_var)


def test_save_load_tran1_round_trip(tmp_path):
    torch.manual_seed(0)
    x, y = grids(8, 3, 16, seed=3)
    head = Tran1Head(16, 3, tokens=4, heads=4)
    train_head(head, x, y, 1, 8, "adamw", base_lr=0.01)
    path = save_head(head, tmp_path / "tran1.safetensors", ["x", "y", "z"], stage=-1)
    loaded, info = load_head(path)
    assert isinstance(loaded, Tran1Head) and not loaded.training
    assert info["kind"] == "tran1" and info["class_names"] == ["x", "y", "z"]
    assert info["in_dim"] == 16 and info["num_classes"] == 3
    assert info["tokens"] == 4 and info["heads"] == 4 and info["stage"] == -1
    assert loaded.block.attn.num_heads == 4
    head.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), head(x))


def test_load_head_refuses_foreign_file(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"fc.weight": torch.zeros(2, 3)}, str(plain))
    with pytest.raises(CheckpointError, match="not a heatssl probe head"):
        load_head(plain)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(1)}, str(other), metadata={"heatssl": '{"format": "other"}'})
    with pytest.raises(CheckpointError):
        load_head(other)


def test_missing_or_damaged_head_files_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_head(tmp_path / "nowhere.safetensors")
    text = tmp_path / "notes.safetensors"
    text.write_text("not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_head(text)
    good = save_head(LinearHead(4, 2), tmp_path / "h.safetensors", ["a", "b"])
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:40])  # a copy that stopped early
    with pytest.raises(CheckpointError, match="truncated"):
        load_head(cut)


def test_save_head_refuses_reserved_metadata(tmp_path):
    with pytest.raises(ArgumentError, match="kind"):
        save_head(LinearHead(4, 2), tmp_path / "h.safetensors", ["a", "b"], kind="other")


def test_load_linear_head_refuses_a_tran1_head(tmp_path):
    path = save_head(Tran1Head(16, 2, tokens=4, heads=4), tmp_path / "t.safetensors", ["a", "b"])
    with pytest.raises(CheckpointError, match="tran1 head; this needs the linear probe head"):
        load_linear_head(path)
    head, names = load_linear_head(
        save_head(LinearHead(4, 2), tmp_path / "l.safetensors", ["a", "b"])
    )
    assert isinstance(head, LinearHead) and names == ["a", "b"]


def test_a_cut_head_is_truncated_and_a_head_with_wrong_contents_is_refused(tmp_path):
    good = save_head(Tran1Head(16, 3, tokens=4, heads=4), tmp_path / "t.safetensors", list("abc"))
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    for size in (20, len(data) // 2, len(data) - 1):  # in the header, in the tensors, the last byte
        cut.write_bytes(data[:size])
        with pytest.raises(CheckpointError) as caught:
            load_head(cut)
        message = str(caught.value)
        assert f"cut.safetensors is truncated: it ends after {size} of the" in message
        assert "cut short" in message and "`heatssl probe` writes one" in message
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty \(0 bytes\)"):
        load_head(tmp_path / "empty.safetensors")

    tensors = {k: v.contiguous() for k, v in LinearHead(4, 2).state_dict().items()}
    info = {"format": "heatssl-head-v1", "kind": "linear", "class_names": ["a", "b"]}
    save_file(
        tensors, str(tmp_path / "no_sizes.safetensors"), metadata={"heatssl": json.dumps(info)}
    )
    with pytest.raises(CheckpointError, match=r"incomplete metadata \(missing \['in_dim', 'num_"):
        load_head(tmp_path / "no_sizes.safetensors")
    info.update(in_dim=8, num_classes=2)  # sizes that the tensors (in_dim 4) do not have
    save_file(tensors, str(tmp_path / "other.safetensors"), metadata={"heatssl": json.dumps(info)})
    with pytest.raises(CheckpointError, match=r"tensors do not fit the linear head .*in_dim=8"):
        load_head(tmp_path / "other.safetensors")
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"heatssl": "{not json"})
    with pytest.raises(CheckpointError, match="not a heatssl probe head"):
        load_head(tmp_path / "bad.safetensors")
