"""Fixtures shared by every test folder (helpers to import live in tests/helpers.py)."""

import pytest

from tests.helpers import tiny_settings


@pytest.fixture
def tiny_overrides(tmp_path):
    """:func:`tests.helpers.tiny_settings` writing into the test's tmp_path."""
    return tiny_settings(tmp_path / "run")
