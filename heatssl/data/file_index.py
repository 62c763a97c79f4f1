"""The file list of a class-folder split: scanned once, cached beside the run, shared by every process.

Listing ImageNet's 1.28M files takes minutes on a shared file system, and every process of every node
would do it at every start and requeue. :func:`class_folder_index` does it once: process 0 scans
(:func:`scan_class_folder`, torchvision's ``ImageFolder`` order) and writes the list to a gzipped JSON
file in ``index_dir`` (the run folder); the other processes read that file. The file is reused by
later starts while every folder it walked keeps its modification time (adding, removing or renaming a
file changes its folder's time), so a changed dataset is scanned again and an unchanged one never is.

The scan follows directory links, as ImageFolder does, except those that lead back into the tree
being scanned (a loop, or the same files listed twice): they are skipped and named in one warning.
"""

from __future__ import annotations

import gzip
import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchvision.datasets.folder import IMG_EXTENSIONS

from heatssl.errors import ConfigError, HeatSSLWarning

INDEX_VERSION = 1
WAIT_FOR_SCAN_S = 3 * 3600.0
"""How long a process waits for process 0's scan (marked by ``<index>.scanning``) to finish."""
WAIT_FOR_START_S = 120.0
"""How long a process waits for process 0's index or its marker before scanning itself (the run
folder may not be shared between nodes)."""
POLL_S = 1.0


@dataclass
class FolderIndex:
    """A class-folder split: class names, ``(path, label)`` samples, and the folders walked with
    their modification times (what decides whether a cached index is still true)."""

    root: str
    classes: list[str]
    samples: list[tuple[str, int]]
    dirs: dict[str, int] = field(default_factory=dict)  # path relative to root -> st_mtime_ns
    skipped_links: list[str] = field(default_factory=list)


def _inside(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree.rstrip(os.sep) + os.sep)


def _walk(start: str, tree: str, index: FolderIndex) -> list[tuple[str, list[str]]]:
    """(folder, image file names) for ``start`` and every folder below it, links followed unless
    they lead back into ``tree`` (the real path of the scanned root)."""
    found: list[tuple[str, list[str]]] = []
    seen: set[tuple[int, int]] = set()
    stack = [start]
    while stack:
        folder = stack.pop()
        try:
            info = os.stat(folder)
            entries = list(os.scandir(folder))
        except OSError as err:
            raise ConfigError(f"Cannot read the folder {folder}: {err.strerror or err}.") from err
        key = (info.st_dev, info.st_ino)
        if key in seen:
            index.skipped_links.append(f"{folder} (a loop: this folder was listed already)")
            continue
        seen.add(key)
        index.dirs[os.path.relpath(folder, index.root)] = info.st_mtime_ns
        files = []
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # follows links
            except OSError:
                continue
            if not is_dir:
                if entry.name.lower().endswith(IMG_EXTENSIONS):
                    files.append(entry.name)
                continue
            if entry.is_symlink():
                target = os.path.realpath(entry.path)
                if _inside(target, tree):
                    index.skipped_links.append(f"{entry.path} -> {target}")
                    continue
            stack.append(entry.path)
        found.append((folder, sorted(files)))
    return found


def scan_class_folder(
    root: str | Path, classes: list[str] | None = None, allow_empty: bool = False
) -> FolderIndex:
    """Every image file under ``root/<class>/`` in ImageFolder's order (classes sorted, folders
    sorted by path, files by name), labelled by class; ``classes`` fixes the class list (val takes
    train's), else it is the sorted sub-folders of ``root``. ``allow_empty=False`` refuses a class
    folder without an image file, as ImageFolder does."""
    root_s = str(root)
    index = FolderIndex(root=root_s, classes=[], samples=[])
    tree = os.path.realpath(root_s)
    try:
        index.dirs["."] = os.stat(root_s).st_mtime_ns
        names = sorted(e.name for e in os.scandir(root_s) if e.is_dir())
    except OSError as err:
        raise ConfigError(f"Cannot read the folder {root_s}: {err.strerror or err}.") from err
    index.classes = list(classes) if classes is not None else names
    empty = []
    for label, name in enumerate(index.classes):
        start = os.path.join(root_s, name)
        if not os.path.isdir(start):
            continue  # a val split without this class
        if os.path.islink(start) and _inside(os.path.realpath(start), tree):
            index.skipped_links.append(f"{start} -> {os.path.realpath(start)}")
            continue
        walked = sorted(_walk(start, tree, index))
        count = len(index.samples)
        index.samples += [(os.path.join(d, f), label) for d, files in walked for f in files]
        if len(index.samples) == count:
            empty.append(name)
    if empty and not allow_empty:
        raise ConfigError(
            f"No image file ({', '.join(IMG_EXTENSIONS)}) in the class folder(s) "
            f"{', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''} of {root_s}. Add images or "
            f"remove the empty folder(s)."
        )
    if index.skipped_links:
        shown = "; ".join(index.skipped_links[:5])
        more = f" and {len(index.skipped_links) - 5} more" if len(index.skipped_links) > 5 else ""
        warnings.warn(
            f"{root_s}: not followed: {len(index.skipped_links)} folder link(s) that lead back "
            f"into the folder tree (a loop, or the same images twice): {shown}{more}",
            HeatSSLWarning,
            stacklevel=2,
        )
    return index


def _still_true(index: FolderIndex) -> bool:
    """Whether every folder the index walked still has the modification time it had."""
    for rel, mtime in index.dirs.items():
        try:
            if os.stat(os.path.join(index.root, rel)).st_mtime_ns != mtime:
                return False
        except OSError:
            return False
    return True


def _load(path: Path) -> dict[str, Any] | None:
    """The JSON object in the gzipped ``path``, or None when missing or unreadable."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, EOFError):
        return None
    return data if isinstance(data, dict) else None


def _save(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically (a temporary name in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=3) as f:
            json.dump(data, f, separators=(",", ":"))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def shared_index(
    path: str | Path | None,
    rank: int,
    build: Callable[[], dict[str, Any]],
    valid: Callable[[dict[str, Any]], bool],
) -> dict[str, Any]:
    """``build()`` once per state of the data, shared through the gzipped JSON file ``path``.

    Without ``path`` it is built every call. With it, process 0 (``rank == 0``) reuses the file
    while ``valid`` says it still describes the data, else builds and writes it; other processes
    wait for process 0's file (while its ``.scanning`` marker says it is at work) and read it, and
    build it themselves when neither appears within :data:`WAIT_FOR_START_S` (a run folder that is
    not shared between nodes).
    """
    if path is None:
        return build()
    path = Path(path)
    marker = path.with_name(path.name + ".scanning")

    def found() -> dict[str, Any] | None:
        data = _load(path)
        try:
            return data if data is not None and valid(data) else None
        except (KeyError, TypeError, ValueError):
            return None

    if rank == 0:
        data = found()
        if data is not None:
            return data
        path.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(os.getpid()))
        try:
            data = build()
            _save(path, data)
        finally:
            marker.unlink(missing_ok=True)
        return data
    start = time.monotonic()
    while (data := found()) is None:
        waited = time.monotonic() - start
        if waited > (WAIT_FOR_SCAN_S if marker.exists() else WAIT_FOR_START_S):
            return build()
        time.sleep(POLL_S)
    return data


def class_folder_index(
    root: str | Path,
    index_file: str | Path | None = None,
    rank: int = 0,
    classes: list[str] | None = None,
    allow_empty: bool = False,
) -> FolderIndex:
    """:func:`scan_class_folder`, scanned once per dataset state and shared through ``index_file``
    (:func:`shared_index`): reused while every folder it walked keeps its modification time."""
    root_s = str(root)
    start = len(root_s.rstrip(os.sep)) + 1

    def build() -> dict[str, Any]:
        index = scan_class_folder(root_s, classes, allow_empty)
        return {
            "version": INDEX_VERSION,
            "root": root_s,
            "classes": index.classes,
            "dirs": index.dirs,
            "samples": [[p[start:], label] for p, label in index.samples],
        }

    def valid(data: dict[str, Any]) -> bool:
        if data.get("version") != INDEX_VERSION or data.get("root") != root_s:
            return False
        if classes is not None and data.get("classes") != list(classes):
            return False
        dirs = {str(k): int(v) for k, v in data["dirs"].items()}
        return _still_true(FolderIndex(root_s, [], [], dirs))

    data = shared_index(index_file, rank, build, valid)
    return FolderIndex(
        root=root_s,
        classes=list(data["classes"]),
        samples=[(os.path.join(root_s, rel), int(label)) for rel, label in data["samples"]],
        dirs={str(k): int(v) for k, v in data["dirs"].items()},
    )
