"""Backbones to and from files: a safetensors file that plain timm loads, with how to rebuild it.

The file holds the full timm state dict and, as metadata, the model name, the ``create_model``
arguments and the probed stage. timm loads it with ``pretrained_cfg_overlay=dict(file=...)``.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import timm
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from heatssl.errors import CheckpointError
from heatssl.model.backbone import Backbone

EXPORT_FORMAT = "heatssl-backbone-v1"


def export_backbone(backbone: Backbone, path: str | Path) -> Path:
    """Write the backbone as a safetensors file that plain timm loads.

    The file holds the full timm state dict (the classifier, which pretraining never trains, at its
    default size) and, as metadata, the model name and the ``create_model`` kwargs. Load it with::

        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path), **kwargs)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = dict(backbone.create_kwargs)
    full = timm.create_model(backbone.name, pretrained=False, **kwargs)
    missing, unexpected = full.load_state_dict(backbone.model.state_dict(), strict=False)
    head = set(full.state_dict()) - set(backbone.model.state_dict())
    if unexpected or set(missing) - head:
        raise RuntimeError(f"Export mismatch: missing {missing}, unexpected {unexpected}.")
    tensors = {k: v.detach().cpu().contiguous() for k, v in full.state_dict().items()}
    metadata = {
        "format": EXPORT_FORMAT,
        "model_name": backbone.name,
        "create_kwargs": json.dumps(kwargs),
        "stage": str(backbone.stage),
    }
    save_file(tensors, str(path), metadata=metadata)
    return path


HEAD_FORMAT = "heatssl-head-v1"  # probe heads (heatssl.probing.head_files) name it; defined here


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
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
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
        }.get(meta.get("format") or _head_format(meta.get("heatssl")), "a safetensors file")
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


def _head_format(raw: str | None) -> str | None:
    """The ``format`` inside a probe head's JSON metadata, if any."""
    try:
        info = json.loads(raw) if raw else {}
    except (TypeError, ValueError):
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


_EXPORT_WHAT = "a heatssl backbone export (`heatssl export`)"
_EXPORT_FIX = "`heatssl export RUN/checkpoints/last.ckpt -o FILE` writes one."


def read_export_metadata(path: str | Path) -> dict[str, Any]:
    """Model name, create kwargs and stage stored in an exported file."""
    meta = safetensors_metadata(path, _EXPORT_WHAT, _EXPORT_FIX)
    if meta.get("format") != EXPORT_FORMAT:
        head = _head_format(meta.get("heatssl")) == HEAD_FORMAT
        raise CheckpointError(
            f"{path} is not a heatssl backbone export (metadata format={meta.get('format')!r}, "
            f"expected {EXPORT_FORMAT!r}"
            + ("; it is a probe head: give it to `heatssl heatmaps --head`" if head else "")
            + "). Create one with `heatssl export`."
        )
    try:
        return {
            "model_name": meta["model_name"],
            "create_kwargs": json.loads(meta["create_kwargs"]),
            "stage": int(meta["stage"]),
        }
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(
            f"{path} is a heatssl backbone export with incomplete metadata ({err!r} is missing or "
            f"malformed; it has {sorted(meta)}). {_EXPORT_FIX}"
        ) from err


def load_exported_backbone(
    path: str | Path, image_size: int | None = None, check_size: bool = True
) -> Backbone:
    """Rebuild a :class:`~heatssl.model.backbone.Backbone` from an exported safetensors file."""
    meta = read_export_metadata(path)
    kwargs = dict(meta["create_kwargs"])
    output_stride = kwargs.pop("output_stride", None)
    backbone = Backbone(
        meta["model_name"],
        stage=meta["stage"],
        image_size=image_size,
        output_stride=output_stride,
        check_size=check_size,
        **kwargs,
    )
    state = safetensors_tensors(path, _EXPORT_WHAT, _EXPORT_FIX)
    own = backbone.model.state_dict()
    missing = [k for k in own if k not in state]
    reshaped = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or reshaped:
        example = (
            f"e.g. {reshaped[0]}: file {list(state[reshaped[0]].shape)}, "
            f"{meta['model_name']} {list(own[reshaped[0]].shape)}"
            if reshaped
            else f"e.g. {missing[0]} missing"
        )
        raise CheckpointError(
            f"{path}: its weights do not fit the model its metadata names ({meta['model_name']} "
            f"with {meta['create_kwargs']}): {len(reshaped)} tensors of another shape, "
            f"{len(missing)} missing ({example}); they come from another architecture. "
            f"{_EXPORT_FIX}"
        )
    backbone.model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)
    return backbone
