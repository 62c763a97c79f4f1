"""Dependency floors: versions that load weight files weights-only, in pyproject and at import."""

import re
import subprocess
import sys

import pytest

from heatssl.requirements import FLOORS, check_versions, too_old, version_tuple
from tests.helpers import ROOT


def _floor(requirement: str) -> tuple[int, ...]:
    return version_tuple(requirement.removeprefix(">="))


def test_pyproject_asks_for_the_safe_floors():
    """timm 1.0.12 (then allowed) cannot import heatssl, 1.0.16-1.0.25 load weights with
    weights_only=False; torch before 2.6 had CVE-2025-32434, before 2.10 CVE-2026-24747."""
    text = (ROOT / "pyproject.toml").read_text()
    pins = dict(re.findall(r'^\s*"([a-z-]+)(>=[\d.]+)",', text, flags=re.M))
    for name, floor in FLOORS.items():
        assert _floor(pins[name]) >= floor, pins[name]
    assert _floor(pins["torchvision"]) >= (0, FLOORS["torch"][1] + 15)  # torchvision 0.26 ~ 2.11


@pytest.mark.parametrize(
    ("name", "version"), [("torch", "2.5.1"), ("timm", "1.0.20"), ("lightning", "2.5.5")]
)
def test_an_old_library_stops_the_import_with_the_fix(name, version):
    installed = {"torch": "2.14.1+cu130", "timm": "1.0.31", "lightning": "2.6.6", name: version}
    assert too_old(installed) == [f"{name} {version} < {'.'.join(map(str, FLOORS[name]))}"]
    with pytest.raises(ImportError, match=rf"{name} {re.escape(version)} <.*pip install -U"):
        check_versions(installed)
    check_versions({"torch": "2.11.0", "timm": "1.0.26", "lightning": "2.6.0"})  # the floors pass


def test_importing_heatssl_checks_the_installed_versions():
    code = (
        "import importlib.metadata as m\n"
        "real = m.version\n"
        "m.version = lambda n: '1.0.20' if n == 'timm' else real(n)\n"
        "import heatssl\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode != 0 and "timm 1.0.20 < 1.0.26" in out.stderr
