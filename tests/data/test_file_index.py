"""An image folder's file list: ImageFolder's order, scanned once per dataset state, shared by every
process through the run folder, and no directory link followed back into the tree."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from heatssl.data import file_index
from heatssl.data.file_index import class_folder_index, scan_class_folder
from heatssl.errors import ConfigError, HeatSSLWarning


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (10, 20, 30)).save(path, format="PNG")


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "train"
    for name in ["b/2.png", "b/10.PNG", "b/sub/1.png", "b/sub/deeper/0.png", "a/z.png", "a/y.jpeg"]:
        _image(root / name)
    (root / "a" / "notes.txt").write_text("not an image")
    return root


def test_the_scan_gives_imagefolders_classes_samples_and_order(tree):
    ours = scan_class_folder(tree)
    theirs = ImageFolder(str(tree))
    assert ours.classes == theirs.classes
    assert ours.samples == theirs.samples


def test_the_index_is_written_once_and_reused_until_a_folder_changes(tree, tmp_path, monkeypatch):
    index = tmp_path / "run" / "file_index" / "train.json.gz"
    first = class_folder_index(tree, index)
    assert index.is_file()
    monkeypatch.setattr(file_index, "scan_class_folder", lambda *a, **k: pytest.fail("scanned"))
    again = class_folder_index(tree, index)  # a requeue: read, not scanned
    assert again.samples == first.samples and again.classes == first.classes
    monkeypatch.undo()
    _image(tree / "b" / "sub" / "deeper" / "new.png")  # the deepest folder's time changes
    changed = class_folder_index(tree, index)
    assert len(changed.samples) == len(first.samples) + 1


def test_other_processes_wait_for_process_0s_index_instead_of_scanning(tree, tmp_path, monkeypatch):
    monkeypatch.setattr(file_index, "POLL_S", 0.01)
    index = tmp_path / "run" / "file_index" / "train.json.gz"
    index.parent.mkdir(parents=True)
    marker = index.with_name(index.name + ".scanning")
    marker.write_text("0")  # process 0 is scanning
    scans = []
    real = file_index.scan_class_folder
    monkeypatch.setattr(
        file_index,
        "scan_class_folder",
        lambda *a, **k: scans.append(threading.current_thread().name) or real(*a, **k),
    )
    got: dict = {}
    waiter = threading.Thread(
        target=lambda: got.update(index=class_folder_index(tree, index, rank=1)), name="rank1"
    )
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive()  # still waiting for process 0
    expected = class_folder_index(tree, index, rank=0)  # process 0 scans and writes
    waiter.join(10)
    assert got["index"].samples == expected.samples
    assert scans == ["MainThread"]  # only process 0 scanned


def test_without_process_0s_index_or_marker_a_process_scans_itself(tree, tmp_path, monkeypatch):
    """A run folder that is not shared between nodes: waiting for ever would hang the node."""
    monkeypatch.setattr(file_index, "POLL_S", 0.01)
    monkeypatch.setattr(file_index, "WAIT_FOR_START_S", 0.05)
    got = class_folder_index(tree, tmp_path / "local" / "train.json.gz", rank=3)
    assert len(got.samples) == 6


def test_links_back_into_the_tree_are_not_followed_and_are_named(tree, tmp_path):
    """One loop repeated the data set 40 times through ImageFolder; two hung the scan."""
    os.symlink(tree / "b", tree / "b" / "sub" / "loop")  # back to an ancestor
    os.symlink(tree / "a", tree / "b" / "twin")  # the same files twice, under another class
    outside = tmp_path / "elsewhere"
    _image(outside / "x.png")
    os.symlink(outside, tree / "a" / "more")  # a link out of the tree is followed
    with pytest.warns(HeatSSLWarning, match=r"not followed: 2 folder link.*loop.*twin"):
        found = scan_class_folder(tree)
    paths = [Path(p).relative_to(tree).as_posix() for p, _ in found.samples]
    assert len(paths) == len(set(paths)) == 7
    assert "a/more/x.png" in paths


def test_a_class_folder_without_images_is_refused_by_name(tmp_path):
    _image(tmp_path / "train" / "a" / "1.png")
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"No image file .* class folder\(s\) empty"):
        scan_class_folder(tmp_path / "train")
