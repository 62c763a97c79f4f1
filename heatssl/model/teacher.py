"""Latent targets from an EMA teacher (data2vec / I-JEPA style) for QB-Heat's extrapolated grid.

- :class:`EmaTeacher`: a frozen copy of the student's backbone and projection whose weights follow
  the student's as an exponential moving average, :meth:`EmaTeacher.update` after every optimiser step.
- :func:`teacher_momentum`: the momentum schedule, cosine from ``m0`` to 1 over training (BYOL).
- :func:`latent_loss`: the student's extrapolated grid against the teacher's whole-image grid, on the
  three hidden quadrants' cells only, targets standardised per cell over channels (data2vec).
- :func:`feature_spread`: the batch spread of the pooled targets, ~0 when the teacher has collapsed
  (:mod:`heatssl.train.collapse` stops such a run).
- :func:`colour_jitter`: a photometric view of a batch (``loss.view_jitter``), so that student and
  teacher see the same crop in different colours and the targets teach colour invariance.

The teacher always runs in eval mode: its BatchNorm layers use running statistics, copied from the
student with every update (the student's statistics are already averages over batches), so a target
never depends on the rest of its batch.
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # as heatssl's loaders normalise
from torch import Tensor, nn

from heatssl.errors import ArgumentError, check_choice
from heatssl.model.quadrants import quadrant_mask

LatentLoss = Literal["smooth_l1", "cosine"]
"""How a predicted cell is scored against the teacher's: ``smooth_l1`` (data2vec) or ``cosine``."""
GlobalLoss = Literal["cosine", "infonce"]
"""How the global term scores the pooled quarter's prediction against the teacher's pooled image:
``cosine`` (BYOL's ``1 - cos``) or ``infonce`` (MoCo v3's: the other images' teacher pools of the
batch are the negatives)."""
Encoder = Literal["student", "teacher"]
"""Which encoder a run's backbone is: the trained ``student`` or its EMA ``teacher``."""
_GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, torchvision's rgb_to_grayscale


def check_momentum(momentum: float, name: str = "teacher_momentum") -> None:
    """Refuse a momentum outside [0, 1] (0: the teacher is the student; 1: it never moves)."""
    if not 0.0 <= momentum <= 1.0:
        raise ArgumentError(
            f"{name}={momentum!r} must be in [0, 1]: the share of the teacher kept at each update "
            f"(BYOL / data2vec use 0.99 to 0.9999). Fix: e.g. {name}=0.996."
        )


def teacher_momentum(base: float, progress: float) -> float:
    """The EMA momentum at ``progress`` (0..1, clamped) of training: ``1 - (1 - base) *
    (cos(pi * progress) + 1) / 2``, from ``base`` at the start to 1 at the end (BYOL)."""
    check_momentum(base, "base")
    t = min(1.0, max(0.0, float(progress)))
    return 1.0 - (1.0 - base) * (math.cos(math.pi * t) + 1.0) / 2.0


class EmaTeacher(nn.Module):
    """A frozen copy of ``backbone`` and ``project`` that follows them as a moving average.

    Every parameter has ``requires_grad=False`` (no optimiser or DDP ever sees it) and the module
    stays in eval mode whatever ``train()`` asks. A submodule of QB-Heat, so checkpoints hold it.
    """

    def __init__(self, backbone: nn.Module, project: nn.Module) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(backbone)
        self.project = copy.deepcopy(project)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> EmaTeacher:
        """Stay in eval mode: targets use BatchNorm's running statistics, never the batch's."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """The teacher's projected grid of the whole images (N, dim, 2h, 2w), without gradient."""
        return self.project(self.backbone(images))

    @torch.no_grad()
    def update(self, backbone: nn.Module, project: nn.Module, momentum: float) -> None:
        """``t = momentum * t + (1 - momentum) * s`` for every parameter; buffers are copied.

        ``backbone`` and ``project`` are the student's; they must have the teacher's structure.
        """
        check_momentum(momentum, "momentum")
        mine = [*self.backbone.parameters(), *self.project.parameters()]
        theirs = [*backbone.parameters(), *project.parameters()]
        if len(mine) != len(theirs):
            raise ArgumentError(
                f"the student has {len(theirs)} parameter tensors, the teacher {len(mine)}: an EMA "
                f"teacher follows the model it was copied from. Fix: build the teacher from it."
            )
        if mine:
            torch._foreach_mul_(mine, momentum)
            torch._foreach_add_(mine, [s.detach() for s in theirs], alpha=1.0 - momentum)
        own = [*self.backbone.buffers(), *self.project.buffers()]
        for t, s in zip(own, [*backbone.buffers(), *project.buffers()], strict=True):
            t.copy_(s)


def standardize_cells(grid: Tensor, eps: float = 1e-6) -> Tensor:
    """Each cell of (N, C, H, W) standardised over its channels (layer norm without affine)."""
    return F.layer_norm(grid.float().movedim(1, -1), (grid.shape[1],), eps=eps).movedim(-1, 1)


def latent_loss(pred: Tensor, target: Tensor, quadrant: Tensor, kind: LatentLoss) -> Tensor:
    """Mean loss over the three hidden quadrants' cells of ``pred`` against ``target``.

    ``pred`` is the student's extrapolated grid, ``target`` the teacher's whole-image grid, both
    (N, dim, 2h, 2w); the target is standardised per cell (:func:`standardize_cells`).
    ``smooth_l1`` averages over channels, ``cosine`` scores ``1 - cos`` per cell.
    """
    check_choice("latent_loss", kind, LatentLoss)
    if pred.shape != target.shape:
        raise ArgumentError(
            f"the teacher's grid {list(target.shape)} is not the prediction's "
            f"{list(pred.shape)}: the whole image's grid must be twice the kept quarter's in each "
            f"direction. Fix: an image size whose quarter the backbone divides evenly (a multiple "
            f"of 2 x its reduction, 4 x with teacher_resolution='half'), or target='pixels'."
        )
    goal = standardize_cells(target.detach())
    p = pred.float()
    if kind == "smooth_l1":
        err = F.smooth_l1_loss(p, goal, reduction="none").mean(dim=1, keepdim=True)
    else:
        err = 1.0 - F.cosine_similarity(p, goal, dim=1, eps=1e-6).unsqueeze(1)
    weight = quadrant_mask(quadrant, pred.shape[-2], pred.shape[-1])
    return (err * weight).sum() / weight.sum().clamp_min(1.0)


def check_temperature(value: float, name: str = "temperature") -> None:
    """A softmax temperature is > 0 (an error naming ``name`` otherwise)."""
    if not value > 0:
        raise ArgumentError(
            f"{name}={value!r} must be > 0: it divides the cosine similarities of the infonce "
            f"global term. Fix: e.g. {name}=0.2 (MoCo v3's)."
        )


def global_loss(
    pred: Tensor, aim: Tensor, kind: GlobalLoss = "cosine", temperature: float = 0.2
) -> Tensor:
    """The global term of a batch: each row of ``pred`` (N, d), the student's pooled quarter
    through its MLP, against the same image's row of ``aim`` (N, d), the teacher's pooled image
    (no gradient). ``cosine``: mean ``1 - cos``, 0 to 2. ``infonce``: cross-entropy of the cosine
    similarities to every row of ``aim`` over ``temperature``, the own row the right answer (MoCo
    v3's loss with the batch as negatives): it also pushes different images apart, as a contrastive
    loss does; ``log N`` for a batch of N that says nothing."""
    check_choice("global_loss", kind, GlobalLoss)
    check_temperature(temperature)
    p, a = pred.float(), aim.detach().float()
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(p, a, dim=1, eps=1e-6).mean()
    with torch.autocast(p.device.type, enabled=False):
        logits = F.normalize(p, dim=1, eps=1e-6) @ F.normalize(a, dim=1, eps=1e-6).T
    labels = torch.arange(p.shape[0], device=p.device)
    return F.cross_entropy(logits / temperature, labels)


def feature_spread(grid: Tensor) -> Tensor:
    """How much the targets of a batch differ: the targets (each cell of ``grid`` (N, C, H, W)
    standardised over channels, :func:`standardize_cells`) pooled over space, their std over the
    batch, averaged over channels. Scale-free, 0 when every image gets the same targets (a
    collapsed teacher); a healthy encoder gives about 0.1 to 1."""
    pooled = standardize_cells(grid.detach()).mean(dim=(-2, -1))
    return pooled.std(dim=0, unbiased=False).mean()


def check_jitter(strength: float) -> None:
    """Refuse a colour-jitter strength outside [0, 1]."""
    if not 0.0 <= strength <= 1.0:
        raise ArgumentError(
            f"view_jitter={strength!r} must be in [0, 1]: the colour jitter's strength (1 = "
            f"BYOL's). Fix: e.g. view_jitter=1.0, or 0 for none."
        )


def colour_jitter(images: Tensor, strength: float) -> Tensor:
    """A photometric view of ImageNet-normalised ``images`` (N, 3, H, W), drawn per image.

    BYOL's colour jitter without hue, scaled by ``strength`` in [0, 1]: with probability 0.8,
    brightness and contrast are scaled by factors in ``1 +- 0.4 * strength`` and saturation by one
    in ``1 +- 0.2 * strength``; with probability ``0.2 * strength`` the image turns grey. Done on
    the batch where it lies (GPU or CPU), in float32, clamped to [0, 1] before renormalising, with
    no host sync. ``strength`` 0 returns ``images`` unchanged.
    """
    check_jitter(strength)
    if strength == 0:
        return images
    n, dev = images.shape[0], images.device

    def factors(spread: float) -> Tensor:
        return 1.0 + spread * strength * (2.0 * torch.rand(n, 1, 1, 1, device=dev) - 1.0)

    on = (torch.rand(n, 1, 1, 1, device=dev) < 0.8).float()
    bright, contrast, sat = (1.0 + on * (factors(s) - 1.0) for s in (0.4, 0.4, 0.2))
    sat = sat * (torch.rand(n, 1, 1, 1, device=dev) >= 0.2 * strength).float()  # grey: saturation 0
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=dev).view(1, 3, 1, 1)
    grey_w = torch.tensor(_GREY, device=dev).view(1, 3, 1, 1)
    x = (images.float() * std + mean) * bright
    x = x.clamp(0.0, 1.0)
    level = (x * grey_w).sum(dim=1, keepdim=True).mean(dim=(-2, -1), keepdim=True)
    x = ((x - level) * contrast + level).clamp(0.0, 1.0)
    grey = (x * grey_w).sum(dim=1, keepdim=True)
    x = (grey + (x - grey) * sat).clamp(0.0, 1.0)
    return ((x - mean) / std).to(images.dtype)
