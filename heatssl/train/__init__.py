"""Pretraining, one of the four stages: the QB-Heat run, its LightningModule and what only it needs.

Owns the run (:mod:`.pretrain`: pretrain, resume, the loader benchmark), the LightningModule
(:mod:`.pretrain_module`), its reconstruction pictures (:mod:`.pictures`), the device-side
non-finite loss watch (:mod:`.nonfinite`) and the random state it keeps in checkpoints
(:mod:`.rng`). It stands on :mod:`heatssl.runs` (run folder, Trainer, checkpoints, lock, resume) and
the layers below, never on another stage.
"""
