"""Shared by the benchmark scripts: the machine a JSON's figures come from, and how busy it was.

- :func:`machine`: versions, threads, CPUs and load (every benchmark JSON's ``machine`` entry).
- :func:`provenance`: the command, date and commit a benchmark JSON's figures come from.
- :class:`CpuLoad`: the share of CPU time other processes used while a benchmark ran.
- :func:`wait_with_rusage` and :func:`peak_rss_gib`: a child's or this process's own peak memory.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import timm
import torch
from tables import command_and_date


def provenance(script: str, argv: list[str] | None = None) -> dict[str, str]:
    """The command that ran ``script`` (``argv``, else this process's), the date and the commit."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    return {
        **command_and_date(script, argv),
        "heatssl_commit": f"{commit.strip()} (with the working tree's changes, if any)",
    }


def machine(requested_threads: int | None = None) -> dict[str, Any]:
    """Versions, threads, CPUs, GPU and load: what the numbers depend on."""
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "torch_threads": torch.get_num_threads(),
        "requested_threads": requested_threads,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "cpu_model": cpu_model,
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg_start": list(os.getloadavg()),
    }


class CpuLoad:
    """CPU time other processes used while we ran: the noise in the numbers (Linux /proc/stat)."""

    def __init__(self) -> None:
        self.start = self._snap()

    @staticmethod
    def _snap() -> tuple[int, int, float] | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        except (OSError, ValueError):
            return None
        own = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):  # this process + waited kids
            ru = resource.getrusage(who)
            own += (ru.ru_utime + ru.ru_stime) * os.sysconf("SC_CLK_TCK")
        return sum(fields), fields[3] + fields[4], own

    def foreign_fraction(self) -> float | None:
        """Share of all CPU time since creation that other processes used (0 = quiet machine)."""
        end = self._snap()
        if self.start is None or end is None or end[0] == self.start[0]:
            return None
        total = end[0] - self.start[0]
        busy = total - (end[1] - self.start[1])
        return max(0.0, (busy - (end[2] - self.start[2])) / total)


def wait_with_rusage(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, Any, bool]:
    """Reap ``proc`` with ``os.wait4`` (its own rusage); kill it after ``timeout`` seconds.

    ``getrusage(RUSAGE_CHILDREN)`` would mix in earlier children (importing torch already starts
    one of ~450 MiB), so the peak RSS is read from this child's own ``wait4`` rusage.
    """
    deadline = time.perf_counter() + timeout
    timed_out = False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            _, status, usage = os.wait4(proc.pid, 0)
            timed_out = True
            break
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage, timed_out


def peak_rss_gib() -> float:
    """This process's peak resident memory (VmHWM: its own, not inherited like ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def run_child(code: str, spec: dict[str, Any], src: Path, timeout: float = 1800) -> dict[str, Any]:
    """Run ``code`` in a fresh Python importing heatssl from ``src``, with ``spec`` as JSON in
    ``sys.argv[1]``; its last ``RESULT {json}`` line, parsed (a failure raises with its stderr)."""
    env = {**os.environ, "PYTHONPATH": str(src), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec)],
        env=env,
        cwd=src,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))
