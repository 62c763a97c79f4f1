"""Files heatssl writes: whole or not at all, and never through a link to somewhere else.

Every file goes to a temporary name in its own folder first and is then renamed over the target
(:func:`replace_file`): a reader never sees half a file, and a link at the target's name is replaced
by the file, not followed (writing through ``open(path, "w")`` would change the link's target,
wherever it points). Folders inside an output folder are made with :func:`make_folder`, which
refuses a link among them, so no file lands outside the folder the user chose.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from heatssl.errors import HeatSSLError


class UnsafePathError(HeatSSLError):
    """An output path that would write outside its folder (a link, or a folder of another kind)."""


def make_folder(folder: str | Path, inside: str | Path | None = None) -> Path:
    """Create ``folder`` (and its parents); refuse one that is a link, or a link between it and
    ``inside`` (the output folder it must stay in)."""
    folder = Path(folder)
    stop = Path(inside) if inside is not None else None
    walk = folder
    while True:
        if walk.is_symlink():
            raise UnsafePathError(
                f"{walk} is a link (to {os.readlink(walk)}): heatssl does not write through links "
                f"out of its output folder. Remove the link or choose another output folder."
            )
        if stop is None or walk == stop or walk.parent == walk or stop not in walk.parents:
            break
        walk = walk.parent
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def replace_file(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Write ``path`` by calling ``write(temporary path)``, then renaming it over ``path``.

    The temporary file sits in the same folder and keeps the suffix (savers that add one, such as
    numpy's, keep the name); it is removed if ``write`` fails. A link at ``path`` is replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """:func:`replace_file` for UTF-8 text."""
    return replace_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
