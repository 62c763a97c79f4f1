"""Full fine-tuning of a (pretrained or random-init) backbone with timm's recipe parts.

:mod:`.data` builds the labelled loaders (timm's RandAugment pipeline, uint8 over the wire),
:mod:`.module` the Lightning module (AdamW with layer-wise lr decay, mixup / cutmix, label
smoothing, random erasing on the device, optional EMA), :mod:`.run` the whole run with its
metrics, confusion matrix and timm-folder export.
"""
