"""The errors heatssl raises on purpose: one base class, so callers and the CLI catch them as one.

Every message names the bad value, what is allowed and the fix. The ``heatssl`` command prints the
message of any :class:`HeatSSLError` in one line and exits with its ``exit_code`` (2, or 3 for a run
stopped by a non-finite loss), never with a traceback.

Library classes (heat operators, the backbone adapter, the decoder) raise :class:`ArgumentError` in
their own words, naming their arguments (``image_size=50``). The config layer re-raises those as
:class:`ConfigError` with the config's ``section.key`` names (``data.image_size=50``): see
:func:`heatssl.config.config_keys`.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Mapping
from typing import Any


class HeatSSLError(Exception):
    """Base of every error heatssl raises on purpose; the CLI exits with ``exit_code``."""

    exit_code = 2
    label = "error"  # how the CLI introduces the message


class ArgumentError(HeatSSLError, ValueError):
    """A library argument that cannot be used; the message names it as ``argument=value``."""


class ConfigError(HeatSSLError, ValueError):
    """A config key or value that cannot be used; the message names it as ``section.key=value``."""


class BadImageError(HeatSSLError):
    """Image files that stop a run: ``data.on_bad_image=error``, or nothing readable at all."""


class UnreadableImageError(BadImageError):
    """One image file that cannot be decoded; the message names the file and the reason."""


class CheckpointError(HeatSSLError):
    """A file that cannot be used as a checkpoint, export or probe head, and why."""


class DiskFullError(HeatSSLError):
    """A checkpoint did not fit on its file system; the previous one is intact."""


class NonFiniteLossError(HeatSSLError):
    """The training loss became NaN or infinite; no weight was updated with it."""

    exit_code = 3
    label = "stopped"


class CollapseError(HeatSSLError):
    """The EMA teacher's features collapsed (every image gets the same target); training stopped."""

    exit_code = 3
    label = "stopped"


class HeatSSLWarning(UserWarning):
    """Something the user should know that does not stop the run (skipped files, a skipped map)."""


def rename_arguments(message: str, names: Mapping[str, str]) -> str:
    """``message`` with every ``argument=`` written as ``names[argument]=`` (whole words only)."""
    for argument, key in names.items():
        message = re.sub(rf"(?<![\w.]){re.escape(argument)}=", f"{key}=", message)
    return message


def check_choice(name: str, value: Any, literal: Any) -> None:
    """Raise :class:`ArgumentError` unless ``value`` is one of the ``Literal`` type's values."""
    allowed = typing.get_args(literal)
    if value not in allowed:
        raise ArgumentError(
            f"{name}={value!r} is not allowed. Allowed: {', '.join(map(repr, allowed))}."
        )
