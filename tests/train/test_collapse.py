"""Tests for heatssl.train.collapse: a collapsed EMA teacher stops the run, a healthy one does not."""

from __future__ import annotations

import csv

import pytest
import torch

from heatssl.cli import main
from heatssl.errors import CollapseError
from heatssl.model.teacher import EmaTeacher
from heatssl.train.collapse import CollapseWatch
from tests.helpers import tiny_settings


def test_low_reads_in_a_row_stop_and_a_healthy_read_resets_the_count():
    watch = CollapseWatch(0.01, patience=3)
    for step, spread in enumerate([0.5, 0.001, 0.002, 0.3, 0.001, 0.0]):
        watch.note(spread, step)  # never three low reads in a row
    with pytest.raises(CollapseError, match=r"stayed below loss.collapse_spread=0.01 .* step 4"):
        watch.note(0.005, 6)


def test_threshold_zero_turns_the_check_off():
    watch = CollapseWatch(0.0, patience=1)
    for step in range(5):
        watch.note(0.0, step)


def _collapse_on_update(monkeypatch):
    """Every EMA update leaves a teacher whose weights are all zero: constant features."""
    real = EmaTeacher.update

    def collapsed(self, backbone, project, momentum):
        real(self, backbone, project, momentum)
        with torch.no_grad():
            for p in self.parameters():
                p.zero_()

    monkeypatch.setattr(EmaTeacher, "update", collapsed)


def test_a_tiny_run_whose_teacher_collapses_stops_with_a_named_error(tmp_path, monkeypatch, capsys):
    _collapse_on_update(monkeypatch)
    settings = [*tiny_settings(tmp_path / "run"), "loss.target=teacher", "trainer.max_epochs=2"]
    assert main(["pretrain", "-c", "demo", *settings]) == 3  # 6 steps: healthy at the first only
    err = capsys.readouterr().err
    assert "the EMA teacher collapsed" in err and "loss.collapse_spread=0 turns" in err


@pytest.mark.parametrize("backbone", ["test_resnet", "test_vit"])
def test_a_healthy_tiny_run_is_not_called_collapsed(tmp_path, backbone):
    settings = [*tiny_settings(tmp_path / "run"), "loss.target=both", f"model.backbone={backbone}"]
    if backbone == "test_vit":
        settings += ["model.output_stride=null", "model.kwargs.patch_size=4"]
    assert main(["pretrain", "-c", "demo", *settings]) == 0
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    spread = [float(r["train/teacher_spread"]) for r in rows if r.get("train/teacher_spread")]
    assert len(spread) >= 3 and min(spread) > 0.01  # the default threshold, with room


def test_the_check_can_be_turned_off(tmp_path, monkeypatch):
    _collapse_on_update(monkeypatch)
    settings = [*tiny_settings(tmp_path / "run"), "loss.target=teacher", "loss.collapse_spread=0"]
    settings += ["trainer.max_epochs=2"]
    assert main(["pretrain", "-c", "demo", *settings]) == 0
