"""The physics and the network, in pure torch and timm: no Lightning, no files.

Owns the quadrants of an image or grid (:mod:`.quadrants`), the heat operators, step rules and
predictors (:mod:`.heat`), the heat residual loss (:mod:`.heat_loss`), the one adapter to timm
(:mod:`.backbone`), the pixel decoder (:mod:`.decoder`), the QB-Heat objective (:mod:`.qbheat`),
its pixel loss (:mod:`.pixels`), EMA teacher (:mod:`.teacher`), two-quadrant term (:mod:`.pair`)
and uniformity term (:mod:`.uniformity`), the probe heads (:mod:`.heads`) and the optimisation
rules (:mod:`.optim`). It may import torch, timm and :mod:`heatssl.errors`, nothing else of heatssl:
every other layer builds on it.
"""
