"""The pretraining methods scripts/compare.py trains: heatssl (QB-Heat), LightlySSL's SimCLR, MoCo-v2
and MAE, and random init, each around a heatssl :class:`Backbone` whose weights get exported.

Each method gives its model, the loss of a batch, its transform, batch size and optimiser. LightlySSL
(the ``bench`` extra) is imported inside the methods that use it, so heatssl and random init run
without it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from heatssl.config import Config
from heatssl.data.transforms import build_transform, to_model_input
from heatssl.model.backbone import Backbone
from heatssl.model.optim import scaled_lr, weight_decay_groups
from heatssl.model.teacher import teacher_momentum
from heatssl.runs.build import build_backbone, build_qbheat


class Method(nn.Module):
    """One pretraining method around a heatssl :class:`Backbone` (whose weights get exported)."""

    batch_size = 128

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def transform(self, size: int) -> Any:
        raise NotImplementedError

    def loss(self, views: Any, progress: float) -> torch.Tensor:
        raise NotImplementedError

    def optimizer(self) -> torch.optim.Optimizer:
        raise NotImplementedError

    def images_in(self, views: Any) -> int:
        """Source images in a batch (not views)."""
        return (views[0] if isinstance(views, list | tuple) else views).shape[0]

    def after_step(self, progress: float) -> None:
        """Called after every optimiser step (``progress`` 0..1 of the budget); most need none."""

    def encoders(self) -> dict[str, Backbone]:
        """The backbones to export and probe, by name: the trained one, ``""``."""
        return {"": self.backbone}


class HeatSSL(Method):
    """QB-Heat exactly as ``heatssl pretrain`` builds it from the imagenette recipe."""

    def __init__(self, backbone: Backbone, cfg: Config) -> None:
        super().__init__(backbone)
        self.cfg = cfg
        self.qbheat = build_qbheat(cfg, backbone)
        self.batch_size = cfg.data.batch_size

    def transform(self, size: int) -> Any:
        return build_transform(size, True, self.cfg.data.augment, self.cfg.data.crop_scale_min)

    def loss(self, views: Any, progress: float) -> torch.Tensor:
        return self.qbheat(to_model_input(views)).loss  # the loader's uint8 images, normalised

    def after_step(self, progress: float) -> None:
        """The EMA teacher's update, as ``heatssl pretrain`` does it (no-op without a teacher)."""
        self.qbheat.update_teacher(teacher_momentum(self.cfg.loss.teacher_momentum, progress))

    def encoders(self) -> dict[str, Backbone]:
        """The student, and the EMA teacher when the objective has one (both get probed)."""
        teacher = self.qbheat.teacher
        return {"": self.backbone, **({"teacher": teacher.backbone} if teacher else {})}

    def optimizer(self) -> torch.optim.Optimizer:
        """AdamW with ``heatssl pretrain``'s groups (no decay on biases, norms, A, B)."""
        opt = self.cfg.optim
        return torch.optim.AdamW(
            weight_decay_groups(self.qbheat, opt.weight_decay),
            lr=scaled_lr(opt.base_lr, self.batch_size),
            betas=tuple(opt.betas),
        )


class SimCLR(Method):
    """LightlySSL's SimCLR (its CIFAR/Imagenette benchmark settings, blur off at small sizes)."""

    def __init__(self, backbone: Backbone) -> None:
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        super().__init__(backbone)
        dim = backbone.num_features
        self.head = SimCLRProjectionHead(dim, dim, 128)
        self.criterion = NTXentLoss(temperature=0.5)

    def transform(self, size: int) -> Any:
        from lightly.transforms import SimCLRTransform

        return SimCLRTransform(input_size=size, cj_strength=0.5, gaussian_blur=0.0)

    def loss(self, views: Any, progress: float) -> torch.Tensor:
        z0, z1 = (self.head(self.backbone.pooled(v)) for v in views)
        return self.criterion(z0, z1)

    def optimizer(self) -> torch.optim.Optimizer:
        """SGD as in LightlySSL's benchmarks, over the trainable parameters only."""
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.SGD(
            params, lr=0.06 * self.batch_size / 128, momentum=0.9, weight_decay=5e-4
        )


class MoCoV2(Method):
    """LightlySSL's MoCo-v2: momentum encoder, memory bank of 4096, temperature 0.1."""

    def __init__(self, backbone: Backbone) -> None:
        import copy

        from lightly.loss import NTXentLoss
        from lightly.models.modules import MoCoProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        super().__init__(backbone)
        dim = backbone.num_features
        self.head = MoCoProjectionHead(dim, dim, 128)
        self.backbone_m = copy.deepcopy(backbone)
        self.head_m = copy.deepcopy(self.head)
        deactivate_requires_grad(self.backbone_m)
        deactivate_requires_grad(self.head_m)
        self.criterion = NTXentLoss(temperature=0.1, memory_bank_size=(4096, 128))

    def transform(self, size: int) -> Any:
        from lightly.transforms import MoCoV2Transform

        return MoCoV2Transform(input_size=size, cj_strength=0.5, gaussian_blur=0.0)

    def loss(self, views: Any, progress: float) -> torch.Tensor:
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule

        momentum = cosine_schedule(int(progress * 1000), 1000, 0.99, 1.0)
        update_momentum(self.backbone, self.backbone_m, m=momentum)
        update_momentum(self.head, self.head_m, m=momentum)
        query = self.head(self.backbone.pooled(views[0]))
        with torch.no_grad():
            key = self.head_m(self.backbone_m.pooled(views[1]))
        return self.criterion(query, key)

    optimizer = SimCLR.optimizer


class MAE(Method):
    """LightlySSL's MAE on the timm ViT inside a heatssl Backbone (mask ratio 0.75)."""

    def __init__(self, backbone: Backbone, cfg: Config) -> None:
        from lightly.models.modules import MAEDecoderTIMM, MaskedVisionTransformerTIMM

        super().__init__(backbone)
        self.cfg = cfg
        vit = backbone.model
        self.patch = vit.patch_embed.patch_size[0]
        self.encoder = MaskedVisionTransformerTIMM(vit=vit)
        self.seq_len = vit.patch_embed.num_patches + vit.num_prefix_tokens
        self.decoder = MAEDecoderTIMM(
            num_patches=vit.patch_embed.num_patches,
            patch_size=self.patch,
            embed_dim=vit.embed_dim,
            decoder_embed_dim=128,
            decoder_depth=2,
            decoder_num_heads=4,
            num_prefix_tokens=vit.num_prefix_tokens,
        )

    def transform(self, size: int) -> Any:
        from lightly.transforms import MAETransform

        return MAETransform(input_size=size)

    def loss(self, views: Any, progress: float) -> torch.Tensor:
        from lightly.models import utils

        images = views[0]
        n = images.shape[0]
        keep, masked = utils.random_token_mask(
            size=(n, self.seq_len), mask_ratio=0.75, device=images.device
        )
        encoded = self.encoder.encode(images=images, idx_keep=keep)
        tokens = utils.repeat_token(self.decoder.mask_token, (n, self.seq_len))
        tokens = utils.set_at_index(tokens, keep, self.decoder.embed(encoded))
        pred = self.decoder.predict(utils.get_at_index(self.decoder.decode(tokens), masked))
        target = utils.get_at_index(utils.patchify(images, self.patch), masked - 1)
        return nn.functional.mse_loss(pred, target)

    def optimizer(self) -> torch.optim.Optimizer:
        opt = (
            self.cfg.optim
        )  # heatssl's short-budget AdamW recipe: the MAE paper's lr is for 800 epochs
        return torch.optim.AdamW(
            self.parameters(),
            lr=scaled_lr(opt.base_lr, self.batch_size),
            betas=tuple(opt.betas),
            weight_decay=opt.weight_decay,
        )


def build_method(name: str, cfg: Config) -> Method:
    """The method ``name`` around a fresh backbone built from ``cfg``."""
    torch.manual_seed(cfg.seed)
    check = name.startswith("heatssl")
    backbone = build_backbone(cfg.model, cfg.data.image_size, check_size=check)
    if name in ("heatssl", "heatssl_vit"):
        return HeatSSL(backbone, cfg)
    if name == "simclr":
        return SimCLR(backbone)
    if name == "mocov2":
        return MoCoV2(backbone)
    if name == "mae":
        return MAE(backbone, cfg)
    return Method(backbone)
