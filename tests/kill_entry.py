"""``heatssl`` as a script that logs every training step and can hang at a given step (kill tests).

Each step appends ``<global step> <checksum of the batch's images>`` to ``$HEATSSL_STEP_LOG`` (flushed,
so the lines of a killed process survive). With ``$HEATSSL_HANG_AT_STEP=N`` the process writes
``$HEATSSL_STEP_LOG.hang`` when step N is about to start (so every checkpoint up to step N is on
disk) and sleeps until the test kills it. With ``$HEATSSL_SIGNAL_AT_STEP=N`` process 0 sends itself
SIGUSR1 as step N starts (``$HEATSSL_SIGNAL_TARGET=group``: to its whole process group, loader
workers included), as SLURM does before a time limit. With ``$HEATSSL_STEP_SLEEP=S`` every step
first writes its number to ``$HEATSSL_STEP_LOG.sleeping`` and sleeps S seconds (time for a test
to send a signal at a known point). Under several processes each writes its own
log, ``$HEATSSL_STEP_LOG.<rank>``. The real CLI and Trainer run; this only watches them.
"""

import os
import signal
import sys
import time
from pathlib import Path

import lightning as L

import heatssl.train.pretrain
from heatssl.cli import main


class StepLog(L.Callback):
    """Writes the step and a checksum of its images; hangs at ``$HEATSSL_HANG_AT_STEP``."""

    def __init__(self, path: Path, hang_at: int | None, signal_at: int | None = None) -> None:
        self.path, self.hang_at, self.signal_at = path, hang_at, signal_at

    def on_train_start(self, trainer, pl_module):
        if trainer.world_size > 1:
            self.path = self.path.with_name(f"{self.path.name}.rank{trainer.global_rank}")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.signal_at == trainer.global_step and trainer.is_global_zero:
            if os.environ.get("HEATSSL_SIGNAL_TARGET") == "group":
                os.killpg(os.getpgid(0), signal.SIGUSR1)
            else:
                os.kill(os.getpid(), signal.SIGUSR1)
        if self.hang_at is not None and trainer.global_step == self.hang_at:
            Path(f"{self.path}.hang").write_text(str(trainer.global_step))
            time.sleep(600)
        if os.environ.get("HEATSSL_STEP_SLEEP"):
            Path(f"{self.path}.sleeping").write_text(str(trainer.global_step))
            time.sleep(float(os.environ["HEATSSL_STEP_SLEEP"]))
        with self.path.open("a") as f:
            f.write(f"{trainer.global_step} {float(batch[0].double().sum()):.6f}\n")
        if os.environ.get("HEATSSL_IMAGE_LOG"):  # one checksum per image: which samples a rank saw
            sums = batch[0].double().sum(dim=(1, 2, 3)).tolist()
            with Path(f"{os.environ['HEATSSL_IMAGE_LOG']}.rank{trainer.global_rank}").open(
                "a"
            ) as f:
                f.write(" ".join(f"{x:.1f}" for x in sums) + "\n")


def _with_step_log(build_trainer):
    def wrapper(cfg, run_dir, resume_command, callbacks=None):
        hang = os.environ.get("HEATSSL_HANG_AT_STEP")
        at = os.environ.get("HEATSSL_SIGNAL_AT_STEP")
        log = StepLog(
            Path(os.environ["HEATSSL_STEP_LOG"]),
            int(hang) if hang else None,
            int(at) if at else None,
        )
        return build_trainer(cfg, run_dir, resume_command, [*(callbacks or []), log])

    return wrapper


heatssl.train.pretrain.build_trainer = _with_step_log(heatssl.train.pretrain.build_trainer)

if __name__ == "__main__":
    sys.exit(main())
