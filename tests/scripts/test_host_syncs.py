"""scripts/bench_host_syncs.py: between logging steps a training step reads no tensor on the host."""

import sys

import pytest

from tests.helpers import SCRIPTS

sys.path.insert(0, str(SCRIPTS))
import bench_host_syncs


@pytest.mark.parametrize("task", ["pretrain", "finetune"])
def test_training_steps_read_nothing_on_the_host_between_logging_steps(task, tmp_path):
    """Pretraining and fine-tuning (which read the loss after every step for the progress bar
    until it took pretraining's way: the bar reads it when it refreshes)."""
    args = bench_host_syncs.parse_args(["--steps", "12", "--log-every", "4", "--task", task])
    result = bench_host_syncs.count(args, tmp_path / "run")
    plain = [b for b in result["per_batch"] if not b["logs"]]
    assert len(plain) >= 4
    assert result["reads_per_step_max"] == 0, plain
    assert result["reads_per_logging_step_median"] > 0  # the counter does see the logging reads
