"""The run folder as one object: where every file of a run lives, and where a stage writes by default.

A pretraining run folder (``run_dir``) holds ``config.yaml`` (the resolved config), ``checkpoints/``
(``last.ckpt`` and the newest epoch checkpoints), ``pictures/``, ``metrics.csv``, ``bad_images.txt``,
``file_index/`` (the image folders' file lists), ``compile_cache/`` and, while a run trains in it,
``run.lock``; the stages that read its checkpoint write beside them: ``probe/``, ``finetune/``,
``heatmaps/``, ``backbone.safetensors``, ``backbone_timm/`` and ``reconstruction.png``. A checkpoint
knows its run folder (:meth:`RunLayout.of_checkpoint`); any other source gets ``runs/<stage>_<name>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HUB_PREFIXES = ("local-dir:", "hf-hub:")
"""A timm folder (``local-dir:PATH``) or a Hugging Face Hub repo (``hf-hub:USER/NAME``)."""


@dataclass(frozen=True)
class RunLayout:
    """The files of the run folder ``root``."""

    root: Path

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> RunLayout:
        """The run folder a checkpoint was written into (``RUN/checkpoints/X.ckpt``); a checkpoint
        kept anywhere else counts as a run folder of its own, its folder."""
        folder = Path(checkpoint).resolve().parent
        return cls(folder.parent if folder.name == "checkpoints" else folder)

    @property
    def config(self) -> Path:
        """The resolved config (``heatssl pretrain -c RUN/config.yaml`` repeats the run)."""
        return self.root / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        """The folder of the run's checkpoints."""
        return self.root / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        """``last.ckpt``: what ``--resume`` continues from."""
        return self.checkpoints / "last.ckpt"

    @property
    def pictures(self) -> Path:
        """Reconstruction pictures of pretraining."""
        return self.root / "pictures"

    @property
    def bad_images(self) -> Path:
        """Every unreadable image file met, by epoch."""
        return self.root / "bad_images.txt"

    @property
    def file_index(self) -> Path:
        """The image folders' file lists, scanned once (:mod:`heatssl.data.file_index`)."""
        return self.root / "file_index"

    @property
    def compile_cache(self) -> Path:
        """torch.compile's cache, shared by every node and requeue."""
        return self.root / "compile_cache"

    def stage(self, name: str) -> Path:
        """A stage's folder in the run: ``probe``, ``finetune`` or ``heatmaps``."""
        return self.root / name

    @property
    def probe_metrics(self) -> Path:
        """``heatssl probe``'s figures of this run (read by the model card)."""
        return self.stage("probe") / "metrics.json"

    @property
    def backbone_file(self) -> Path:
        """The default safetensors export."""
        return self.root / "backbone.safetensors"

    @property
    def backbone_timm(self) -> Path:
        """The default timm-folder export."""
        return self.root / "backbone_timm"

    @property
    def reconstruction(self) -> Path:
        """``heatssl reconstruct``'s default figure."""
        return self.root / "reconstruction.png"


def default_out_dir(source: str, stage: str, configured: str | None = None) -> Path:
    """Where ``stage`` (``probe``, ``finetune``, ``heatmaps``) writes for ``source``: ``configured``
    if given, else the checkpoint's run folder's ``<stage>/``, else ``runs/<stage>_<name>``."""
    if configured:
        return Path(configured)
    if source.startswith(HUB_PREFIXES):  # local-dir:runs/x/backbone_timm -> <stage>_backbone_timm
        return Path("runs") / f"{stage}_{Path(source.split(':', 1)[1].rstrip('/')).name}"
    if Path(source).suffix == ".ckpt":
        return RunLayout.of_checkpoint(source).stage(stage)
    return Path("runs") / f"{stage}_{Path(source).stem}"
