"""The floor every stage stands on: what runs read and write between each other, and how they train.

One home for each of: the run folder's layout (:mod:`.layout`); where a backbone comes from, from any
source (:mod:`.sources`, with :mod:`.build` for config -> model); files read safely and their
damage named (:mod:`.checkpoints` for torch files, :mod:`.files` for the rest); exports
(:mod:`.exports`, :mod:`.timm_folder`) and probe heads (:mod:`.head_files`); the run lock
(:mod:`.lock`), resume agreement (:mod:`.resume`) and preemption (:mod:`.preemption`); the Lightning
Trainer every training stage uses (:mod:`.trainer`, :mod:`.callbacks`, :mod:`.loggers`,
:mod:`.csv_log`); figures and tables (:mod:`.figures`, :mod:`.markdown`). It imports the layers
below it (model, config, data) and never a stage.
"""
