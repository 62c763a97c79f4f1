"""Where a probed backbone looks, and what QB-Heat predicts: CAMs, figures and their runs.

Owns the exact CAM and the grad-cam methods (:mod:`.cam`), heat-map inputs from files or a data split
(:mod:`.inputs`), overlays and contact sheets (:mod:`.figures`) and the heat-map and reconstruction
runs (:mod:`.run`). It may import every layer below it (model, data, train, probing); only the CLI
imports it.
"""
