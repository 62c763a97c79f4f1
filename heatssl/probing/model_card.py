"""The model card (``README.md``) of an exported timm folder: what was trained, how, and how well.

Written from the run's own files: the config stored in the checkpoint, the step count, and the probe
figures of ``RUN/probe/metrics.json`` when ``heatssl probe`` has run. The front matter is the Hugging
Face Hub's (``library_name: timm``), so the folder can be uploaded as it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from heatssl.config import Config


def probe_metrics(run_dir: Path) -> dict[str, Any] | None:
    """``RUN/probe/metrics.json`` if the run was probed, else ``None``."""
    path = run_dir / "probe" / "metrics.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def model_card(
    cfg: Config,
    folder_name: str,
    global_step: int,
    metrics: dict[str, Any] | None,
    num_classes: int,
) -> str:
    """The card's markdown for a backbone pretrained with ``cfg`` for ``global_step`` steps."""
    m, d = cfg.model, cfg.data
    lines = [
        "---",
        "library_name: timm",
        "tags:",
        "- image-feature-extraction" if num_classes == 0 else "- image-classification",
        "- timm",
        "- heatssl",
        "- self-supervised",
        "---",
        "",
        f"# {m.backbone}, pretrained with QB-Heat (heatssl)",
        "",
        f"A `{m.backbone}` backbone pretrained without labels by heatssl's QB-Heat objective: the "
        "encoder sees one quarter of each image, learned first-order heat operators extrapolate "
        "its feature map to the other three quarters, and a small decoder reconstructs the "
        "pixels; a heat-equation residual loss shapes the feature maps.",
        "",
        "## Use",
        "",
        "```python",
        "import timm",
        f'model = timm.create_model("local-dir:{folder_name}", pretrained=True)  # or "hf-hub:..."',
        "config = timm.data.resolve_data_config({}, model=model)",
        "transform = timm.data.create_transform(**config)",
        "```",
        "",
        (
            "`model(x)` returns the pooled features (no classifier)."
            if num_classes == 0
            else f"`model(x)` returns logits over {num_classes} classes: the linear probe's head "
            "folded into timm's classifier (`label_names` in `config.json`)."
        ),
        "",
        "## Training",
        "",
        "| | |",
        "| --- | --- |",
        f"| data | `{d.name}`{f' ({d.root})' if d.root else ''}, {d.image_size} px |",
        f"| steps | {global_step} ({cfg.trainer.max_epochs} epochs planned), batch {d.batch_size} "
        "per process |",
        f"| model arguments | output stride {m.output_stride}, {m.kwargs or 'none other'} |",
        f"| heat | `{cfg.heat.predictor}` predictor, `{cfg.heat.step}` steps, heat-loss weight "
        f"{cfg.heat.heat_weight} |",
        f"| optimiser | AdamW, base lr {cfg.optim.base_lr}, weight decay {cfg.optim.weight_decay} |",
        f"| seed | {cfg.seed} |",
        "",
    ]
    if metrics:
        probes = metrics.get("probes", {})
        lines += [
            "## Frozen-backbone probes (heatssl probe, val split)",
            "",
            "| probe | top-1 |",
            "| --- | --- |",
            *(f"| {kind} | {p['top1']:.1f} |" for kind, p in probes.items() if "top1" in p),
            "",
            f"{metrics.get('train_images', '?')} training and {metrics.get('val_images', '?')} "
            f"val images at {metrics.get('image_size', '?')} px.",
            "",
        ]
    else:
        lines += ["No probe figures: run `heatssl probe` on the checkpoint before exporting.", ""]
    return "\n".join(lines)
