"""Where a probed backbone looks, and what QB-Heat predicts: one of the four stages.

Owns the exact CAM and the grad-cam methods (:mod:`.cam`), heat-map inputs from files or a data split
(:mod:`.inputs`), overlays and contact sheets (:mod:`.overlays`) and the heat-map and reconstruction
runs (:mod:`.maps`). Backbones, heads and the reconstruction sheet come from :mod:`heatssl.runs`; it
imports no other stage.
"""
