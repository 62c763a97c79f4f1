"""What a file is, and safetensors files read with the reason when they cannot be.

heatssl's files are recognised by their first bytes (:func:`describe_file`): a message about a wrong
file says what it is instead (text, an HTML page, a Git LFS pointer, a PyTorch checkpoint, a backbone
export, a probe head, cut short, ...). Safetensors exports and probe heads are read through
:func:`safetensors_metadata` and :func:`safetensors_tensors`, which turn every failure into one
:class:`~heatssl.errors.CheckpointError` naming the file, what it is and the fix.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from heatssl.errors import CheckpointError

EXPORT_FORMAT = "heatssl-backbone-v1"
"""The ``format`` metadata of a backbone export (``heatssl export``)."""


HEAD_FORMAT = "heatssl-head-v1"
"""The ``format`` inside a probe head's metadata (:mod:`heatssl.runs.head_files`)."""


def _safetensors_extent(path: Path, head: bytes, size: int) -> tuple[int, dict[str, str]] | None:
    """(bytes the file should have, its metadata) if ``path`` is laid out as safetensors, else None.

    The layout: an 8-byte little-endian header length, the JSON header (``{...}``), the tensor data.
    A file cut inside its header gives at least the header's end and no metadata.
    """
    if len(head) < 9 or head[8:9] != b"{":
        return None
    n = int.from_bytes(head[:8], "little")
    if n > 100_000_000:  # safetensors' own limit on a header
        return None
    if n > size - 8:
        return 8 + n, {}
    try:
        with open(path, "rb") as f:
            f.seek(8)
            header = json.loads(f.read(n))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        meta = header.get("__metadata__") or {}
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
        return None
    return 8 + n + max(ends, default=0), meta if isinstance(meta, dict) else {}


def _zip_kind(path: Path) -> str:
    """A zip archive in words: a PyTorch checkpoint, a TorchScript model or some other archive."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return "a zip archive cut short or damaged (a PyTorch checkpoint?)"
    if any(n.endswith("/constants.pkl") for n in names):
        return "a TorchScript model (torch.jit.save)"
    if any(n.count("/") == 1 and n.endswith("/data.pkl") for n in names):
        return "a PyTorch checkpoint (torch.save)"
    return f"a zip archive of other files ({', '.join(names[:3]) or 'none'})"


def describe_file(path: str | Path) -> str:
    """What ``path`` holds, in words, judged from its first bytes: for messages about a wrong file.

    E.g. "a text file (it starts 'hello')", "a heatssl backbone export (safetensors)", "a PyTorch
    checkpoint (torch.save)", "empty (0 bytes)"; a safetensors file shorter than its header says is
    named as cut short.
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return "empty (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(512)
    extent = _safetensors_extent(path, head, size)
    if extent is not None:
        expected, meta = extent
        kind = {
            EXPORT_FORMAT: "a heatssl backbone export (safetensors, `heatssl export`)",
            HEAD_FORMAT: "a probe head (safetensors, `heatssl probe`)",
        }.get(meta.get("format") or head_format(meta.get("heatssl")), "a safetensors file")
        if size < expected:
            kind += f", cut short ({size} of {expected} bytes)"
        return kind
    if head.startswith(b"PK\x03\x04"):
        return _zip_kind(path)
    if head.startswith(b"\x80"):
        return "a Python pickle"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip archive (unpack it first?)"
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy array (.npy)"
    if head.startswith(b"\x89HDF"):
        return "an HDF5 file"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:  # also a multi-byte character cut at byte 512: judged as binary
        text = None
    if text is None or any(c < " " and c not in "\t\n\r" for c in text):
        return f"binary data of another format (it starts {head[:8]!r})"
    if text.startswith("version https://git-lfs"):
        return "a Git LFS pointer, not the file itself (fetch it: `git lfs pull`)"
    if text.lstrip()[:15].lower().startswith(("<!doctype html", "<html")):
        return "an HTML page (a download that got a web page instead of the file?)"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"a text file (it starts {first[:40]!r})"


def head_format(raw: str | None) -> str | None:
    """The ``format`` inside a probe head's JSON metadata, if any."""
    try:
        info = json.loads(raw) if raw else {}
    except (TypeError, ValueError, RecursionError):
        return None
    return info.get("format") if isinstance(info, dict) else None


def safetensors_metadata(
    path: str | Path, what: str, fix: str = "Write it again."
) -> dict[str, str]:
    """The metadata of a safetensors file; a missing or unreadable file is a :class:`CheckpointError`.

    ``what`` names what the file should be (for the message), e.g. "a heatssl backbone export";
    ``fix`` says how to get a good one. The message says what the file is instead: empty, cut short
    (a copy or download that stopped), text, a PyTorch checkpoint, ...
    """
    if not Path(path).is_file():
        raise CheckpointError(f"{path} does not exist. Give the path of {what}.")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(_unreadable_safetensors(Path(path), what, fix, err)) from err


def _unreadable_safetensors(path: Path, what: str, fix: str, err: Exception) -> str:
    """The message for a file that safetensors cannot open: what it is instead, and the fix."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            extent = _safetensors_extent(path, f.read(512), size)
        looks = describe_file(path)
    except OSError:
        return f"{path} could not be read ({err}); it should be {what}. {fix}"
    if size == 0:
        return f"{path} is empty (0 bytes); it should be {what}. {fix}"
    if extent is not None and size < extent[0]:
        return (
            f"{path} is truncated: it ends after {size} of the {extent[0]} bytes its header "
            f"describes; a copy or download cut short? It should be {what}. Copy it again; if the "
            f"original is cut short too: {fix}"
        )
    if extent is not None:  # the layout is right, the content is not
        return f"{path} is a damaged safetensors file ({err}); it should be {what}. {fix}"
    return f"{path} is not a readable safetensors file: it is {looks}; it should be {what}. {fix}"


def safetensors_tensors(path: str | Path, what: str, fix: str = "Write it again.") -> dict:
    """Every tensor of a safetensors file whose metadata was read; a failure is a CheckpointError."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(_unreadable_safetensors(Path(path), what, fix, err)) from err
