"""QB-Heat as one plain nn.Module: quarter crop -> encode -> extrapolate -> decode -> losses.

No Lightning here, so the objective can be stepped, timed and tested on its own; the LightningModule in
:mod:`heatssl.train.pretrain_module` only adds the optimiser, the schedule and logging.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from heatssl.errors import ArgumentError, check_choice
from heatssl.model.backbone import Backbone
from heatssl.model.decoder import ConvDecoder, DecoderNorm
from heatssl.model.heat import InitRule, PredictorKind, StepRule, build_predictor
from heatssl.model.heat_loss import HeatLoss
from heatssl.model.pair import PairTerm, other_quadrants
from heatssl.model.pixels import patch_normalize, reconstruction_loss
from heatssl.model.quadrants import (
    QUADRANTS,
    QuadrantChoice,
    crop_quadrant,
    quadrant_ids,
    quadrant_mask,
)
from heatssl.model.teacher import (
    EmaTeacher,
    Encoder,
    GlobalLoss,
    LatentLoss,
    check_jitter,
    check_momentum,
    check_temperature,
    colour_jitter,
    feature_spread,
    global_loss,
    latent_loss,
)
from heatssl.model.uniformity import UniformityLoss

LossRegion = Literal["masked", "full"]
"""Pixels the reconstruction loss scores: the three ``masked`` quadrants or the ``full`` image."""
TeacherResolution = Literal["full", "half"]
"""The teacher's input: the ``full`` image, or the image at ``half`` its size (a quarter the cost)."""
Target = Literal["pixels", "teacher", "both"]
"""What the extrapolated grid is trained to match: pixels (the paper), an EMA teacher's grid, both."""


@dataclass
class QBHeatOutput:
    """What one QB-Heat forward gives: the total loss, its parts, and the tensors for pictures."""

    loss: Tensor
    rec: Tensor
    heat: Tensor | None
    commute: Tensor | None
    pred: Tensor  # decoder output, in the target's space (normalised patches when norm_pix)
    quadrant: Tensor
    block: Tensor  # the encoder's grid of the kept quarter (N, d, h, w)
    latent: Tensor | None = None  # the loss against the EMA teacher's grid (target teacher / both)
    global_latent: Tensor | None = None  # the pooled prediction against the teacher's pool
    teacher_spread: Tensor | None = None  # batch std of the teacher's pooled grid: ~0 = collapse
    pair: Tensor | None = None  # the two kept quadrants' invariance term (pair_weight > 0)
    uniform: Tensor | None = None  # uniformity of the pooled encoder grids (uniform_weight > 0)


class QBHeat(nn.Module):
    """Quarter-block masked image modelling with heat-equation extrapolation (docs/method.md).

    Args:
        backbone: The encoder of the kept quarter block.
        predictor: ``heat`` (learned A, B), ``copy`` (A = B = 0, frozen) or ``mask_token``
            (MAE-style baseline: one learned feature plus a learned position per masked cell).
            The baselines' heat loss (``heat_weight > 0``) has its own trainable A and B.
        step: Heat step rule, ``normalized`` (default, chosen by the ablation in docs/benchmarks.md)
            or ``euler``.
        init: Initial A and B, ``zeros`` or ``random``.
        heat_dim: Channels the heat operators work in. ``None`` (the paper): the backbone's own
            features. An int: a learned 1 x 1 projection maps the encoder's grid to ``heat_dim``
            channels first; extrapolation, heat loss and decoder then work on the projected grid,
            which makes A and B ``heat_dim`` x ``heat_dim`` (cheap for 960- or 2048-wide CNNs).
        quadrant: ``random`` (per sample) or a fixed quadrant name.
        heat_weight: Weight of the heat residual loss on the encoder's own block grid.
        commute_weight: Weight of ``||AB - BA||_F^2``.
        commute_probes: Random probes estimating the commutator norm (0: exact).
        decoder_width, decoder_depth, decoder_upsample_blocks, decoder_min_width, decoder_norm: See
            :class:`ConvDecoder`.
        region: ``masked`` (the three masked quadrants) or ``full`` (whole image) for the pixel loss.
        norm_pix: Score against per-patch standardised pixels (patch = one grid cell).
        target: ``pixels`` (the paper), ``teacher`` or ``both``. ``teacher``: the extrapolated
            grid regresses, on the three hidden quadrants' cells, the whole image's grid of an EMA
            teacher (:mod:`heatssl.model.teacher`; the projected grid with ``heat_dim``). The
            decoder is still built and trained, on the *detached* grid, so pictures stay
            meaningful and every parameter gets a gradient (DDP), but no pixel gradient reaches the
            encoder or the predictor. ``both``: ``pixel_weight * rec + teacher_weight * latent``.
        teacher_weight, pixel_weight: Weights of the latent and the pixel loss (with a teacher;
            ``pixels`` keeps the paper's loss as it is).
        latent_loss: ``smooth_l1`` or ``cosine`` per cell (:func:`~heatssl.model.teacher.latent_loss`).
        teacher_momentum: The teacher's EMA momentum at the start; its schedule rises to 1
            (:func:`~heatssl.model.teacher.teacher_momentum`). The caller runs :meth:`update_teacher`
            after each optimiser step. The heat residual stays on the student's grid.
        latent_head: Hidden width of a per-cell MLP (1 x 1 conv, GELU, 1 x 1 conv) between the
            extrapolated grid and the latent loss; 0 (default): the heat operators' grid is scored
            as it is. It mixes channels only, so the extrapolation stays the operators'.
        teacher_resolution: ``full`` (default): the teacher encodes the whole image, its grid the
            size of the extrapolated one. ``half``: it encodes the image at half its size (a quarter
            of the compute) and the extrapolated grid is averaged over 2 x 2 cells to its grid.
        global_weight: Weight of a global latent term (needs a teacher): the student's grid of the
            kept quarter, pooled and passed through a small MLP, predicts the teacher's pooled grid
            of the whole image, scored by ``1 - cos`` (BYOL's loss, DINO's local-to-global view).
            The features a kNN probe compares are pooled ones; this term shapes them directly.
        global_loss, global_temperature: How the global term scores, ``cosine`` (BYOL) or
            ``infonce`` (MoCo v3) at that temperature: :func:`~heatssl.model.teacher.global_loss`.
        view_jitter: Strength in [0, 1] of a colour jitter (:func:`~heatssl.model.teacher.colour_jitter`)
            drawn apart for the student's and the teacher's input while training (needs a teacher):
            the same crop in two colourings, so the latent and global targets ask for colour
            invariance (the views of BYOL and SimCLR); the pixel target is the student's own view.
        pair_weight: Weight of the two-quadrant invariance term (:mod:`~heatssl.model.pair`): while
            training the student also encodes a second, different quadrant of the image, and the
            two pooled grids predict each other (SimSiam's loss); no teacher needed. 0: off.
        uniform_weight: Weight of the uniformity term (:mod:`~heatssl.model.uniformity`) on the
            backbone's pooled grids of the kept quarters (what a kNN probe compares). 0: off.
    """

    def __init__(
        self,
        backbone: Backbone,
        predictor: PredictorKind = "heat",
        step: StepRule = "normalized",
        init: InitRule = "zeros",
        heat_dim: int | None = None,
        quadrant: QuadrantChoice = "random",
        heat_weight: float = 0.1,
        commute_weight: float = 1e-3,
        commute_probes: int = 16,
        decoder_width: int = 128,
        decoder_depth: int = 1,
        decoder_upsample_blocks: int = 1,
        decoder_min_width: int = 16,
        decoder_norm: DecoderNorm = "batch",
        region: LossRegion = "masked",
        norm_pix: bool = True,
        target: Target = "pixels",
        teacher_weight: float = 1.0,
        pixel_weight: float = 1.0,
        latent_loss: LatentLoss = "smooth_l1",
        teacher_momentum: float = 0.996,
        latent_head: int = 0,
        global_weight: float = 0.0,
        global_loss: GlobalLoss = "cosine",
        global_temperature: float = 0.2,
        teacher_resolution: TeacherResolution = "full",
        view_jitter: float = 0.0,
        pair_weight: float = 0.0,
        uniform_weight: float = 0.0,
    ) -> None:
        super().__init__()
        check_choice("region", region, LossRegion)
        check_choice("quadrant", quadrant, QuadrantChoice)
        check_choice("target", target, Target)
        check_choice("latent_loss", latent_loss, LatentLoss)
        check_choice("teacher_resolution", teacher_resolution, TeacherResolution)
        check_choice("global_loss", global_loss, GlobalLoss)
        check_temperature(global_temperature, "global_temperature")
        check_momentum(teacher_momentum)
        weights = ("teacher_weight", teacher_weight), ("pixel_weight", pixel_weight)
        for name, value in (
            *weights,
            ("global_weight", global_weight),
            ("pair_weight", pair_weight),
            ("uniform_weight", uniform_weight),
        ):
            if not value >= 0:
                raise ArgumentError(
                    f"{name}={value!r} must be >= 0: a loss weight. Fix: e.g. {name}=1.0."
                )
        if latent_head < 0:
            raise ArgumentError(
                f"latent_head={latent_head!r} must be >= 0: the hidden width of the MLP before the "
                f"latent loss, 0 for none. Fix: e.g. latent_head=0."
            )
        if heat_dim is not None and heat_dim <= 0:
            raise ArgumentError(
                f"heat_dim={heat_dim}: must be a positive number of channels, or None for the "
                f"backbone's own {backbone.num_features}."
            )
        dim = heat_dim or backbone.num_features
        self.backbone = backbone
        # The encoder's grid in the heat operators' channels (identity without heat_dim).
        self.project: nn.Module = (
            nn.Conv2d(backbone.num_features, dim, 1, bias=False) if heat_dim else nn.Identity()
        )
        self.predictor = build_predictor(predictor, dim, step=step, init=init)
        operators = getattr(self.predictor, "operators", None)
        trained = operators is not None and operators.A.requires_grad
        # Baselines without trained A, B (copy: frozen A = B = 0; mask_token: none) give the heat
        # loss its own trainable operators, so that an ablation changes only the extrapolation (on
        # frozen zeros the loss would be a plain smoothness penalty on the encoder).
        self.heat_loss = (
            HeatLoss(dim=dim, operators=operators if trained else None, step=step)
            if trained or heat_weight > 0
            else None
        )
        self.decoder = ConvDecoder(
            dim,
            backbone.reduction,
            width=decoder_width,
            depth=decoder_depth,
            upsample_blocks=decoder_upsample_blocks,
            min_width=decoder_min_width,
            norm=decoder_norm,
        )
        self.commute_probes = commute_probes
        self.quadrant, self.heat_weight, self.commute_weight = quadrant, heat_weight, commute_weight
        self.region, self.norm_pix = region, norm_pix
        self.target_kind, self.latent_kind = target, latent_loss
        self.teacher_weight, self.pixel_weight = teacher_weight, pixel_weight
        self.teacher_momentum = teacher_momentum
        self.latent_head: nn.Module = (
            nn.Sequential(nn.Conv2d(dim, latent_head, 1), nn.GELU(), nn.Conv2d(latent_head, dim, 1))
            if latent_head and target != "pixels"
            else nn.Identity()
        )
        for name, value in ("global_weight", global_weight), ("view_jitter", view_jitter):
            if value != 0 and target == "pixels":  # a pooled target; a second colouring
                raise ArgumentError(
                    f"{name}={value!r} needs an EMA teacher, and target='pixels' has none. Fix: "
                    f"target='both' (or 'teacher'), or {name}=0."
                )
        check_jitter(view_jitter)
        self.global_weight, self.teacher_resolution = global_weight, teacher_resolution
        self.global_kind, self.global_temperature = global_loss, global_temperature
        self.view_jitter = view_jitter
        self.global_head: nn.Module | None = (
            nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
            if global_weight > 0
            else None
        )
        self.pair_weight, self.uniform_weight = pair_weight, uniform_weight
        self.pair_term = PairTerm(dim) if pair_weight > 0 else None
        self.uniformity = UniformityLoss() if uniform_weight > 0 else None
        # Built last, from the initial student: nothing at all with pixel targets.
        self.teacher = EmaTeacher(backbone, self.project) if target != "pixels" else None

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """Move the EMA teacher toward the student (after an optimiser step); no-op without one."""
        if self.teacher is not None:
            self.teacher.update(self.backbone, self.project, momentum)

    def encoder(self, which: Encoder = "student") -> Backbone:
        """The student's backbone, or the EMA teacher's (an error without a teacher)."""
        check_choice("encoder", which, Encoder)
        if which == "student":
            return self.backbone
        if self.teacher is None:
            raise ArgumentError(
                f"encoder='teacher', but this QB-Heat (target={self.target_kind!r}) has no EMA "
                f"teacher; allowed: 'student'. Fix: encoder='student', or train with "
                f"target='teacher' or 'both'."
            )
        return self.teacher.backbone

    @torch.no_grad()
    def teacher_grid(self, images: Tensor) -> Tensor:
        """The EMA teacher's grid of the whole ``images``, at half their size with
        ``teacher_resolution='half'`` (bilinear, antialiased); an error without a teacher."""
        if self.teacher is None:
            raise ArgumentError("target='pixels' has no EMA teacher. Fix: target='both'.")
        if self.teacher_resolution == "half":
            images = F.interpolate(images, scale_factor=0.5, mode="bilinear", antialias=True)
        return self.teacher(images)

    def latent_prediction(self, grid: Tensor) -> Tensor:
        """What the extrapolated ``grid`` offers the teacher's: averaged over 2 x 2 cells for a
        half-size teacher, then through ``latent_head`` (identity without one)."""
        return self.latent_head(
            F.avg_pool2d(grid, 2) if self.teacher_resolution == "half" else grid
        )

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW must not decay besides biases and norms: the heat operators, the
        [MASK] feature and its positions, and what the backbone's timm model names (a ViT's
        positions and class token), by timm's ``no_weight_decay`` convention."""
        own = {n for n, _ in self.named_parameters() if n.startswith(("predictor.", "heat_loss."))}
        return own | {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    def sample_quadrants(self, n: int, device: torch.device) -> Tensor:
        """One kept-quadrant id per sample: random, or the configured fixed one."""
        if self.quadrant == "random":
            return torch.randint(0, 4, (n,), device=device)
        return torch.full((n,), QUADRANTS.index(self.quadrant), device=device, dtype=torch.long)

    def target(self, images: Tensor) -> Tensor:
        """What the decoder is asked to produce: the image, per-patch standardised if norm_pix."""
        if not self.norm_pix:
            return images
        return patch_normalize(images, self.backbone.reduction)[0]

    def forward(self, images: Tensor, quadrant: Tensor | None = None) -> QBHeatOutput:
        """Run the objective on a batch of full images (N, 3, H, W)."""
        n, _, h, w = images.shape
        if quadrant is None:
            q = self.sample_quadrants(n, images.device)
        else:
            q = quadrant_ids(quadrant, n, images.device)
        seen = images  # the student's view, also its pixel target
        if self.teacher is not None and self.training and self.view_jitter > 0:
            seen = colour_jitter(images, self.view_jitter)
        block = self.backbone(crop_quadrant(seen, q), quadrant=q)  # ViTs: own positions
        z = self.project(block)
        grid = self.predictor(z, q, check=False)  # q is valid by now
        latent = spread = glob = None
        if self.teacher is not None:
            view = colour_jitter(images, self.view_jitter) if seen is not images else images
            goal = self.teacher_grid(view)
            latent = latent_loss(self.latent_prediction(grid), goal, q, self.latent_kind)
            spread = feature_spread(goal)
            if self.global_head is not None:
                pooled = self.global_head(z.float().mean(dim=(-2, -1)))
                aim = goal.float().mean(dim=(-2, -1))
                glob = global_loss(pooled, aim, self.global_kind, self.global_temperature)
        # target=teacher: the decoder learns from the detached grid, as a probe of it
        pred = self.decoder(grid.detach() if self.target_kind == "teacher" else grid)
        weight = quadrant_mask(q, h, w) if self.region == "masked" else None
        rec = reconstruction_loss(pred, self.target(seen), weight)
        loss, heat, commute = rec, None, None
        if latent is not None:
            loss = self.pixel_weight * rec + self.teacher_weight * latent
        if glob is not None:
            loss = loss + self.global_weight * glob
        pair = None
        if self.pair_term is not None and self.training:
            q2 = other_quadrants(q)
            z2 = self.project(self.backbone(crop_quadrant(seen, q2), quadrant=q2))
            pair = self.pair_term(z, z2)
            loss = loss + self.pair_weight * pair
        uniform = None
        if self.uniformity is not None:
            uniform = self.uniformity(block.float().mean(dim=(-2, -1)))
            loss = loss + self.uniform_weight * uniform
        if self.heat_loss is not None and self.heat_weight > 0:
            heat = self.heat_loss(z)
            loss = loss + self.heat_weight * heat
        if (
            self.heat_loss is not None
            and self.commute_weight > 0
            and self.heat_loss.operators.A.requires_grad
        ):
            commute = self.heat_loss.operators.commutator(self.commute_probes)
            loss = loss + self.commute_weight * commute
        return QBHeatOutput(
            loss,
            rec,
            heat,
            commute,
            pred,
            q,
            block,
            latent,
            teacher_spread=spread,
            global_latent=glob,
            pair=pair,
            uniform=uniform,
        )

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The masked-region mask (N, 1, H, W) and the reconstruction, in ``images``' space.

        Eval mode, the quadrants cycling through all four over the batch, and the eager forward
        even when the module is compiled (a picture's batch would compile a second graph). With
        norm_pix the decoder predicts standardised patches; they are shown with the true patches'
        mean and std, as MAE does.
        """
        was_training = self.training
        self.eval()
        q = torch.arange(images.shape[0], device=images.device) % 4
        try:
            out = self.forward(images, quadrant=q)
        finally:
            self.train(was_training)
        pred = out.pred.float()
        if self.norm_pix:
            _, mean, std = patch_normalize(images.float(), self.backbone.reduction)
            pred = pred * std + mean
        return quadrant_mask(q, images.shape[-2], images.shape[-1]), pred

    @property
    def reconstruction_note(self) -> str:
        """What a reconstruction shows (norm-pix predictions need the input's patch stats)."""
        if self.norm_pix:
            return "norm-pix: predicted patches shown with the input's patch mean and std"
        return "predicted pixels"
