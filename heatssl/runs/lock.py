"""One training process per run folder: a lock file naming its holder, refreshed while it runs.

Two runs writing one folder (a job started twice, a resubmit while the first is still alive) would
overwrite each other's checkpoints. ``heatssl pretrain`` therefore creates ``RUN/run.lock``
exclusively (``O_CREAT | O_EXCL``, atomic on local disks and NFS) holding the pid, host, start time
and command of the process that trains, and a thread touches it every :data:`HEARTBEAT_S` seconds.
A second run is refused with the holder named, unless:

- the lock is stale: its process is gone (same host: the pid no longer exists), it was held by an
  earlier start of this same SLURM job (a requeue: SLURM ends a job before it starts it again), or
  its heartbeat is older than :data:`STALE_AFTER_S` (another host, which cannot be asked; a node
  that crashed);
- ``--force`` (``force=True``) says take it over anyway.

The lock is removed when the run ends, however it ends, except by SIGKILL or a crashed node: that is
what the stale checks are for. Under several processes only process 0 holds it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from heatssl.errors import HeatSSLError

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
"""Seconds between two touches of the lock file by the process holding it."""
STALE_AFTER_S = 300.0
"""A lock from another host whose heartbeat is older than this is taken to be left behind."""


class RunFolderBusy(HeatSSLError):
    """Another live process trains in this run folder."""


def _alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(holder: dict[str, Any]) -> str:
    return (
        f"process {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
        f"{holder.get('started', '?')} ({holder.get('command', '?')})"
    )


class RunLock:
    """The lock of one run folder; use as a context manager around the run.

    Args:
        run_dir: The run folder (created if missing).
        force: Take the lock over even when a live process holds it.
        heartbeat_s: Seconds between two refreshes of the file's modification time.
        stale_after_s: Age of a heartbeat from another host after which the lock counts as left.
    """

    def __init__(
        self,
        run_dir: str | Path,
        force: bool = False,
        heartbeat_s: float = HEARTBEAT_S,
        stale_after_s: float = STALE_AFTER_S,
    ) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.force = force
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.note: str | None = None  # what happened to a previous lock, for the user
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mine = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300],
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0"),
        }

    def _read(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            holder = {}  # unreadable: half written by a process that died, or not ours
        return holder if isinstance(holder, dict) else {}

    def stale_reason(self, holder: dict[str, Any]) -> str | None:
        """Why the lock ``holder`` describes is left behind, or ``None`` if it may be live."""
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "it is gone"
        pid, host = holder.get("pid"), holder.get("host")
        if host == self._mine["host"] and isinstance(pid, int) and not _alive(pid):
            return f"process {pid} no longer exists on this host"
        job = self._mine["slurm_job"]
        if (
            job
            and holder.get("slurm_job") == job
            and (holder.get("slurm_restart") != self._mine["slurm_restart"])
        ):
            return f"it was held by an earlier start of SLURM job {job}, which SLURM ended"
        if age > self.stale_after_s:
            return f"its heartbeat is {age / 60:.0f} minutes old"
        return None

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RunFolderBusy` naming the holder and the way out."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps(self._mine)
        for _ in range(3):  # a race with another starter: try again with what it wrote
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:
                    continue  # released meanwhile
                why = self.stale_reason(holder)
                if why is None and not self.force:
                    raise RunFolderBusy(
                        f"{self.path.parent} is in use by {_describe(holder)}: two runs in one "
                        f"folder would overwrite each other's checkpoints. Wait for it to end, "
                        f"stop it, or use another run_dir; if you are sure it is gone (its lock "
                        f"{self.path} is refreshed every {self.heartbeat_s:.0f} s and counts as "
                        f"left after {self.stale_after_s / 60:.0f} minutes), pass --force."
                    ) from None
                self.note = (
                    f"took over {self.path} from {_describe(holder)}: "
                    f"{why or 'forced with --force'}"
                )
                tmp = self.path.with_name(f".{LOCK_NAME}.{os.getpid()}.tmp")
                tmp.write_text(payload)
                os.replace(tmp, self.path)
                break
            else:
                with os.fdopen(fd, "w") as f:
                    f.write(payload)
                break
        else:
            raise RunFolderBusy(f"could not create {self.path}: another process keeps taking it.")
        self._thread = threading.Thread(target=self._beat, name="heatssl-run-lock", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            # removed by hand or taken with --force elsewhere: release() checks ownership
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still this process's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        holder = self._read()
        if (
            holder
            and holder.get("pid") == self._mine["pid"]
            and (holder.get("host") == self._mine["host"])
        ):
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def holding_run_lock(run_dir: str | Path, take: bool, force: bool = False) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the block when ``take`` (the process that writes: DDP rank 0),
    printing what happened to a lock it took over; other processes run the block unlocked."""
    if not take:
        yield
        return
    with RunLock(run_dir, force=force) as lock:
        if lock.note:
            print(f"heatssl: {lock.note}", file=sys.stderr)
        yield
