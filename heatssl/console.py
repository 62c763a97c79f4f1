"""What the ``heatssl`` command prints: heatssl's own lines, without the libraries' chatter, and
numbers (times, sizes) as people say them.

Lightning announces on every run which accelerators exist, a tip for another logging product, and
the batch-count estimate it makes; it warns that a run folder heatssl itself just created "exists and
is not empty", and its internals raise a deprecation warning of torch's. None of it asks anything of
the user. :func:`quiet_libraries` drops exactly those messages (matched by their text), so any other
warning still shows; :func:`one_line_warnings` prints heatssl's own warnings as one line each,
without the source line Python's default format appends. Only the CLI installs them: a library
caller keeps the libraries' default behaviour.
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any

from heatssl.errors import HeatSSLWarning

# Lightning's info lines that describe nothing about this run, by their start.
_NOISE = re.compile(
    r"(GPU available|TPU available|HPU available|IPU available|💡 Tip|"
    r"`Trainer\(limit_train_batches=1.0\)` was configured|"
    r"Loading `train_dataloader` to estimate number of stepping batches|"
    r"`Trainer.fit` stopped: )"  # heatssl prints its own end line
)
_LIGHTNING_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)
# Warnings that are wrong or empty for heatssl's runs, by their text.
_SPURIOUS = (
    r"Experiment logs directory .* exists and is not empty",  # heatssl wrote config.yaml there
    r"Checkpoint directory .* exists and is not empty",  # a resumed run's own checkpoints
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # inside Lightning, nothing to act on
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _NOISE.match(record.getMessage().lstrip())


def quiet_libraries() -> None:
    """Drop Lightning's announcements and the spurious warnings listed above (idempotent)."""
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())
    for pattern in _SPURIOUS:
        warnings.filterwarnings("ignore", message=pattern)


def one_line_warnings() -> None:
    """Format :class:`HeatSSLWarning` as ``heatssl: warning: ...``; others as Python would.

    Only the format changes (``warnings.formatwarning``), so code that records warnings
    (``warnings.catch_warnings(record=True)``, ``pytest.warns``) still sees them.
    """
    default = warnings.formatwarning
    if getattr(default, "_heatssl", False):
        return

    def one_line(
        message: Any, category: type[Warning], filename: str, lineno: int, line: str | None = None
    ) -> str:
        if issubclass(category, HeatSSLWarning):
            return f"heatssl: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    one_line._heatssl = True  # type: ignore[attr-defined]
    warnings.formatwarning = one_line


def duration(seconds: float) -> str:
    """A time as people say it: ``42 s``, ``12 min``, ``3.5 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def byte_size(n: int | None) -> str:
    """A size in bytes as people say it: ``3.2 kB``, ``39.3 GB`` (``?`` when unknown)."""
    if n is None:
        return "?"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e3:.1f} kB"
