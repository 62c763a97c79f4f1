"""The lowest versions of heatssl's core libraries that load untrusted files safely, checked at import.

pip enforces ``pyproject.toml``'s floors when it installs heatssl, but an environment can change
afterwards (another package pins an older torch). The floors are where reading a file stopped being
able to run code:

- torch 2.6 fixed CVE-2025-32434 (``torch.load(weights_only=True)`` ran code) and 2.10 fixed
  CVE-2026-24747 (its unpickler corrupted memory on crafted opcodes); PYSEC-2026-139 was reported
  against 2.10.0 with no fixed version named, so heatssl asks for 2.11;
- timm 1.0.16 to 1.0.25 loaded weight files with ``weights_only=False``; 1.0.26 loads them weights-only;
- Lightning 2.6 is the first whose ``Trainer.fit`` takes ``weights_only`` (heatssl resumes with it).
"""

from __future__ import annotations

import re
from importlib import metadata

FLOORS: dict[str, tuple[int, ...]] = {"torch": (2, 11), "timm": (1, 0, 26), "lightning": (2, 6)}
"""Package name -> lowest version heatssl runs with."""


def version_tuple(text: str) -> tuple[int, ...]:
    """``"2.14.1+cu130"`` -> ``(2, 14, 1)``: the leading release numbers of a version string."""
    match = re.match(r"\d+(\.\d+)*", text.strip())
    return tuple(int(p) for p in match.group(0).split(".")) if match else ()


def too_old(installed: dict[str, str | None]) -> list[str]:
    """``name version < floor`` for every package of ``installed`` below its floor (None: absent)."""
    found = []
    for name, floor in FLOORS.items():
        version = installed.get(name)
        if version is not None and version_tuple(version) < floor:
            found.append(f"{name} {version} < {'.'.join(map(str, floor))}")
    return found


def installed_versions() -> dict[str, str | None]:
    """The installed version of every package in :data:`FLOORS` (None where it is not installed)."""
    versions: dict[str, str | None] = {}
    for name in FLOORS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def check_versions(installed: dict[str, str | None] | None = None) -> None:
    """Raise ImportError naming every core library below its floor, and the command that fixes it."""
    old = too_old(installed if installed is not None else installed_versions())
    if old:
        pins = " ".join(f"'{n}>={'.'.join(map(str, f))}'" for n, f in FLOORS.items())
        raise ImportError(
            f"heatssl needs newer libraries: {'; '.join(old)}. Older versions can run code from "
            f"the checkpoint and weight files heatssl reads (see heatssl/requirements.py). Fix: "
            f"pip install -U {pins}"
        )
