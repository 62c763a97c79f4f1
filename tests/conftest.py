"""Fixtures shared by every test folder (helpers to import live in tests/helpers.py)."""

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # two test processes share the two cores: a thread each
    torch.set_num_threads(1)

pytest.register_assert_rewrite("tests.data.checks")  # its asserts report like a test's own

from tests.helpers import tiny_settings  # noqa: E402


@pytest.fixture
def tiny_overrides(tmp_path):
    """:func:`tests.helpers.tiny_settings` writing into the test's tmp_path."""
    return tiny_settings(tmp_path / "run")
