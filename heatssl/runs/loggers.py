"""The loggers of a run (``trainer.logger``): CSV that survives a resume, TensorBoard, Weights & Biases.

W&B without a login logs offline into the run folder rather than stopping at wandb's prompt, and a
W&B run that heatssl started is ended when the fit ends.
"""

from __future__ import annotations

import importlib.util
import netrc
import os
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from heatssl.config import Config
from heatssl.errors import ConfigError
from heatssl.runs.csv_log import ResumableCSVLogger


class RunWandbLogger(WandbLogger):
    """Lightning's WandbLogger that ends the wandb run it started when the fit ends.

    Lightning leaves the run open until the process exits: it would show as running after the
    fit, and a second pretraining in the same process would log into it. A run that was already
    active when the logger was made (the caller's, which Lightning logs into) is left open.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        import wandb

        self._ends_run = wandb.run is None  # otherwise Lightning logs into the caller's run

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        if self._ends_run and self._experiment is not None:
            self._experiment.finish(exit_code=0 if status == "success" else 1)


def _wandb_logged_in() -> bool:
    """Whether wandb finds an API key without asking: $WANDB_API_KEY (or an identity token
    file), or a .netrc entry for $WANDB_BASE_URL's host (``wandb login`` writes one)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    host = base.split("://", 1)[-1].split("/", 1)[0]
    paths = [os.environ["NETRC"]] if os.environ.get("NETRC") else ["~/.netrc", "~/_netrc"]
    for path in (Path(p).expanduser() for p in paths):
        if path.is_file():
            try:
                return netrc.netrc(path).authenticators(host) is not None
            except (netrc.NetrcParseError, OSError):
                return False
    return False


def _wandb_logger(cfg: Config, run_dir: Path) -> WandbLogger:
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            'trainer.logger=wandb needs the wandb package: `pip install -e ".[wandb]"` (or '
            "`pip install wandb`), or use trainer.logger=csv (the default)."
        )
    extra: dict[str, Any] = {}
    if not os.environ.get("WANDB_MODE") and not _wandb_logged_in():
        extra["mode"] = "offline"  # rather than wandb's login prompt (or its error without a tty)
        if rank_zero_only.rank == 0:
            print(
                "heatssl: trainer.logger=wandb without a W&B login (no WANDB_API_KEY, no "
                "~/.netrc entry) and no WANDB_MODE: logging offline into "
                f"{run_dir / 'wandb'} (`wandb sync` uploads it later)",
                file=sys.stderr,
            )
    project = cfg.trainer.wandb_project or os.environ.get("WANDB_PROJECT") or "heatssl"
    name = Path(run_dir).resolve().name
    return RunWandbLogger(save_dir=str(run_dir), project=project, name=name, **extra)


def run_logger(cfg: Config, run_dir: Path) -> Logger | bool:
    """The logger ``trainer.logger`` names, writing into ``run_dir`` (False: none)."""
    kind = cfg.trainer.logger
    if kind == "none":
        return False
    if kind == "wandb":
        return _wandb_logger(cfg, run_dir)
    if kind == "tensorboard":
        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError(
                "trainer.logger=tensorboard needs the tensorboard package: `pip install tensorboard`, "
                "or use trainer.logger=csv (the default)."
            )
        return TensorBoardLogger(save_dir=str(run_dir), name="", version="tensorboard")
    return ResumableCSVLogger(save_dir=str(run_dir), name="", version="")
