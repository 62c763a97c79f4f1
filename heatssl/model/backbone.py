"""The one adapter to timm: any model as an encoder of an NCHW feature grid.

Everything goes through timm's public API (``create_model``, ``feature_info``,
``forward_intermediates``), so CNNs and ViTs look the same to the rest of heatssl: an image batch in,
a (N, d, h, w) grid of the chosen stage out. Errors name this module's own arguments (``stage=7``);
:mod:`heatssl.runs.build` re-words them with config keys.
"""

from __future__ import annotations

import difflib
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from heatssl.errors import ArgumentError

OUTPUT_STRIDES = (8, 16, 32)
"""Output strides timm's CNNs take (dilating their late stages)."""

MODEL_ARGS = frozenset(
    {
        *("output_stride", "in_chans", "global_pool", "drop_rate", "drop_path_rate"),
        # ViTs: the token grid, positions and blocks
        *("patch_size", "img_size", "dynamic_img_size", "dynamic_img_pad", "fc_norm"),
        *("class_token", "no_embed_class", "reg_tokens", "pos_embed", "embed_dim", "depth"),
        *("num_heads", "mlp_ratio", "qkv_bias", "qk_norm", "init_values", "attn_drop_rate"),
        *("proj_drop_rate", "pos_drop_rate", "patch_drop_rate"),
        # CNNs: stages, widths and layers by name
        *("layers", "depths", "dims", "channels", "widths", "stem_type", "stem_width"),
        *("width_multiplier", "channel_multiplier", "depth_multiplier", "act_layer", "norm_layer"),
    }
)
"""The ``timm.create_model`` arguments a config or a file may set: the architecture's shape only.

Never weights, files, downloads or caches (``pretrained*``, ``checkpoint_path``, ``cache_dir``, ...):
timm would load what they name, with pickle in some versions, or reach the network.
"""


def check_model_args(kwargs: Any, where: str = "kwargs") -> None:
    """Refuse ``timm.create_model`` arguments outside :data:`MODEL_ARGS` (or not a mapping)."""
    if not isinstance(kwargs, dict):
        raise ArgumentError(f"{where}={kwargs!r} must be a mapping of timm.create_model arguments.")
    refused = sorted(str(k) for k in kwargs if k not in MODEL_ARGS)
    if refused:
        raise ArgumentError(
            f"{where}.{refused[0]} is not allowed: heatssl passes timm only arguments that shape "
            f"the architecture (weights come from heatssl's own checkpoints and exports, never "
            f"from a path, a download or a cache a file names). Allowed: "
            f"{', '.join(sorted(MODEL_ARGS))}."
        )


def _unknown_model_error(name: str) -> ArgumentError:
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Close names: {', '.join(close)}." if close else ""
    return ArgumentError(
        f"name={name!r} is not a timm model.{hint} "
        f"List them with `python -c \"import timm; print(timm.list_models('resnet*'))\"`."
    )


def create_timm_model(
    name: str,
    image_size: int | None = None,
    output_stride: int | None = None,
    pretrained: bool = False,
    **kwargs: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """Create a timm model without classifier; return it and the kwargs that rebuild it.

    ViTs get ``dynamic_img_size=True`` (the encoder sees a quarter block, the probe the whole image)
    and ``img_size=image_size`` unless given.
    """
    hub = name.startswith(("local-dir:", "hf-hub:"))  # a timm folder: its config.json says the rest
    if not hub and not timm.is_model(name):
        raise _unknown_model_error(name)
    if output_stride not in (None, *OUTPUT_STRIDES):
        raise ArgumentError(
            f"output_stride={output_stride} is not allowed. Allowed: None (the model's own), "
            f"{', '.join(map(str, OUTPUT_STRIDES))}."
        )
    check_model_args(kwargs)
    create_kwargs = dict(kwargs)
    if output_stride is not None:
        create_kwargs["output_stride"] = output_stride
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, **create_kwargs)
        if hasattr(model, "dynamic_img_size") and hasattr(model, "patch_embed"):
            create_kwargs.setdefault("dynamic_img_size", True)
            if image_size is not None:
                create_kwargs.setdefault("img_size", image_size)
            model = timm.create_model(name, pretrained=pretrained, num_classes=0, **create_kwargs)
    except TypeError as err:
        bad = ", ".join(f"{k}={v!r}" for k, v in create_kwargs.items())
        raise ArgumentError(
            f"timm model {name!r} does not accept these arguments ({bad}): {err}. "
            f"Remove the argument (output_stride works for CNNs such as resnet, efficientnet, "
            f"convnext, regnet, not mobilenetv3; ViTs set their grid with patch_size)."
        ) from err
    return model, create_kwargs


class CentreTapConv2d(nn.Conv2d):
    """A dilated stride-1 convolution that runs as the 1 x 1 convolution it is on small maps.

    With 'same' padding (``dilation x (k - 1) / 2``, timm's), every off-centre tap of a k x k kernel
    reads the zero padding once the map is no larger than the dilation, so only the centre weights
    count. timm dilates a CNN's last stages for ``output_stride``; at 64 px the kept quarter's 2 x 2
    grid meets dilation 2 there, and running those convolutions as 1 x 1 gives the same numbers
    and gradients with k^2 fewer multiply-adds (resnet18's dilated ``layer4`` at 2 x 2 was half of
    the encoder's time on a CPU). Larger maps take the ordinary path. The parameters stay the
    module's own, so checkpoints and state dicts do not change.
    """

    def forward(self, x: Tensor) -> Tensor:
        """The convolution; the centre tap alone when the map fits inside the dilation."""
        (dh, dw), (kh, kw) = self.dilation, self.kernel_size
        if x.shape[-2] <= dh and x.shape[-1] <= dw:
            centre = self.weight[:, :, kh // 2 : kh // 2 + 1, kw // 2 : kw // 2 + 1]
            return F.conv2d(x, centre, self.bias, 1, 0, 1, self.groups)
        return super().forward(x)


def _runs_as_centre_tap(conv: nn.Module) -> bool:
    """A plain dilated, stride-1, odd-kernel convolution with 'same' zero padding."""
    if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros":
        return False
    k, d, pad = conv.kernel_size, conv.dilation, conv.padding
    return (
        conv.stride == (1, 1)
        and max(d) > 1
        and all(kk % 2 == 1 for kk in k)
        and not isinstance(pad, str)
        and tuple(pad) == (d[0] * (k[0] // 2), d[1] * (k[1] // 2))
    )


def use_centre_taps(model: nn.Module) -> int:
    """Make every dilated convolution of ``model`` a :class:`CentreTapConv2d` (the same
    parameters, in place); returns how many. Exact: see the class."""
    swapped = 0
    for module in model.modules():
        if _runs_as_centre_tap(module):
            module.__class__ = CentreTapConv2d
            swapped += 1
    return swapped


class Backbone(nn.Module):
    """A timm model seen as an encoder of one stage's NCHW feature grid.

    Only the layers up to that stage are kept (timm's ``prune_intermediate_layers``): every
    parameter left takes part in the grid, which DDP requires, and nothing past it is trained.

    Args:
        name: Any timm model name (``resnet18``, ``vit_tiny_patch16_224``, ...).
        stage: Index into ``model.feature_info`` (negative counts from the end); -1 = last stage.
        image_size: Full image size; checked to split into quarter blocks with a >= 2 x 2 grid.
        check_size: False skips that check (evaluation sees whole images, not quarter blocks).
        output_stride: Dilate CNN stages for a finer grid (8, 16 or 32).
        pretrained: Start from timm's pretrained weights (needs network access).
        **kwargs: More ``timm.create_model`` arguments (e.g. ``patch_size=8``).

    Example:
        >>> enc = Backbone("resnet18", image_size=64, output_stride=16)
        >>> enc(torch.randn(2, 3, 32, 32)).shape   # a quarter block -> (2, 512, 2, 2)
    """

    def __init__(
        self,
        name: str,
        stage: int = -1,
        image_size: int | None = None,
        output_stride: int | None = None,
        pretrained: bool = False,
        check_size: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.model, self.create_kwargs = create_timm_model(
            name,
            image_size=image_size,
            output_stride=output_stride,
            pretrained=pretrained,
            **kwargs,
        )
        self.name = name
        info = self.model.feature_info
        stages = len(info)
        if not -stages <= stage < stages:
            raise ArgumentError(
                f"stage={stage} does not exist on {name}: it has {stages} feature stages "
                f"(indices 0..{stages - 1} or -{stages}..-1; reductions "
                f"{[f['reduction'] for f in info]})."
            )
        self.stage = stage % stages
        self.is_last = self.stage == stages - 1
        self.num_features = int(info[self.stage]["num_chs"])
        self.reduction = int(info[self.stage]["reduction"])
        self.reductions = [int(f["reduction"]) for f in info]
        # Layers past the chosen stage (and a final norm it does not use) never see a gradient:
        # timm removes them, so DDP finds no unused parameter and no memory holds them.
        self.model.prune_intermediate_layers(
            [self.stage], prune_norm=not self.is_last, prune_head=True
        )
        use_centre_taps(self.model)  # dilated convs on maps within their dilation: run as 1 x 1
        if image_size is not None and check_size:
            self.check_image_size(image_size)
        self._quadrant: Tensor | None = None  # set for one forward of a kept quarter (ViTs)
        if self.has_position_table:
            self.model.patch_embed.register_forward_hook(self._quadrant_positions)

    @property
    def has_position_table(self) -> bool:
        """A ViT with a learned absolute position table, resampled to the input's token grid."""
        model = self.model
        return (
            getattr(model, "pos_embed", None) is not None
            and getattr(model, "dynamic_img_size", False)
            and hasattr(model, "patch_embed")
        )

    def forward(self, x: Tensor, quadrant: Tensor | None = None) -> Tensor:
        """Feature grid (N, d, H / reduction, W / reduction) of the chosen stage.

        ``quadrant`` (N,) says that ``x`` is that quarter of a twice larger image: a ViT's tokens
        then get the positions they have in the whole image (that quadrant's part of the position
        table), as MAE's visible patches keep theirs, instead of the whole table squeezed onto the
        quarter. CNNs ignore it.
        """
        self._quadrant = quadrant if self.has_position_table else None
        try:
            (grid,) = self.model.forward_intermediates(
                x, indices=[self.stage], norm=self.is_last, stop_early=True, intermediates_only=True
            )
        finally:
            self._quadrant = None
        return grid

    def _quadrant_positions(self, module: nn.Module, inputs: Any, tokens: Tensor) -> Tensor | None:
        """patch_embed hook: add (the quadrant's part of the whole grid's positions) minus (the
        table resampled onto the quarter, which timm adds next), so the sum is the former."""
        quadrant = self._quadrant
        if quadrant is None or tokens.ndim != 4:
            return None
        model = self.model
        n, h, w, _ = tokens.shape
        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens

        def table(size: tuple[int, int]) -> Tensor:
            resampled = resample_abs_pos_embed(
                model.pos_embed,
                new_size=size,
                old_size=model.patch_embed.grid_size,
                num_prefix_tokens=prefix,
            )
            return resampled[:, prefix:].reshape(1, size[0], size[1], -1)

        whole, squeezed = table((2 * h, 2 * w)), table((h, w))
        rows = (quadrant >= 2).long().view(n, 1, 1) * h + torch.arange(h, device=tokens.device)
        rows = rows.view(n, h, 1).expand(n, h, w)
        cols = (quadrant % 2).long().view(n, 1, 1) * w + torch.arange(w, device=tokens.device)
        cols = cols.view(n, 1, w).expand(n, h, w)
        own = whole[0][rows, cols]  # (n, h, w, C): each sample's quadrant of the whole grid
        return tokens + (own - squeezed).to(tokens.dtype)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in backward (timm's own switch): less memory, more compute."""
        try:
            self.model.set_grad_checkpointing(enable)
        except (AssertionError, NotImplementedError) as err:
            raise ArgumentError(
                f"grad_checkpointing=true: timm's {self.name} does not support gradient "
                f"checkpointing ({err or type(err).__name__}). Use grad_checkpointing=false."
            ) from err

    def no_weight_decay(self) -> set[str]:
        """What the timm model says AdamW must not decay (a ViT's ``pos_embed``, ``cls_token``).

        timm and MAE leave these out of weight decay; the names are this module's.
        """
        names = self.model.no_weight_decay() if hasattr(self.model, "no_weight_decay") else ()
        return {f"model.{n}" for n in names}

    def pooled(self, x: Tensor) -> Tensor:
        """Global-average-pooled embedding (N, d) of the chosen stage."""
        return self(x).mean(dim=(-2, -1))

    def check_image_size(self, image_size: int) -> None:
        """Refuse sizes whose quarter block does not give an integer grid of at least 2 x 2 cells."""

        def fits(reduction: int) -> bool:
            return image_size % (2 * reduction) == 0 and image_size // (2 * reduction) >= 2

        r = self.reduction
        if fits(r):
            return
        where = f"{self.name} stage {self.stage} (reduction {r})"
        valid = range(4 * r, 4 * r + 2 * r * 64, 2 * r)
        nearest = sorted(sorted(valid, key=lambda s: abs(s - image_size))[:2])
        fixes = [f"image_size={' or '.join(map(str, nearest))}"]
        if "patch_embed" not in dict(self.model.named_children()):
            strides = [s for s in (16, 8) if s < r and fits(s)]
            if strides:
                g = image_size // (2 * strides[0])
                fixes.append(f"output_stride={strides[0]} (most CNNs; block grid {g}x{g})")
        stages = [i - len(self.reductions) for i, red in enumerate(self.reductions) if fits(red)]
        if stages:
            fixes.append(f"stage={stages[-1]} (reduction {self.reductions[stages[-1]]})")
        if image_size % (2 * r):
            problem = (
                f"image_size={image_size} cannot be split into quarter blocks on {where}: "
                f"it must be a multiple of 2 x {r} = {2 * r}, at least {4 * r}."
            )
        else:
            g = image_size // (2 * r)
            problem = (
                f"image_size={image_size} gives a kept-block grid of {g}x{g} on {where}; "
                f"the heat residual needs at least 2x2 neighbours."
            )
        raise ArgumentError(
            f"{problem} Nearest sizes that work: {', '.join(map(str, nearest))}. "
            f"Fix: {'; or '.join(fixes)}."
        )


def restride(backbone: Backbone, output_stride: int) -> Backbone:
    """The same weights at another output stride (a CNN's late stages dilated, or not).

    Dilation changes no weight, only how the late convolutions sample their input, so a backbone
    pretrained at one stride can be evaluated at another: ``probe.output_stride``.
    """
    kwargs = dict(backbone.create_kwargs)
    if kwargs.pop("output_stride", None) == output_stride:
        return backbone
    other = Backbone(
        backbone.name,
        stage=backbone.stage,
        output_stride=output_stride,
        check_size=False,
        **kwargs,
    )
    other.model.load_state_dict(backbone.model.state_dict())
    return other.train(backbone.training)
