"""Run one child process and measure it: wall time, CPU time and peak RSS of that child.

Owns process spawning for the harness.  CPU and peak RSS come from ``os.wait4`` of the child,
so they cover the child and every descendant it reaped (all threads of a Go or Python
process), never the harness itself.  This module knows nothing about backup tools.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class ChildUsage:
    """Resources used by one finished child process."""

    returncode: int
    wall_s: float
    user_s: float
    sys_s: float
    peak_rss_mib: float
    timed_out: bool

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s


def run_measured(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    log_path: Path,
    timeout_s: float,
) -> ChildUsage:
    """Run ``argv`` to completion with stdout+stderr appended to ``log_path``.

    Raises ``FileNotFoundError`` when the program does not exist.  A child still running after
    ``timeout_s`` is killed (SIGKILL to its process group) and reported with ``timed_out``.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        log.write(("$ " + " ".join(argv) + "\n").encode())
        log.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        expired = threading.Event()

        def kill() -> None:
            expired.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout_s, kill)
        timer.start()
        try:
            # wait4 reaps the child itself (Popen.wait would lose the rusage).
            _pid, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall_s = time.perf_counter() - t0
        returncode = os.waitstatus_to_exitcode(status)
        proc.returncode = returncode  # already reaped: keep Popen from waiting again
        log.write(f"# exit {returncode}, wall {wall_s:.2f} s\n".encode())
    return ChildUsage(
        returncode=returncode,
        wall_s=wall_s,
        user_s=usage.ru_utime,
        sys_s=usage.ru_stime,
        # Linux reports ru_maxrss in KiB.
        peak_rss_mib=usage.ru_maxrss / 1024,
        timed_out=expired.is_set(),
    )


def run_quiet(
    argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], timeout_s: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run an unmeasured helper command (probe, stats) and capture its text output."""
    return subprocess.run(
        list(argv),
        cwd=cwd,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def dir_bytes(root: Path) -> tuple[int, int]:
    """Return (allocated bytes as ``du`` counts them, apparent bytes) of a directory tree.

    Hard-linked files are counted once, like ``du``.
    """
    seen: set[tuple[int, int]] = set()
    allocated = 0
    apparent = 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            allocated += st.st_blocks * 512
            apparent += st.st_size
    return allocated, apparent


def drop_caches() -> bool:
    """Write back dirty pages and drop the page cache; False when not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
    except OSError:
        return False
    return True
