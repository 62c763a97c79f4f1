"""Pickled checkpoints: a refusal names the global they need; an opt-in says what it unpickles."""

import pytest
import torch

from heatssl.cli import main
from heatssl.errors import CheckpointError
from heatssl.runs.checkpoints import safe_torch_load, trusted_checkpoints


class Boom:
    def __reduce__(self):
        import os

        return (os.system, ("true",))


def test_a_refusal_quotes_the_global_torch_names(tmp_path):
    """torch 2.14 says ``GLOBAL posix.system``; the old pattern dropped it."""
    path = tmp_path / "evil.ckpt"
    torch.save({"x": Boom()}, path)
    with pytest.raises(CheckpointError, match=r"it needs posix\.system"):
        safe_torch_load(path)


def test_trust_checkpoint_says_what_it_unpickles_before_it_does(tmp_path, capsys):
    path = tmp_path / "needs_pickle.ckpt"
    torch.save({"x": Boom()}, path)
    with trusted_checkpoints():
        safe_torch_load(path)
    err = capsys.readouterr().err
    assert f"unpickling {path}" in err and "posix.system" in err


def test_the_cli_names_the_global_in_one_line(tmp_path, capsys):
    path = tmp_path / "evil.ckpt"
    torch.save({"x": Boom()}, path)
    assert main(["export", str(path)]) == 2
    err = capsys.readouterr().err
    assert "posix.system" in err and "--trust-checkpoint" in err and len(err.splitlines()) == 1
