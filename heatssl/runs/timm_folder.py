"""``heatssl export --format timm``: backbones as timm folders, ``config.json`` + ``model.safetensors``
+ a model card.

The layout is the one timm's ``save_for_hf`` writes and ``timm.create_model("local-dir:PATH",
pretrained=True)`` or, once uploaded, ``"hf-hub:user/name"`` reads, with no other argument and
without heatssl installed: the architecture, every ``create_model`` argument the weights need
(``output_stride``, ``patch_size``, ``dynamic_img_size``, ``img_size``, ...) and the input
preprocessing (size, mean / std) are in ``config.json``.

ViTs are written with ``global_pool="avg"`` and ``fc_norm=False``, so that ``model(x)`` is what the
probes read (the final norm on every patch token, then their mean). With a linear probe head the
folder holds a classifier: the head's eval-mode BatchNorm is folded into timm's own classifier
layer, checked on a random batch to give the probe's logits.

The model card (``README.md``) is written from the run's own files: the config stored in the
checkpoint, the step count, and the probe figures of ``RUN/probe/metrics.json`` when ``heatssl
probe`` has run. Its front matter is the Hugging Face Hub's (``library_name: timm``), so the folder
can be uploaded as it is.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import save_for_hf
from timm.models.vision_transformer import VisionTransformer

from heatssl.config import Config, config_keys
from heatssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from heatssl.errors import ArgumentError
from heatssl.model.backbone import Backbone
from heatssl.model.heads import LinearHead
from heatssl.model.teacher import Encoder
from heatssl.runs.head_files import load_linear_head
from heatssl.runs.layout import RunLayout
from heatssl.runs.sources import backbone_from_checkpoint, read_checkpoint
from heatssl.writing import UnsafePathError


def export_timm(
    checkpoint: str | Path,
    out: str | Path | None = None,
    head: str | Path | None = None,
    force: bool = False,
    encoder: Encoder | None = None,
) -> Path:
    """Write a checkpoint's backbone as a timm folder (default ``RUN/backbone_timm``); return it.

    ``encoder``: student or EMA teacher (default: the checkpoint's ``loss.encoder``).

    ``head``: a ``linear_head.safetensors`` written by ``heatssl probe`` to fold in (the folder is
    then a classifier over its classes); without it, a feature extractor (``num_classes: 0``).
    ``force`` writes into a folder heatssl did not write (see :func:`save_timm_folder`).
    """
    run = RunLayout.of_checkpoint(checkpoint)
    stored = read_checkpoint(checkpoint, mmap=True)  # config and step; the tensors are mapped
    backbone = backbone_from_checkpoint(checkpoint, encoder)
    linear, class_names = load_linear_head(head) if head is not None else (None, None)
    folder = Path(out) if out is not None else run.backbone_timm
    classes = 0 if linear is None else linear.fc.out_features
    cfg = stored.config
    metrics = probe_metrics(run)
    card = model_card(cfg, folder.name, stored.global_step, metrics, classes, encoder)
    with config_keys(image_size="data.image_size"):
        return export_timm_folder(
            backbone, folder, cfg.data.image_size, linear, class_names, card, force
        )


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
    force: bool = False,
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
        force: Write into a folder heatssl did not write (see :func:`save_timm_folder`).
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
        model,
        backbone.name,
        timm_model_args(backbone),
        out_dir,
        image_size,
        class_names,
        card,
        force,
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


TIMM_FOLDER_FILES = frozenset({"config.json", "model.safetensors", "README.md"})
"""What a timm folder heatssl writes holds, and nothing else."""


def written_by_heatssl(folder: Path) -> bool:
    """Whether ``folder`` holds only a timm folder's files and its config.json has heatssl's tag."""
    entries = list(folder.iterdir())
    if any(e.name not in TIMM_FOLDER_FILES or e.is_symlink() for e in entries):
        return False
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return config["pretrained_cfg"]["tag"] == "heatssl"
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _check_target(out: Path, force: bool) -> bool:
    """Refuse to write into a link, a file or a folder heatssl did not write (unless ``force``);
    whether the folder is someone else's (then only heatssl's files in it are replaced)."""
    if out.is_symlink():
        if not force:
            raise UnsafePathError(
                f"{out} is a link (to {os.readlink(out)}): the timm folder would be written "
                f"through it. Give another folder, or pass --force to replace the link."
            )
        out.unlink()
        return False
    if out.exists() and not out.is_dir():
        raise UnsafePathError(f"{out} is a file, not a folder: give a folder for the timm export.")
    if out.is_dir() and any(out.iterdir()) and not written_by_heatssl(out):
        if not force:
            names = sorted(p.name for p in out.iterdir())[:5]
            raise UnsafePathError(
                f"{out} holds files heatssl did not write ({', '.join(names)}): the timm folder "
                f"would replace its config.json, model.safetensors and README.md. Give a new or "
                f"empty folder, or pass --force to replace those three files."
            )
        return True
    return False


def save_timm_folder(
    model: torch.nn.Module,
    name: str,
    args: dict[str, Any],
    out_dir: str | Path,
    image_size: int,
    class_names: list[str] | None = None,
    card: str | None = None,
    force: bool = False,
) -> Path:
    """Write a whole timm ``model`` (architecture ``name``, ``create_model`` ``args``) as a folder
    ``timm.create_model("local-dir:...", pretrained=True)`` rebuilds with no other argument.

    The folder is written under a temporary name beside ``out_dir`` and then put in place, so it is
    whole or absent and no link in an existing folder is followed; a folder heatssl did not write is
    refused unless ``force`` (then only its three files are replaced).
    """
    out = Path(out_dir)
    foreign = _check_target(out, force)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_folder(model, args, tmp, image_size, class_names, card)
        if foreign:
            for written in tmp.iterdir():
                os.replace(written, out / written.name)  # a link at the name is replaced
        else:
            old = out.with_name(f".{out.name}.{os.getpid()}.old")
            if out.exists():
                os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_folder(
    model: torch.nn.Module,
    args: dict[str, Any],
    out: Path,
    image_size: int,
    class_names: list[str] | None,
    card: str | None,
) -> None:
    """timm's ``save_for_hf`` into the fresh folder ``out``, heatssl's tag and card added."""
    model_config: dict[str, Any] = {}
    if class_names:
        model_config["label_names"] = list(class_names)
    data_config = {
        "input_size": (3, image_size, image_size),
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
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


def probe_metrics(run: RunLayout) -> dict[str, Any] | None:
    """``RUN/probe/metrics.json`` if the run was probed, else ``None``."""
    path = run.probe_metrics
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
    encoder: Encoder | None = None,
) -> str:
    """The card's markdown for a backbone pretrained with ``cfg`` for ``global_step`` steps
    (``encoder``: which of the run's encoders it is; default the config's ``loss.encoder``)."""
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
        f"| objective | target `{cfg.loss.target}`, exported encoder "
        f"`{encoder or cfg.loss.encoder}` |",
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
