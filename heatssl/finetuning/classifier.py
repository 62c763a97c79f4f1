"""The fine-tuning Lightning module: a timm classifier trained with timm's recipe parts.

AdamW over timm's parameter groups (no decay on biases and norms, layer-wise lr decay by the
model's own ``group_matcher``), linear warm-up then cosine per step, mixup / cutmix with label
smoothing (``timm.data.Mixup``, soft-target cross-entropy), random erasing on the normalised
batch on the device (timm's ``RandomErasing``), drop path inside the model, optional EMA of the
weights (timm's ``ModelEmaV3``). Validation reports top-1 / top-5 (and the EMA's) every epoch and
keeps the confusion matrix of the last one.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from heatssl.config import Config, FinetuneConfig, effective_batch
from heatssl.data.transforms import to_model_input
from heatssl.model.optim import can_fuse, epoch_warmup_cosine, scaled_lr, step_schedule
from heatssl.runs.preemption import start_compile_workers


class FinetuneModule(L.LightningModule):
    """Fine-tune ``model`` (a timm classifier with ``num_classes`` outputs) as ``recipe`` says.

    Args:
        model: The timm model, backbone weights loaded, classifier fresh.
        cfg: The run config (data, trainer settings); ``recipe`` is its ``finetune`` section
            resolved for the model's family.
        recipe: The resolved :class:`FinetuneConfig` (no ``None`` left).
        num_classes: Classes of the labelled data.
    """

    def __init__(
        self, model: nn.Module, cfg: Config, recipe: FinetuneConfig, num_classes: int
    ) -> None:
        super().__init__()
        self.model, self.cfg, self.recipe, self.num_classes = model, cfg, recipe, num_classes
        if cfg.trainer.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.ema = ModelEmaV3(model, decay=recipe.ema_decay) if recipe.ema_decay > 0 else None
        if self.ema is not None:
            # timm's deep copy keeps requires_grad: DDP would wait for gradients the EMA never gets
            # ("Expected to have finished reduction in the prior iteration") and stop at step 2
            self.ema.requires_grad_(False)
        active = recipe.mixup > 0 or recipe.cutmix > 0
        self.mixup = (
            Mixup(
                mixup_alpha=recipe.mixup,
                cutmix_alpha=recipe.cutmix,
                label_smoothing=recipe.smoothing,
                num_classes=num_classes,
            )
            if active
            else None
        )
        self.criterion = SoftTargetCrossEntropy()
        top5 = min(5, num_classes)
        self.metrics = nn.ModuleDict(
            {
                "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
                "top5": MulticlassAccuracy(num_classes, top_k=top5, average="micro"),
                "confusion": MulticlassConfusionMatrix(num_classes),
            }
        )
        if self.ema is not None:
            self.ema_metrics = nn.ModuleDict(
                {
                    "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
                    "top5": MulticlassAccuracy(num_classes, top_k=top5, average="micro"),
                    "confusion": MulticlassConfusionMatrix(num_classes),
                }
            )
        self.last_loss: Tensor | None = None  # read by the progress bar when it refreshes
        self.history: list[dict[str, float]] = []  # one row per validation epoch (process 0)
        self.confusion: Tensor | None = None  # of the last validation (the EMA's when on)

    # ----- steps ------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Compile the classifier in place with static shapes when ``trainer.compile`` is set."""
        if self.cfg.trainer.compile and not getattr(self, "_compiled", False):
            start_compile_workers()  # before the preemption signal could reach them
            self.model.compile(mode=self.cfg.trainer.compile_mode, dynamic=False)
            self._compiled = True

    def _input(self, images: Tensor) -> Tensor:
        return to_model_input(images, self.cfg.trainer.channels_last)

    def training_step(self, batch: tuple[Tensor, Tensor, Any], batch_idx: int) -> Tensor:
        """Erase, mix, and score against the soft targets."""
        images, labels = batch[0], batch[1]
        x = self._input(images)
        if self.recipe.re_prob > 0:
            erase = RandomErasing(self.recipe.re_prob, mode="pixel", device=str(x.device))
            x = erase(x)
        if self.mixup is not None and x.shape[0] % 2 == 0:  # timm's Mixup pairs the batch
            x, targets = self.mixup(x, labels)
        else:
            targets = mixup_target(labels, self.num_classes, smoothing=self.recipe.smoothing)
        loss = self.criterion(self.model(x), targets)
        # not prog_bar: Lightning would read it on the host after every step; the bar reads
        # last_loss when it refreshes (every trainer.log_every_n_steps), as in pretraining
        self.log("train/loss", loss, batch_size=x.shape[0])
        self.last_loss = loss.detach()
        head_lr = self.trainer.optimizers[0].param_groups[-1]["lr"] if self._trainer else 0.0
        self.log("train/lr", head_lr, batch_size=x.shape[0])
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)

    def validation_step(self, batch: tuple[Tensor, Tensor, Any], batch_idx: int) -> None:
        """Accumulate top-1 / top-5 and the confusion matrix (and the EMA's)."""
        images, labels = batch[0], batch[1]
        if images.numel() == 0:
            return
        x = self._input(images)
        logits = self.model(x)
        for metric in self.metrics.values():
            metric.update(logits, labels)
        if self.ema is not None:
            ema_logits = self.ema.module(x)
            for metric in self.ema_metrics.values():
                metric.update(ema_logits, labels)
        loss = F.cross_entropy(logits.float(), labels)
        self.log("val/loss", loss, batch_size=x.shape[0], sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        row: dict[str, float] = {"epoch": self.current_epoch + 1}
        for prefix, metrics in (("", self.metrics), ("ema_", getattr(self, "ema_metrics", None))):
            if metrics is None:
                continue
            for name in ("top1", "top5"):
                value = float(metrics[name].compute()) * 100
                row[f"{prefix}{name}"] = value
                # every process holds the same value (the metric synced itself); the mean of
                # equal values keeps it, and Lightning asks for it under DDP
                self.log(f"val/{prefix}{name}", value, sync_dist=True)
                metrics[name].reset()
            confusion = metrics["confusion"].compute().cpu()
            metrics["confusion"].reset()
            if prefix == "ema_" or self.ema is None:
                self.confusion = confusion
        if not self.trainer.sanity_checking:
            self.history.append(row)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["finetune_history"] = list(self.history)  # a resumed run reports every epoch

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.history = list(checkpoint.get("finetune_history", []))

    # ----- optimiser ---------------------------------------------------------------------------
    def learning_rate(self) -> float:
        """``base_lr x effective batch / 256`` (per-device batch x devices x nodes x accumulation)."""
        return scaled_lr(self.recipe.base_lr, effective_batch(self.cfg, self.trainer.world_size))

    def configure_optimizers(self) -> dict[str, Any]:
        """timm's AdamW groups with layer decay; each group's lr scaled before the schedule."""
        r = self.recipe
        optimizer = create_optimizer_v2(
            self.model,
            opt="adamw",
            lr=self.learning_rate(),
            weight_decay=r.weight_decay,
            layer_decay=r.layer_decay if r.layer_decay < 1 else None,
            betas=(0.9, 0.999),
            # fused: one kernel, and no host read of each tensor's step count (torch's plain AdamW
            # reads them with .item() every step)
            fused=can_fuse(self.model.parameters(), self.cfg.trainer.precision),
        )
        for group in optimizer.param_groups:  # timm's own schedulers apply lr_scale; LambdaLR not
            group["lr"] = group["lr"] * group.get("lr_scale", 1.0)
        factor = epoch_warmup_cosine(
            int(self.trainer.estimated_stepping_batches),
            self.trainer.max_epochs,
            r.warmup_epochs,
            r.min_lr_ratio,
        )
        return step_schedule(optimizer, factor)

    def final_model(self) -> nn.Module:
        """The weights to export and report: the EMA's when on, else the trained model's."""
        model = self.ema.module if self.ema is not None else self.model
        return getattr(model, "_orig_mod", model)
