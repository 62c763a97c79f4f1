"""Pretraining: the LightningModule, its callbacks, checkpoints on disk, the Trainer and the run folder.

Owns building the backbone and QB-Heat from a config (:mod:`.build`), the LightningModule
(:mod:`.module`), the callbacks that report skipped images and draw reconstructions
(:mod:`.callbacks`, :mod:`.pictures`), the device-side non-finite loss watch (:mod:`.nonfinite`),
preemption by SLURM (:mod:`.preemption`), checkpoint I/O (:mod:`.checkpoint`), the Lightning Trainer
(:mod:`.trainer`) and the pretrain / resume / export runs (:mod:`.run`). It may import :mod:`heatssl.model`,
:mod:`heatssl.data`, :mod:`heatssl.config` and :mod:`heatssl.errors`; probing and explain build on it.
"""
