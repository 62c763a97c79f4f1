"""Evaluation of a frozen backbone: features extracted once, linear / tran-1 / kNN probes, reports.

Owns the feature cache (:mod:`.features`) and the on-disk grids tran-1 reads (:mod:`.grid_store`),
training and scoring the probes (:mod:`.probes`), probe
heads on disk (:mod:`.head_files`), markdown tables of metrics (:mod:`.report`) and the probe run that
resolves a backbone from a checkpoint, an export or a timm name (:mod:`.run`). It may import
:mod:`heatssl.train` (to read checkpoints) and everything below it, never :mod:`heatssl.explain`.
"""
