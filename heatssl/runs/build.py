"""From a config to objects: the backbone and the QB-Heat objective it describes.

The model layer raises errors in its own argument names; building through here re-words them with
the config's keys (:func:`heatssl.config.config_keys`), so a user reads ``data.image_size=50`` and
``model.output_stride=16``, the keys they can set.
"""

from __future__ import annotations

from heatssl.config import Config, ModelConfig, config_keys
from heatssl.model.backbone import Backbone
from heatssl.model.qbheat import QBHeat

MODEL_KEYS = {
    "name": "model.backbone",
    "stage": "model.stage",
    "output_stride": "model.output_stride",
    "grad_checkpointing": "model.grad_checkpointing",
    "image_size": "data.image_size",
}
"""The backbone's arguments and the config keys that set them."""
QBHEAT_KEYS = {
    **{k: f"heat.{k}" for k in ("predictor", "step", "init", "quadrant")},
    **{k: f"decoder.{k}" for k in ("depth", "upsample_blocks", "norm")},
    **{
        k: f"loss.{k}"
        for k in (
            "region",
            "target",
            "teacher_weight",
            "pixel_weight",
            "latent_loss",
            "latent_head",
            "global_weight",
            "global_loss",
            "global_temperature",
            "teacher_resolution",
            "view_jitter",
            "pair_weight",
            "uniform_weight",
        )
    },
    "teacher_momentum": "loss.teacher_momentum",
    "heat_dim": "heat.dim",
}
"""The arguments QB-Heat, its predictor and its decoder name in errors, and their config keys."""


def build_backbone(model_cfg: ModelConfig, image_size: int, check_size: bool = True) -> Backbone:
    """The :class:`Backbone` a ``model`` config section describes (its errors in config keys)."""
    with config_keys(**MODEL_KEYS):
        backbone = Backbone(
            model_cfg.backbone,
            stage=model_cfg.stage,
            image_size=image_size,
            output_stride=model_cfg.output_stride,
            pretrained=model_cfg.pretrained,
            check_size=check_size,
            **model_cfg.kwargs,
        )
    return backbone


def build_qbheat(cfg: Config, backbone: Backbone | None = None) -> QBHeat:
    """QB-Heat from the ``heat``, ``decoder`` and ``loss`` sections (and ``model`` / ``data`` for
    the backbone, unless one is given)."""
    if backbone is None:
        backbone = build_backbone(cfg.model, cfg.data.image_size)
    h, d, lo = cfg.heat, cfg.decoder, cfg.loss
    with config_keys(**QBHEAT_KEYS):
        return QBHeat(
            backbone,
            predictor=h.predictor,
            step=h.step,
            init=h.init,
            heat_dim=h.dim,
            quadrant=h.quadrant,
            heat_weight=h.heat_weight,
            commute_weight=h.commute_weight,
            commute_probes=h.commute_probes,
            decoder_width=d.width,
            decoder_depth=d.depth,
            decoder_upsample_blocks=d.upsample_blocks,
            decoder_min_width=d.min_width,
            decoder_norm=d.norm,
            region=lo.region,
            norm_pix=lo.norm_pix,
            target=lo.target,
            teacher_weight=lo.teacher_weight,
            pixel_weight=lo.pixel_weight,
            latent_loss=lo.latent_loss,
            teacher_momentum=lo.teacher_momentum,
            latent_head=lo.latent_head,
            global_weight=lo.global_weight,
            global_loss=lo.global_loss,
            global_temperature=lo.global_temperature,
            teacher_resolution=lo.teacher_resolution,
            view_jitter=lo.view_jitter,
            pair_weight=lo.pair_weight,
            uniform_weight=lo.uniform_weight,
        )
