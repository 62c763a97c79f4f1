"""Images in, batches out: reading files, transforms, datasets, the epoch order and the data module.

Owns reading one image file into RGB (:mod:`.images`), the SSL and evaluation transforms and the
normalisation (:mod:`.transforms`), the datasets and unreadable-file skipping (:mod:`.datasets`), the
seeded, resumable epoch order (:mod:`.sampler`), class-balanced label subsets (:mod:`.labels`), an
image folder's file list scanned once (:mod:`.file_index`), the Lightning data module
(:mod:`.datamodule`), files read ahead for a GPU decoder (:mod:`.encoded`) and the DALI loader
(:mod:`.dali`), and the loader benchmark (:mod:`.throughput`). It may
import :mod:`heatssl.errors` and :mod:`heatssl.config` (its ``data`` section), never the model or
anything above it.
"""
