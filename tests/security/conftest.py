"""Hostile and careless input files, built by the tests themselves from one tiny real run."""

import pytest

from heatssl.config import load_config
from heatssl.runs.exports import export_checkpoint
from heatssl.train.pretrain import pretrain
from tests.helpers import tiny_settings


@pytest.fixture(scope="package")
def real_run(tmp_path_factory):
    """A tiny pretraining run as `heatssl pretrain` writes it, and its backbone export."""
    folder = tmp_path_factory.mktemp("real_run")
    result = pretrain(load_config("demo", tiny_settings(folder / "run")))
    return result.last_checkpoint, export_checkpoint(result.last_checkpoint)
