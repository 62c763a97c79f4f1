"""Full fine-tuning of a (pretrained or random-init) backbone, one of the four stages.

Owns the run (:mod:`.finetune`), the family recipes and the rule that picks one (:mod:`.recipe`),
the labelled loaders with timm's RandAugment pipeline (:mod:`.data`), the LightningModule (AdamW with
layer-wise lr decay, mixup / cutmix, label smoothing, random erasing on the device, optional EMA:
:mod:`.classifier`) and the metrics table and confusion picture (:mod:`.report`). The start comes
from :mod:`heatssl.runs.sources`; it imports no other stage.
"""
