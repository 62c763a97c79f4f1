"""Where a probed backbone looks: CAM from the linear probe's weights, and gradient CAMs via grad-cam.

``cam`` is exact and needs no gradients: with the probe's BatchNorm folded into its Linear (W', b'),
the class map is ``M_c(x, y) = sum_k W'_ck z_k(x, y)`` on the backbone's grid, and its spatial mean is the
class logit minus b'_c (the probe pools by averaging). ``gradcam``, ``gradcam++``, ``eigencam`` and
``scorecam`` come from the grad-cam package. On the probed grid itself Grad-CAM would add nothing (a
linear head on average pooling makes it ReLU(cam) exactly), so they hook the output of the block
before the probed stage's last one (:func:`gradient_layer`: ``layer4.0`` of a resnet18,
``blocks.10`` of a 12-block ViT, whose tokens are reshaped to their grid), the usual Grad-CAM layer
one block deep, where the gradients vary over the positions.

Example:
    >>> result = heatmaps(backbone, head, images, method="gradcam")
    >>> result.maps.shape   # (N, H, W) in [0, 1], one map per image at the input's size
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, ScoreCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn

from heatssl.errors import ArgumentError, CheckpointError
from heatssl.model.heads import LinearHead

GRADIENT_METHODS = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "eigencam": EigenCAM,
    "scorecam": ScoreCAM,
}
METHODS: tuple[str, ...] = ("cam", *GRADIENT_METHODS)


class ProbedBackbone(nn.Module):
    """Backbone grid -> average pool -> linear probe, as one classifier for the CAM methods.

    The grid passes through ``grid_layer`` (an identity) so that gradient CAMs hook exactly the
    feature map the probe was trained on.
    """

    def __init__(self, backbone: nn.Module, head: LinearHead) -> None:
        super().__init__()
        width = getattr(backbone, "num_features", None)
        if width is not None and width != head.fc.in_features:
            raise CheckpointError(
                f"The probe head takes {head.fc.in_features}-d features but the backbone gives "
                f"{width}-d: the head was trained on another backbone or stage. Probe this backbone "
                f"with `heatssl probe` and use that head."
            )
        self.backbone, self.head, self.grid_layer = backbone, head, nn.Identity()

    def grid(self, images: Tensor) -> Tensor:
        """The probed feature grid (N, d, h, w)."""
        return self.grid_layer(self.backbone(images))

    def forward(self, images: Tensor) -> Tensor:
        """Class logits (N, C)."""
        return self.head(self.grid(images).float().mean(dim=(-2, -1)))


def class_maps(grid: Tensor, head: LinearHead) -> Tensor:
    """Raw class activation maps (N, C, h, w): the folded probe weights applied at every cell."""
    weight, _ = head.folded()
    return torch.einsum("cd,ndhw->nchw", weight, grid.float())


def resolve_targets(
    logits: Tensor, target: int | str | None, class_names: list[str] | None
) -> Tensor:
    """Target class per image: the predicted one (None), a class index, or a class name."""
    n, c = logits.shape
    if target is None:
        return logits.argmax(dim=1)
    if isinstance(target, str):
        names = class_names or []
        if target not in names:
            raise ArgumentError(
                f"target={target!r} is not a class name. Classes: {', '.join(names[:20])}"
                f"{' ...' if len(names) > 20 else ''}."
            )
        target = names.index(target)
    if not 0 <= target < c:
        raise ArgumentError(f"target={target} is out of range: class indices are 0..{c - 1}.")
    return torch.full((n,), int(target), dtype=torch.long, device=logits.device)


def gradient_layer(backbone: nn.Module) -> tuple[str, nn.Module] | None:
    """The layer gradient CAMs hook: the block before the probed stage's last block.

    Found through timm's ``feature_info`` (the stage's module): the second-to-last block of a stage
    made of blocks, else the block before it in its parent, else the previous stage. ``None`` when
    there is none (a backbone that is not heatssl's timm adapter, or a first stage of one block):
    then the probed grid is hooked, where Grad-CAM equals ReLU(cam).
    """
    model, stage = getattr(backbone, "model", None), getattr(backbone, "stage", None)
    info = getattr(model, "feature_info", None)
    if model is None or stage is None or not info:
        return None
    name = info[stage]["module"]
    module = model.get_submodule(name)
    if isinstance(module, nn.Sequential | nn.ModuleList) and len(module) >= 2:
        return f"{name}.{len(module) - 2}", module[len(module) - 2]
    parent_name, _, last = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if last.isdigit() and int(last) > 0 and isinstance(parent, nn.Sequential | nn.ModuleList):
        return f"{parent_name}.{int(last) - 1}", parent[int(last) - 1]
    if stage > 0:
        previous = info[stage - 1]["module"]
        return previous, model.get_submodule(previous)
    return None


def _to_grid(grid_shape: tuple[int, int]):
    """grad-cam's reshape: a ViT block's tokens (N, L, C) -> (N, C, h, w) (prefix tokens dropped)."""
    h, w = grid_shape

    def reshape(t: Tensor) -> Tensor:
        if t.ndim == 3:
            return t[:, -h * w :].reshape(t.shape[0], h, w, t.shape[-1]).permute(0, 3, 1, 2)
        return t

    return reshape


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no parameter gradients for the duration; the previous state is restored."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield model.eval()
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _normalize(maps: Tensor) -> Tensor:
    lo = maps.flatten(1).min(dim=1).values.view(-1, 1, 1)
    hi = maps.flatten(1).max(dim=1).values.view(-1, 1, 1)
    return (maps - lo) / (hi - lo).clamp_min(1e-8)


@dataclass
class HeatmapResult:
    """Maps and predictions for a batch of images."""

    maps: np.ndarray  # (N, H, W) in [0, 1], at the input's size
    raw: np.ndarray | None  # (N, h, w) unnormalised class maps on the grid (``cam`` only)
    logits: np.ndarray  # (N, C)
    targets: np.ndarray  # (N,) the class each map explains
    method: str
    layer: str = "grid"  # what the map is computed on: the probed grid or a backbone layer


def heatmaps(
    backbone: nn.Module,
    head: LinearHead,
    images: Tensor,
    method: str = "cam",
    target: int | str | None = None,
    class_names: list[str] | None = None,
) -> HeatmapResult:
    """One heat map per image (N, 3, H, W normalised) for ``target`` (default: predicted class).

    The backbone and head stay frozen: gradient methods differentiate with respect to the input
    only, so no parameter receives a gradient. Runs on the backbone's device (move the backbone to a
    GPU first to use one); the returned arrays are on the CPU.
    """
    if method not in METHODS:
        raise ArgumentError(f"method={method!r} is not allowed. Allowed: {', '.join(METHODS)}.")
    device = next(backbone.parameters()).device
    head = head.to(device)
    images = images.to(device)
    model = ProbedBackbone(backbone, head)
    size = images.shape[-2:]
    with frozen(model):
        with torch.no_grad():
            grid = model.grid(images)
            logits = model.head(grid.float().mean(dim=(-2, -1)))
        targets = resolve_targets(logits, target, class_names)
        raw, layer_name = None, "grid"
        if method == "cam":
            maps = class_maps(grid, head)[torch.arange(len(targets), device=device), targets]
            raw = maps.float().cpu().numpy()
            up = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)
            out = _normalize(up[:, 0]).cpu().numpy()
        else:
            x = images.detach().clone().requires_grad_(True)  # gradients stop at the input
            found = gradient_layer(backbone)
            layer_name, layer = found if found else ("grid", model.grid_layer)
            reshape = _to_grid(tuple(grid.shape[-2:]))
            with GRADIENT_METHODS[method](
                model=model, target_layers=[layer], reshape_transform=reshape
            ) as cam:
                out = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    return HeatmapResult(
        maps=np.nan_to_num(np.asarray(out, dtype=np.float32)),
        raw=raw,
        logits=logits.cpu().numpy(),
        targets=targets.cpu().numpy(),
        method=method,
        layer=layer_name,
    )
