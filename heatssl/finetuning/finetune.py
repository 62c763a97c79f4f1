"""A fine-tuning run: resolve the start, build the timm classifier, train, report, export.

The start is anything ``heatssl probe`` takes: a pretraining checkpoint, an exported backbone, a
timm folder (``local-dir:`` / ``hf-hub:``) or a bare timm name (random initialisation, the
baseline). The output folder (``finetune.out_dir``, else ``RUN/finetune`` for a checkpoint, else
``runs/finetune_<name>``) gets the resolved ``config.yaml``, checkpoints (resumable like
pretraining), ``metrics.json`` / ``metrics.md`` (top-1 / top-5 per epoch and the best),
``confusion.png`` and the fine-tuned model as a timm folder (``model_timm/``).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L

from heatssl.config import Config, ConfigError, FinetuneConfig, effective_batch, save_config
from heatssl.data.datamodule import images_in
from heatssl.finetuning.classifier import FinetuneModule
from heatssl.finetuning.data import FinetuneDataModule
from heatssl.finetuning.recipe import check_scale, resolve
from heatssl.finetuning.report import confusion_figure, finetune_markdown
from heatssl.model.backbone import Backbone
from heatssl.runs.checkpoints import pickle_trusted, safe_torch_load
from heatssl.runs.figures import save_figure
from heatssl.runs.layout import default_out_dir
from heatssl.runs.lock import holding_run_lock
from heatssl.runs.resume import agreed_resume
from heatssl.runs.sources import resolve_backbone
from heatssl.runs.timm_folder import save_timm_folder, timm_classifier, timm_model_args
from heatssl.runs.trainer import build_trainer, scale_line
from heatssl.writing import write_text


@dataclass
class FinetuneResult:
    """Where a fine-tuning run wrote its files, and its metrics."""

    out_dir: Path
    metrics: dict[str, Any]
    model_dir: Path | None
    seconds: float


def finetune_config(cfg: Config, recipe: FinetuneConfig, out: Path) -> Config:
    """The run's config: the recipe resolved, the trainer's epochs set to it, no time budget; the
    validation interval divides the epochs, so the last epoch is always validated."""
    every = recipe.val_every_n_epochs
    while recipe.epochs % every:
        every -= 1
    recipe = dataclasses.replace(recipe, val_every_n_epochs=every)
    trainer = dataclasses.replace(cfg.trainer, max_epochs=recipe.epochs, max_time=None)
    return dataclasses.replace(
        cfg,
        run_dir=str(out),
        finetune=dataclasses.replace(recipe, out_dir=str(out)),
        trainer=trainer,
    )


def _check(cfg: Config) -> None:
    if cfg.data.backend != "pil":
        raise ConfigError(
            f"data.backend={cfg.data.backend}: fine-tuning uses timm's RandAugment pipeline in "
            f"PIL loader workers. Set data.backend=pil."
        )
    if cfg.trainer.max_time is not None:
        print(
            f"heatssl: trainer.max_time={cfg.trainer.max_time} is pretraining's budget; "
            f"fine-tuning runs finetune.epochs.",
            file=sys.stderr,
        )


def finetune(
    source: str,
    cfg: Config,
    named: Collection[str] = (),
    resume: str | None = None,
    force: bool = False,
    callbacks: list[L.Callback] | None = None,
) -> FinetuneResult:
    """Fine-tune ``source`` on ``cfg.data``'s labels with ``cfg.finetune``; write the folder.

    ``resume`` is a checkpoint of this fine-tuning run (``last`` for ``OUT/checkpoints/last.ckpt``;
    ``auto``: that one if it exists, else a fresh start, which is what a requeued job wants).
    """
    _check(cfg)
    out = default_out_dir(source, "finetune", cfg.finetune.out_dir)
    backbone = resolve_backbone(source, cfg, named)
    recipe = resolve(cfg.finetune, backbone)
    run_cfg = finetune_config(cfg, recipe, out)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    config_file = shlex.quote(str(out / "config.yaml"))
    again = f"heatssl finetune {shlex.quote(source)} -c {config_file} --resume"
    trainer = build_trainer(run_cfg, out, again, callbacks, task="finetune")
    datamodule = FinetuneDataModule(
        run_cfg.data, cfg.seed, recipe.auto_augment, out, rank=trainer.global_rank
    )
    datamodule.setup("fit")  # a missing dataset stops here, before anything is built
    num_classes = datamodule.num_classes
    model = timm_classifier(backbone, num_classes, drop_path_rate=recipe.drop_path)
    module = FinetuneModule(model, run_cfg, recipe, num_classes)
    # pretraining's rule (last / auto / a path), decided by process 0 for every process
    ckpt_path = agreed_resume(run_cfg, resume, trainer)
    if ckpt_path is not None:  # a damaged or pickled file stops here, before config.yaml changes
        safe_torch_load(ckpt_path, mmap=True)
    with holding_run_lock(out, trainer.is_global_zero, force):
        processes = trainer.num_devices * trainer.num_nodes
        if trainer.is_global_zero:
            check_scale(recipe, effective_batch(run_cfg, processes))  # warns above the recipe's
            save_config(run_cfg, out / "config.yaml")
            scale = scale_line(run_cfg, trainer.num_devices, trainer.num_nodes, recipe.base_lr)
            print(
                f"heatssl: fine-tuning {backbone.name} from {source} ({recipe.recipe} recipe, "
                f"{recipe.epochs} epochs, {images_in(datamodule.train_dataset)} labelled images), "
                f"{scale}; folder {out}",
                file=sys.stderr,
            )
        start = time.perf_counter()
        trainer.fit(
            module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=not pickle_trusted()
        )
        seconds = time.perf_counter() - start
    metrics = _metrics(module, source, backbone, recipe, datamodule, seconds)
    model_dir = None
    if trainer.is_global_zero:
        model_dir = _write(module, out, metrics, backbone, datamodule, run_cfg)
    return FinetuneResult(out, metrics, model_dir, seconds)


def _metrics(
    module: FinetuneModule,
    source: str,
    backbone: Backbone,
    recipe: FinetuneConfig,
    datamodule: FinetuneDataModule,
    seconds: float,
) -> dict[str, Any]:
    history = module.history
    key = "ema_top1" if recipe.ema_decay > 0 else "top1"
    best = max(history, key=lambda row: row[key]) if history else None
    return {
        "source": source,
        "backbone": backbone.name,
        "recipe": dataclasses.asdict(recipe),
        "label_fraction": datamodule.cfg.label_fraction,
        "train_images": images_in(datamodule.train_dataset),
        "val_images": images_in(datamodule.val_dataset),
        "classes": datamodule.class_names,
        "epochs": history,
        "final": history[-1] if history else None,
        "best": best,
        "reported": key,
        "seconds": seconds,
    }


def _write(
    module: FinetuneModule,
    out: Path,
    metrics: dict[str, Any],
    backbone: Backbone,
    datamodule: FinetuneDataModule,
    cfg: Config,
) -> Path:
    """metrics.json / .md, confusion.png and the model as a timm folder; the folder's path."""
    names = datamodule.class_names
    if module.confusion is not None:
        fig = confusion_figure(module.confusion, names, title=f"{backbone.name}: last epoch, val")
        save_figure(fig, out / "confusion.png")
        metrics["confusion"] = "confusion.png"
        metrics["val_scored"] = int(module.confusion.sum())  # over every process's share
    model = module.final_model().float().eval()
    args = {**timm_model_args(backbone)}
    model_dir = save_timm_folder(
        model, backbone.name, args, out / "model_timm", cfg.data.image_size, names
    )
    metrics["model"] = model_dir.name
    write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    write_text(out / "metrics.md", finetune_markdown(metrics))
    return model_dir
