"""Trained probe heads on disk: safetensors files with what rebuilds them (sizes, class names).

``heatssl probe`` writes ``linear_head.safetensors`` and ``tran1_head.safetensors``; heat maps read
the linear one back with :func:`load_linear_head`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from heatssl.errors import ArgumentError, CheckpointError
from heatssl.model.heads import LinearHead, Tran1Head
from heatssl.runs.files import (
    EXPORT_FORMAT,
    HEAD_FORMAT,
    safetensors_metadata,
    safetensors_tensors,
)
from heatssl.writing import replace_file

_RESERVED = {"format", "kind", "class_names", "tokens", "heads", "in_dim", "num_classes"}


def save_head(head: nn.Module, path: str | Path, class_names: list[str], **meta: Any) -> Path:
    """Write a trained head as safetensors with what is needed to rebuild it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if _RESERVED & set(meta):
        raise ArgumentError(f"meta={sorted(_RESERVED & set(meta))}: these names are reserved.")
    kind = "linear" if isinstance(head, LinearHead) else "tran1"
    info = {"format": HEAD_FORMAT, "kind": kind, "class_names": class_names, **meta}
    if isinstance(head, Tran1Head):
        info["tokens"] = head.pos.shape[1]
        info["heads"] = head.block.attn.num_heads
    linear = head if isinstance(head, LinearHead) else head.head
    info["in_dim"], info["num_classes"] = linear.fc.in_features, linear.fc.out_features
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    metadata = {"heatssl": json.dumps(info)}
    return replace_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_head(path: str | Path, kind: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a head saved by :func:`save_head`; return it (eval mode) and its metadata.

    With ``kind`` ("linear" or "tran1") a head of another kind is refused.
    """
    what = "a probe head from `heatssl probe`"
    fix = "`heatssl probe` writes one (RUN/probe/<kind>_head.safetensors)."
    meta = safetensors_metadata(path, what, fix)
    try:
        info = json.loads(meta.get("heatssl") or "{}")
    except ValueError:
        info = None
    if not isinstance(info, dict) or info.get("format") != HEAD_FORMAT:
        export = meta.get("format") == EXPORT_FORMAT
        raise CheckpointError(
            f"{path} is not a heatssl probe head"
            + (": it is a backbone export (give it as the backbone SOURCE)" if export else "")
            + " (write one with `heatssl probe`)."
        )
    need = ["kind", "class_names", "in_dim", "num_classes"]
    need += ["tokens", "heads"] if info.get("kind") == "tran1" else []
    missing = [k for k in need if k not in info]
    if missing or info["kind"] not in ("linear", "tran1"):
        raise CheckpointError(
            f"{path} is a probe head with incomplete metadata (missing {missing} or an unknown "
            f"kind={info.get('kind')!r}). {fix}"
        )
    names = info["class_names"]
    if not isinstance(names, list) or len(names) != info["num_classes"]:
        count = len(names) if isinstance(names, list) else "no list of"
        raise CheckpointError(
            f"{path} has {count} class names for its {info['num_classes']} classes: its metadata "
            f"was edited or belongs to another head. {fix}"
        )
    if kind is not None and info["kind"] != kind:
        raise CheckpointError(
            f"{path} is a {info['kind']} head; this needs the {kind} probe head "
            f"({kind}_head.safetensors in the probe folder)."
        )
    try:
        c = info["num_classes"]
        if info["kind"] == "linear":
            head: nn.Module = LinearHead(info["in_dim"], c)
        else:
            head = Tran1Head(info["in_dim"], c, tokens=info["tokens"], heads=info["heads"])
    except (TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"{path} is a probe head with malformed metadata ({err}). {fix}"
        ) from err
    try:
        head.load_state_dict(safetensors_tensors(path, what, fix))
    except RuntimeError as err:  # tensors that do not fit the sizes in the metadata
        lines = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
        raise CheckpointError(
            f"{path}: its tensors do not fit the {info['kind']} head its metadata describes "
            f"(in_dim={info['in_dim']}, num_classes={c}): {lines[0] if lines else err}. {fix}"
        ) from err
    return head.eval(), info


def load_linear_head(path: str | Path) -> tuple[LinearHead, list[str]]:
    """The linear probe head saved by ``heatssl probe`` (what CAMs read) and its class names."""
    head, info = load_head(path, kind="linear")
    return head, list(info["class_names"])
