"""The LightningModule of QB-Heat pretraining: optimiser, schedule, logging and the online probe.

The objective itself is :class:`heatssl.model.qbheat.QBHeat`; this module only trains it. Its
hyperparameters are the resolved run config as a plain dict, so a checkpoint alone rebuilds the model.
Pictures are drawn by :class:`heatssl.runs.callbacks.ReconstructionPictures` through
:meth:`HeatPretrainModule.reconstruct`.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import Timer
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from heatssl.config import Config, config_keys, effective_batch, load_config
from heatssl.data.datasets import Batch
from heatssl.data.transforms import to_model_input
from heatssl.errors import CheckpointError, NonFiniteLossError
from heatssl.model.heads import LinearHead
from heatssl.model.optim import (
    can_fuse,
    clock_warmup_cosine,
    epoch_warmup_cosine,
    scaled_lr,
    step_schedule,
    weight_decay_groups,
)
from heatssl.model.quadrants import crop_quadrant
from heatssl.model.teacher import teacher_momentum
from heatssl.runs.build import MODEL_KEYS, build_qbheat
from heatssl.runs.callbacks import batches_seen
from heatssl.runs.figures import reconstruction_images
from heatssl.runs.preemption import start_compile_workers
from heatssl.runs.sources import MODULE_PREFIX, drop_pruned_layers
from heatssl.train.collapse import CollapseWatch
from heatssl.train.nonfinite import NonFiniteWatch
from heatssl.train.rng import restore_rng, rng_state

TIME_WARMUP = 0.1  # its warm-up, as a fraction of the budget (as scripts/compare.py)


class HeatPretrainModule(L.LightningModule):
    """Train :class:`QBHeat` with AdamW, warm-up + cosine, lr = base_lr x effective batch / 256.

    Args:
        config: The run config (a :class:`Config` or its ``to_dict()``).
        num_classes: Classes of the data; with ``probe.online`` it adds the online linear probe.
    """

    def __init__(self, config: Config | dict[str, Any], num_classes: int | None = None) -> None:
        super().__init__()
        cfg = config if isinstance(config, Config) else load_config(config)
        self.save_hyperparameters({"config": cfg.to_dict(), "num_classes": num_classes})
        self.cfg = cfg
        self.qbheat = build_qbheat(cfg)
        if cfg.model.grad_checkpointing:
            with config_keys(**MODEL_KEYS):
                self.qbheat.backbone.set_grad_checkpointing(True)
        if cfg.trainer.channels_last:
            self.qbheat.to(memory_format=torch.channels_last)
        self._watch = NonFiniteWatch()
        self._collapse = CollapseWatch(cfg.loss.collapse_spread)
        self._spread: Tensor | None = None  # the last step's teacher spread (target teacher/both)
        self._rng_restored = False  # a resumed run continues each process's random draws
        self.last_loss: Tensor | None = None
        self.online: LinearHead | None = None
        if cfg.probe.online and num_classes:
            # Trained on detached kept-quarter features: a cheap signal to watch, not the real probe.
            self.online = LinearHead(self.qbheat.backbone.num_features, num_classes)
            self.online_train_acc = MulticlassAccuracy(num_classes, average="micro")
            self.online_val_acc = MulticlassAccuracy(num_classes, average="micro")

    def configure_model(self) -> None:
        """Compile the whole QB-Heat forward in place (state-dict keys unchanged), when asked.

        One graph: quarter crop, encoder, heat steps, decoder, heat loss and pixel loss (no graph
        break: the sampled quadrants are never read on the host). Static shapes: training shapes
        are fixed, and a dynamic-shape recompile (a second batch shape, e.g. the pictures) breaks
        torch's backward of the ViTs' antialiased position-table resampling.
        """
        t = self.cfg.trainer
        if t.compile and not getattr(self, "_compiled", False):
            start_compile_workers()  # before the preemption signal could reach them
            self.qbheat.compile(mode=t.compile_mode, dynamic=False)
            self._compiled = True

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip here for fused AdamW under bf16-mixed: Lightning refuses any fused optimiser in its
        mixed-precision plugin, though bf16 has no gradient scaler and the gradients are exact.
        float16 (scaled gradients) never fuses (:func:`~heatssl.model.optim.can_fuse`) and takes
        Lightning's path."""
        if gradient_clip_val and optimizer.defaults.get("fused"):
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            if gradient_clip_algorithm == "value":  # a str enum in Lightning
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    @property
    def backbone(self) -> torch.nn.Module:
        """The timm backbone adapter being pretrained."""
        return self.qbheat.backbone

    def learning_rate(self) -> float:
        """The peak lr: base_lr x effective batch / 256 for this Trainer's processes."""
        processes = self.trainer.world_size if self._trainer is not None else 1
        return scaled_lr(self.cfg.optim.base_lr, effective_batch(self.cfg, processes))

    def model_input(self, images: Tensor) -> Tensor:
        """A batch's images, already on the device, as the model's normalised float input.

        Loaders send uint8 (a quarter of float32's bytes); the conversion and the ImageNet
        normalisation run here, on the device (:func:`to_model_input`).
        """
        return to_model_input(images, self.cfg.trainer.channels_last)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        images = self.model_input(batch[0])
        out = self.qbheat(images)
        parts = {"train/loss": out.loss, "train/rec": out.rec}
        if out.heat is not None:
            parts["train/heat"] = out.heat
        if out.commute is not None:
            parts["train/commute"] = out.commute
        if out.latent is not None:
            parts["train/latent"] = out.latent
        if out.global_latent is not None:
            parts["train/global"] = out.global_latent
        if out.pair is not None:
            parts["train/pair"] = out.pair
        if out.uniform is not None:
            parts["train/uniform"] = out.uniform
        self._watch_loss(parts)
        if out.teacher_spread is not None:  # a diagnostic, not a loss: not watched for NaN
            parts["train/teacher_spread"] = self._spread = out.teacher_spread
        self.log_dict(parts, prog_bar=False, sync_dist=False, batch_size=images.shape[0])
        self.last_loss = out.loss.detach()  # the progress bar reads it when it refreshes
        if self.online is None:
            return out.loss
        logits = self.online(out.block.detach().float().mean(dim=(-2, -1)))
        online_loss = F.cross_entropy(logits, batch[1])
        self.online_train_acc(logits, batch[1])
        self.log("online/train_loss", online_loss, batch_size=images.shape[0])
        self.log("online/train_top1", self.online_train_acc, on_step=False, on_epoch=True)
        return out.loss + online_loss

    def on_train_start(self) -> None:
        """Count steps on the device; under DDP give every process its own random stream.

        With one seed, every rank would draw the same quadrants and (in-process) augmentations.
        """
        self._watch.start(self.global_step, self.device, self.trainer.accumulate_grad_batches)
        if self.trainer.world_size > 1 and not self._rng_restored:
            L.seed_everything(self.cfg.seed + 100_003 * self.global_rank, verbose=False)

    def _watch_loss(self, parts: dict[str, Tensor]) -> None:
        """Note a non-finite loss on the device; the optimiser skips from it on (fused AdamW).

        Without fused AdamW the flag is read at once (a host sync per step), as there is nothing
        to skip the step with.
        """
        seen = self._watch.note(parts)
        optimizer = self.optimizers().optimizer if self._trainer is not None else None
        if optimizer is not None and optimizer.defaults.get("fused"):
            optimizer.found_inf = seen  # read by AdamW's fused step: skips it on the device
        else:
            self.stop_if_not_finite()

    def stop_if_not_finite(self) -> None:
        """Raise :class:`NonFiniteLossError` if any step so far had a non-finite loss (host read)."""
        found = self._watch.seen()
        if found is None:
            return
        step, values = found
        raise NonFiniteLossError(
            f"non-finite loss at step {step}: {values}. The weights were not updated with it and "
            f"the last checkpoint is the last good one. Fix: lower optim.base_lr (now "
            f"{self.cfg.optim.base_lr:g}), keep trainer.gradient_clip_val set, or train in full "
            f"precision (trainer.precision=32-true; now {self.cfg.trainer.precision}); then --resume."
        )

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimiser's step, then the EMA teacher's (when ``loss.target`` has one): once per
        real optimiser step, so gradient accumulation does not speed the teacher up."""
        super().optimizer_step(*args, **kwargs)
        if self.qbheat.teacher is not None:
            self.qbheat.update_teacher(
                teacher_momentum(self.cfg.loss.teacher_momentum, self._progress())
            )

    def _progress(self) -> float:
        """How far training is, 0..1: by the clock under ``trainer.max_time`` (as the lr schedule),
        else optimiser steps over the estimated total."""
        budget = self.cfg.trainer.max_time_seconds()
        if budget:
            timer = next(c for c in self.trainer.callbacks if isinstance(c, Timer))
            return timer.time_elapsed("train") / budget
        total = float(self.trainer.estimated_stepping_batches)
        return self.global_step / total if 0 < total < float("inf") else 0.0

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Read the non-finite flag and the teacher's spread every ``trainer.log_every_n_steps``
        batches (a host sync); stop a run whose teacher collapsed (:class:`CollapseWatch`)."""
        if batches_seen(self.trainer) % max(1, self.trainer.log_every_n_steps) == 0:
            self.stop_if_not_finite()
            if self._spread is not None:
                spread = self._spread.detach().float().clone()
                if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                    dist.all_reduce(spread)  # every process decides on the same figure
                    spread /= dist.get_world_size()
                self._collapse.note(float(spread), self.global_step)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the random generators, so a resumed run draws what an unbroken one would.

        A run that met a non-finite loss stops here instead of writing the checkpoint.
        """
        self.stop_if_not_finite()
        checkpoint["rng_state"] = rng_state()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # every process builds the checkpoint (process 0 writes it): keep each one's generators
            states: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(states, checkpoint["rng_state"])
            checkpoint["rng_state_per_rank"] = states

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore this process's random generators from a checkpoint (older ones have none).

        Backbone layers pruned since the checkpoint was written are dropped; its optimiser state
        still holds them and cannot be resumed, which is said plainly instead of failing later.
        """
        kept = drop_pruned_layers(self, checkpoint["state_dict"], f"{MODULE_PREFIX}backbone.model.")
        if len(kept) != len(checkpoint["state_dict"]) and checkpoint.get("optimizer_states"):
            raise CheckpointError(
                "this checkpoint was written before heatssl removed the backbone layers its grid "
                "does not use; its weights load (heatssl probe / export), but its optimiser state "
                "does not fit the smaller model, so it cannot be resumed. Start a new run."
            )
        checkpoint["state_dict"] = kept
        if self._trainer is None:
            return
        per_rank = checkpoint.get("rng_state_per_rank")
        if per_rank and len(per_rank) == self.trainer.world_size:
            restore_rng(per_rank[self.global_rank])
            self._rng_restored = True
        elif "rng_state" in checkpoint:
            restore_rng(checkpoint["rng_state"])
            self._rng_restored = self.trainer.world_size == 1

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """Online-probe accuracy on val images' kept quarters (all four quadrants in turn)."""
        if self.online is None:
            return
        images, labels = batch[0], batch[1]
        if images.shape[0] == 0:  # every file of this batch was unreadable (and reported)
            return
        images = self.model_input(images)
        q = torch.arange(images.shape[0], device=images.device) % 4
        pooled = self.backbone(crop_quadrant(images, q), quadrant=q).float().mean(dim=(-2, -1))
        self.online_val_acc(self.online(pooled), labels)
        self.log("online/val_top1", self.online_val_acc, on_epoch=True, prog_bar=True)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (no decay on biases, norms, A, B, the [MASK] feature and the online probe)."""
        opt = self.cfg.optim
        groups = weight_decay_groups(self.qbheat, opt.weight_decay)
        if self.online is not None:
            groups[1]["params"] = [*self.online.parameters(), *groups[1]["params"]]
        optimizer = torch.optim.AdamW(
            groups,
            lr=self.learning_rate(),
            betas=tuple(opt.betas),
            fused=can_fuse(self.qbheat.parameters(), self.cfg.trainer.precision),
        )
        budget = self.cfg.trainer.max_time_seconds()
        if budget:  # the schedule follows the clock: warm-up over 10% of the budget, then cosine
            timer = next(c for c in self.trainer.callbacks if isinstance(c, Timer))
            factor = clock_warmup_cosine(
                lambda: timer.time_elapsed("train"),  # resumed time included
                budget,
                TIME_WARMUP,
                opt.min_lr_ratio,
            )
        else:
            factor = epoch_warmup_cosine(
                int(self.trainer.estimated_stepping_batches),
                self.trainer.max_epochs,
                opt.warmup_epochs,
                opt.min_lr_ratio,
            )
        return step_schedule(optimizer, factor)

    def reconstruct(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Images in [0, 1], the masked-region mask and the reconstruction in [0, 1] (eval mode,
        the eager forward: see :func:`heatssl.runs.figures.reconstruction_images`)."""
        return reconstruction_images(self.qbheat, images)
