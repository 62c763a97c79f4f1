"""Backbones as timm-style folders: ``config.json`` + ``model.safetensors`` (+ a model card).

The layout is the one timm's ``save_for_hf`` writes and ``timm.create_model("local-dir:PATH",
pretrained=True)`` or, once uploaded, ``"hf-hub:user/name"`` reads, with no other argument and
without heatssl installed: the architecture, every ``create_model`` argument the weights need
(``output_stride``, ``patch_size``, ``dynamic_img_size``, ``img_size``, ...) and the input
preprocessing (size, mean / std) are in ``config.json``.

ViTs are written with ``global_pool="avg"`` and ``fc_norm=False``, so that ``model(x)`` is what the
probes read (the final norm on every patch token, then their mean). With a linear probe head the
folder holds a classifier: the head's eval-mode BatchNorm is folded into timm's own classifier
layer, checked on a random batch to give the probe's logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import save_for_hf
from timm.models.vision_transformer import VisionTransformer

from heatssl.errors import ArgumentError
from heatssl.model.backbone import Backbone
from heatssl.model.heads import LinearHead

MEAN = (0.485, 0.456, 0.406)  # heatssl.data.transforms.IMAGENET_MEAN (data is a higher layer)
STD = (0.229, 0.224, 0.225)
HUB_PREFIXES = ("local-dir:", "hf-hub:")


def is_hub_source(source: str) -> bool:
    """Whether ``source`` names a timm folder (``local-dir:PATH``) or a Hub repo (``hf-hub:NAME``)."""
    return source.startswith(HUB_PREFIXES)


def timm_model_args(backbone: Backbone) -> dict[str, Any]:
    """The ``create_model`` arguments of the exported model (the backbone's, plus ViT pooling)."""
    args = dict(backbone.create_kwargs)
    if isinstance(backbone.model, VisionTransformer):
        args.update(global_pool="avg", fc_norm=False)  # model(x): normed patch tokens, averaged
    return args


def export_timm_folder(
    backbone: Backbone,
    out_dir: str | Path,
    image_size: int,
    head: LinearHead | None = None,
    class_names: list[str] | None = None,
    card: str | None = None,
) -> Path:
    """Write ``backbone`` (and optionally a linear probe head) as a timm folder; return it.

    Args:
        backbone: The trained backbone; its stage must be the model's last (the folder holds a
            whole timm model, which has no place for a pruned one).
        out_dir: The folder to write (created; files in it are replaced).
        image_size: The input size the weights were trained and probed at.
        head: A trained :class:`LinearHead` to fold into timm's classifier (``num_classes`` then
            becomes its class count); ``None`` writes a feature extractor (``num_classes: 0``).
        class_names: Names of the head's classes, in label order (``label_names`` in the config).
        card: Text of ``README.md`` (a model card); ``None`` writes none.
    """
    if not backbone.is_last:
        raise ArgumentError(
            f"stage={backbone.stage} is not the last stage of {backbone.name}: a timm folder holds "
            f"a whole timm model, whose later stages this backbone never trained. Use the "
            f"safetensors export (`heatssl export` without --format timm) for it."
        )
    num_classes = 0 if head is None else head.fc.out_features
    model = timm_classifier(backbone, num_classes).eval()
    if head is not None:
        _fold_head(model, backbone, head, image_size)
    return save_timm_folder(
        model, backbone.name, timm_model_args(backbone), out_dir, image_size, class_names, card
    )


def timm_classifier(backbone: Backbone, num_classes: int, **extra: Any) -> torch.nn.Module:
    """A whole timm model with ``backbone``'s weights and a fresh ``num_classes`` classifier.

    ``extra`` are further ``create_model`` arguments that change no weight (``drop_path_rate``).
    Refused where the weights do not fit (anything missing besides the classifier).
    """
    if not backbone.is_last:
        raise ArgumentError(
            f"stage={backbone.stage} is not the last stage of {backbone.name}: a whole timm "
            f"model needs every stage, and this backbone's later ones were never trained."
        )
    args = {**timm_model_args(backbone), **extra}
    model = timm.create_model(backbone.name, pretrained=False, num_classes=num_classes, **args)
    missing, unexpected = model.load_state_dict(backbone.model.state_dict(), strict=False)
    classifier = set(model.state_dict()) - set(backbone.model.state_dict())
    if unexpected or set(missing) - classifier:
        raise ArgumentError(
            f"the backbone's weights do not fit timm's {backbone.name} built with {args}: "
            f"missing {sorted(set(missing) - classifier)[:5]}, unexpected {sorted(unexpected)[:5]}."
        )
    return model


def save_timm_folder(
    model: torch.nn.Module,
    name: str,
    args: dict[str, Any],
    out_dir: str | Path,
    image_size: int,
    class_names: list[str] | None = None,
    card: str | None = None,
) -> Path:
    """Write a whole timm ``model`` (architecture ``name``, ``create_model`` ``args``) as a folder
    ``timm.create_model("local-dir:...", pretrained=True)`` rebuilds with no other argument."""
    out = Path(out_dir)
    model_config: dict[str, Any] = {}
    if class_names:
        model_config["label_names"] = list(class_names)
    data_config = {
        "input_size": (3, image_size, image_size),
        "mean": MEAN,
        "std": STD,
        "crop_pct": 1.0,  # heatssl evaluates the centred square of the short side
        "interpolation": "bilinear",
    }
    # safetensors refuses strided tensors: a channels_last model (the GPU setting) is written in
    # the standard layout and put back as it was
    channels_last = any(
        p.dim() == 4
        and not p.is_contiguous()
        and p.is_contiguous(memory_format=torch.channels_last)
        for p in model.parameters()
    )
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    try:
        save_for_hf(
            model,
            str(out),
            model_config=model_config,
            model_args={k: v for k, v in args.items() if k != "drop_path_rate"},  # training only
            safe_serialization=True,
            data_config=data_config,
        )
    finally:
        if channels_last:
            model.to(memory_format=torch.channels_last)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    pretrained_cfg = config["pretrained_cfg"]
    pretrained_cfg["tag"] = "heatssl"  # not the tag of timm's own weights for this architecture
    pretrained_cfg.pop("license", None)  # timm's weights' licence; these weights are the user's
    config_path.write_text(json.dumps(config, indent=2))
    if card is not None:
        (out / "README.md").write_text(card)
    return out


@torch.no_grad()
def _fold_head(model: torch.nn.Module, backbone: Backbone, head: LinearHead, size: int) -> None:
    """Put the head's folded weights in timm's classifier; refuse where the result would differ."""
    weight, bias = head.eval().folded()
    fc = model.get_classifier()
    if not isinstance(fc, torch.nn.Linear) or fc.weight.shape != weight.shape:
        raise ArgumentError(
            f"timm's {backbone.name} classifier ({type(fc).__name__}) cannot take the probe head "
            f"({weight.shape[1]} features -> {weight.shape[0]} classes). Export without --head."
        )
    fc.weight.copy_(weight)
    fc.bias.copy_(bias)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    probe = head(backbone.eval().pooled(x))
    timm_logits = model(x)
    if not torch.allclose(timm_logits, probe, atol=1e-3, rtol=1e-3):
        gap = float((timm_logits - probe).abs().max())
        raise ArgumentError(
            f"timm's {backbone.name} pools its features differently from the probe (its logits "
            f"differ from the probe's by up to {gap:.3g}), so the head cannot be folded in "
            f"exactly. Export without --head (a feature extractor) and apply the head yourself."
        )
