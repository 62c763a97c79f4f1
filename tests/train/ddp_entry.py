"""``heatssl`` as a script that records which process rank writes which file (for the DDP tests).

Lightning's DDP launcher re-runs this same script for every extra rank, so each rank records its own
writes (checkpoints, pictures, the run config) into ``$HEATSSL_WRITES_DIR/rank<R>.log``. The real
functions still run: this only watches them.
"""

import functools
import os
import sys
from pathlib import Path

import torch

import heatssl.train.pictures
import heatssl.train.pretrain
from heatssl.cli import main
from heatssl.runs.trainer import AtomicCheckpointIO
from heatssl.train.pretrain_module import HeatPretrainModule


def _record(fn, path_arg: int):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        rank = os.environ.get("LOCAL_RANK", "0")
        log = Path(os.environ["HEATSSL_WRITES_DIR"]) / f"rank{rank}.log"
        with log.open("a") as f:
            f.write(f"{fn.__name__} {args[path_arg]}\n")
        return fn(*args, **kwargs)

    return wrapper


AtomicCheckpointIO.save_checkpoint = _record(AtomicCheckpointIO.save_checkpoint, 2)
heatssl.train.pictures.save_figure = _record(heatssl.train.pictures.save_figure, 1)
heatssl.train.pretrain.save_config = _record(heatssl.train.pretrain.save_config, 1)


def _dump_teacher(self) -> None:
    """Each rank's EMA teacher (and student backbone) at the end of training, for comparison."""
    rank = os.environ.get("LOCAL_RANK", "0")
    qbheat = self.qbheat
    state = {
        "teacher": {k: v.detach().clone() for k, v in qbheat.teacher.state_dict().items()},
        "student": {k: v.detach().clone() for k, v in qbheat.backbone.state_dict().items()},
    }
    torch.save(state, Path(os.environ["HEATSSL_WRITES_DIR"]) / f"teacher_rank{rank}.pt")


if os.environ.get("HEATSSL_DUMP_TEACHER"):
    HeatPretrainModule.on_train_end = _dump_teacher

if __name__ == "__main__":
    sys.exit(main())
