"""One training process per run folder: a lock file naming its holder, held by the kernel while it runs.

Two runs writing one folder (a job started twice, a resubmit while the first is still alive) would
overwrite each other's checkpoints. The process that trains claims ``RUN/run.lock`` with the
kernel's file lock (``lockf``: local disks, NFS with locking, Lustre mounted with ``flock``): the
claim is atomic, so of several starters exactly one wins, and it holds for as long as the process
lives, suspended or not, and ends with it however it ends. The file names the holder (pid, host,
start time, command, SLURM job) and a thread touches it every :data:`HEARTBEAT_S` seconds. A second
run is refused with the holder named while either the kernel says the lock is held or the file's
holder may be alive:

- on this host, while its pid exists (never taken by age: a stopped process is alive);
- on another host, while its heartbeat is younger than :data:`STALE_AFTER_S` (it cannot be asked);
- in this SLURM job, while it is the same start of the job (a requeue ends the earlier start).

``--force`` (``force=True``) runs anyway: it takes a left lock at once, and beside a live holder
it runs without the lock, saying so. Where the file system has no kernel locks, the lock file is
created exclusively (``O_EXCL``) and the rules above alone decide. Under several processes only
process 0 holds it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
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
        self._fd: int | None = None  # the file whose kernel lock this process holds
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
        if host == self._mine["host"] and isinstance(pid, int) and pid != os.getpid():
            # this host can be asked: alive (even stopped) means held, whatever the heartbeat
            return None if _alive(pid) else f"process {pid} no longer exists on this host"
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

    def _busy(self, holder: dict[str, Any]) -> RunFolderBusy:
        return RunFolderBusy(
            f"{self.path.parent} is in use by {_describe(holder)}: two runs in one folder would "
            f"overwrite each other's checkpoints. Wait for it to end, stop it, or use another "
            f"run_dir; if you are sure it is gone (its lock {self.path} is refreshed every "
            f"{self.heartbeat_s:.0f} s and counts as left after {self.stale_after_s / 60:.0f} "
            f"minutes on another host), pass --force."
        )

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RunFolderBusy` naming the holder and the way out."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # a lock released between our open and our claim: claim the new file
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.EACCES, errno.EAGAIN):  # a live process holds it
                    return self._beside_live_holder(self._read() or {})
                if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    return self._acquire_without_kernel_lock()
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            holder = self._read()
            if holder and (holder.get("pid"), holder.get("host")) != (
                self._mine["pid"],
                self._mine["host"],
            ):
                why = self.stale_reason(holder)
                if why is None and not self.force:
                    os.close(fd)
                    raise self._busy(holder) from None
                self.note = (
                    f"took over {self.path} from {_describe(holder)}: "
                    f"{why or 'forced with --force'}"
                )
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(self._mine).encode(), 0)
            os.fsync(fd)
            self._fd = fd
            self._start_heartbeat()
            return self
        raise RunFolderBusy(f"could not claim {self.path}: other processes keep taking it.")

    def _beside_live_holder(self, holder: dict[str, Any]) -> RunLock:
        """The kernel says another live process holds the lock: refuse, or (--force) run without."""
        if not self.force:
            raise self._busy(holder) from None
        self.note = (
            f"running without {self.path}, which {_describe(holder)} holds and is alive "
            f"(forced with --force: the two runs may overwrite each other's checkpoints)"
        )
        return self

    def _acquire_without_kernel_lock(self) -> RunLock:
        """File systems without kernel locks: an exclusive create, the rules above for a left one."""
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
                    raise self._busy(holder) from None
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
        self._start_heartbeat()
        return self

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="heatssl-run-lock", daemon=True)
        self._thread.start()

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
            self.path.unlink(missing_ok=True)  # while the kernel lock is still held
        if self._fd is not None:
            os.close(self._fd)  # releases the kernel lock
            self._fd = None

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
