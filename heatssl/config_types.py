"""Typed merging of YAML values into config dataclasses: the key must exist, the value must fit.

Used by :mod:`heatssl.config` only. A value is coerced to its field's annotation (``int``, ``float``,
``bool``, ``str``, ``Literal``, ``list``, ``tuple``, ``dict``, unions and ``None``) or refused with a
:class:`~heatssl.errors.ConfigError` that names the dotted key, the value and what is allowed; an
unknown key names the closest valid one, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal

import yaml

from heatssl.errors import ConfigError

MAX_VALUES = 100_000
"""Values (leaves and containers) a config may hold: far above any recipe, far below exhaustion."""
MAX_DEPTH = 32
"""Levels of nesting a config may have."""


class _NoAliasLoader(yaml.SafeLoader):
    """YAML's safe loader without aliases (``*name``): a few nested aliases expand to gigabytes."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None,
                None,
                f"found the alias *{event.anchor}: YAML aliases are not allowed in heatssl configs "
                f"(a few nested ones expand to gigabytes); write the value out",
                event.start_mark,
            )
        return super().compose_node(parent, index)


def load_yaml(text: str) -> Any:
    """``text`` parsed as YAML with the safe loader, refusing aliases (see :class:`_NoAliasLoader`)."""
    return yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader: builds plain values only


def check_bounded(data: Any, where: str) -> None:
    """Refuse a structure of over :data:`MAX_VALUES` values or :data:`MAX_DEPTH` levels before
    anything copies it: shared references (a pickle's, YAML's) would expand on the first copy."""
    count = 0
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > MAX_VALUES or depth > MAX_DEPTH:
            what = (
                f"over {MAX_VALUES:,} values" if count > MAX_VALUES else f"over {MAX_DEPTH} levels"
            )
            raise ConfigError(
                f"{where} is too large or too deep for a config ({what}); a recipe holds a few "
                f"hundred values. The file was built to exhaust memory, or is not a config."
            )
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
            stack.extend((k, depth + 1) for k in value)
        elif isinstance(value, list | tuple):
            stack.extend((v, depth + 1) for v in value)


def plain(value: Any) -> Any:
    """``value`` with tuples turned into lists, recursively (YAML- and checkpoint-safe builtins)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _suggest(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"{hint} Allowed keys: {', '.join(sorted(allowed))}."


def _type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "null"
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(annotation)))
    return getattr(annotation, "__name__", str(annotation))


def check_type(path: str, value: Any, annotation: Any) -> Any:
    """Return ``value`` coerced to ``annotation`` or raise ConfigError naming what is allowed."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            try:
                return check_type(path, value, arm)
            except ConfigError:
                continue
        allowed = " or ".join(_type_name(a) for a in args)
        raise ConfigError(f"{path}={value!r} has the wrong type: expected {allowed}.")
    if annotation is type(None):
        if value is None:
            return None
        raise ConfigError(f"{path}={value!r}: expected null.")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(
            f"{path}={value!r} is not allowed. Allowed values: {', '.join(map(repr, args))}."
        )
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}={value!r}: expected a list, e.g. [a, b].")
        return [check_type(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{path}={value!r}: expected a list of {len(args)} numbers.")
        pairs = enumerate(zip(value, args, strict=True))
        return tuple(check_type(f"{path}[{i}]", v, a) for i, (v, a) in pairs)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}={value!r}: expected a mapping (key: value).")
        return dict(value)
    return _check_scalar(path, value, annotation)


def _check_scalar(path: str, value: Any, annotation: Any) -> Any:
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}={value!r}: expected true or false.")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}={value!r}: expected an integer.")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}={value!r}: expected a number.")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}={value!r}: expected a string.")
    raise ConfigError(f"{path}: unsupported config type {annotation!r}.")  # pragma: no cover


def merge(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    """Write ``updates`` into dataclass ``obj`` in place, checking every key and type."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    if not isinstance(updates, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping, got {updates!r}.")
    for key, value in updates.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"Unknown config key '{path}'.{_suggest(key, names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            merge(current, value, prefix=f"{path}.")
        else:
            setattr(obj, key, check_type(path, value, hints[key]))


def parse_override(text: str) -> dict[str, Any]:
    """``a.b=value`` as the nested mapping ``{"a": {"b": value}}`` (the value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(
            f"Override '{text}' is not of the form key=value (for example trainer.max_epochs=5)."
        )
    key, raw = text.split("=", 1)
    try:
        out: Any = load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(
            f"Override '{text}': its value is not valid YAML ({problem}). Quote it, e.g. "
            f"'{key}=\"...\"', or write a list as [a, b]."
        ) from err
    check_bounded(out, f"Override '{key}'")
    for part in reversed(key.strip().split(".")):
        out = {part: out}
    return out
