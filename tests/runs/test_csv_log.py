"""metrics.csv across a resume: earlier rows kept, rows after the resumed step replaced."""

import csv

from heatssl.config import load_config
from heatssl.runs.csv_log import ResumableCSVLogger
from heatssl.train import pretrain as run


def _rows(path):
    return list(csv.DictReader(path.open()))


def _log(folder, steps, key="loss"):
    logger = ResumableCSVLogger(save_dir=str(folder), name="", version="")
    for step in steps:
        logger.log_metrics({key: float(step)}, step=step)
    logger.save()


def test_rows_before_the_first_new_step_are_kept_and_later_ones_replaced(tmp_path):
    _log(tmp_path, range(10))  # the stopped run logged up to step 9; its checkpoint is at step 5
    _log(tmp_path, range(5, 8), key="val")  # the resumed run, with a new column
    rows = _rows(tmp_path / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(8))
    assert [r["loss"] for r in rows[:5]] == [f"{s:.1f}" for s in range(5)]
    assert all(r["loss"] == "" and r["val"] != "" for r in rows[5:])


def test_a_fresh_run_in_the_same_folder_replaces_the_file(tmp_path):
    _log(tmp_path, range(10), key="old")
    _log(tmp_path, range(3))
    rows = _rows(tmp_path / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [0, 1, 2] and "old" not in rows[0]


def test_a_resumed_pretraining_keeps_the_loss_curve_of_its_first_part(tiny_overrides):
    first = run.pretrain(load_config("demo", tiny_overrides))
    before = [r for r in _rows(first.run_dir / "metrics.csv") if r.get("train/loss")]
    assert before, "the first part logged no loss"
    resumed = run.pretrain(
        load_config("demo", [*tiny_overrides, "trainer.max_epochs=2"]), resume="last"
    )
    after = [r for r in _rows(resumed.run_dir / "metrics.csv") if r.get("train/loss")]
    steps = [int(r["step"]) for r in after]
    assert after[: len(before)] == before  # Lightning's logger deleted these on resume
    assert steps == sorted(steps) and steps[-1] >= first.global_step
