"""Evaluation of a frozen backbone, one of the four stages: features once, linear / tran-1 / kNN.

Owns the probe run (:mod:`.probe`) and its cost said first (:mod:`.plan`), the feature cache
(:mod:`.features`) and the on-disk grids tran-1 reads (:mod:`.grid_store`), training and scoring the
probes (:mod:`.probes`), the t-SNE map (:mod:`.embedding`) and the metrics tables (:mod:`.report`).
Backbones come from :mod:`heatssl.runs.sources`, heads go to :mod:`heatssl.runs.head_files`; it
imports no other stage.
"""
