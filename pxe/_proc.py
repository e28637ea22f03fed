"""Helper processes started detached and stopped later by PID, possibly from another process.

A ``ProcRef`` is (pid, start time in clock ticks from ``/proc/PID/stat``): checking the start
time before signalling means a recycled PID is never killed by mistake. Must not signal
anything it did not start (no names, no process groups).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ProcRef:
    pid: int
    start_ticks: int

    def as_dict(self) -> dict[str, int]:
        return {"pid": self.pid, "start_ticks": self.start_ticks}

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> ProcRef:
        return cls(int(d["pid"]), int(d["start_ticks"]))


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start ticks) of ``pid``, or None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'
    rest = text[text.rindex(")") + 2 :].split()
    return rest[0], int(rest[19])


def ref_of(pid: int) -> ProcRef:
    st = _stat(pid)
    if st is None:
        raise ProcessLookupError(pid)
    return ProcRef(pid, st[1])


def alive(ref: ProcRef) -> bool:
    """The very process of ``ref`` exists and is not a zombie."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(ref.pid, os.WNOHANG)  # reap it if it is our child
    st = _stat(ref.pid)
    return st is not None and st[1] == ref.start_ticks and st[0] != "Z"


def spawn_detached(
    cmd: Sequence[str], *, log_path: Path, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own session (it outlives the CLI that started it)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        return subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=cwd)  # fmt: skip


def wait_gone(ref: ProcRef, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while alive(ref):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def stop(ref: ProcRef, *, timeout_s: float = 5.0, sig: int = signal.SIGTERM) -> None:
    """Signal ``ref`` (default SIGTERM), wait, then SIGKILL. Idempotent, PID-reuse safe."""
    if not alive(ref):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(ref.pid, sig)
    if wait_gone(ref, timeout_s):
        return
    log.warning("pid %d ignored signal %d for %.0f s: killing it", ref.pid, sig, timeout_s)
    with contextlib.suppress(ProcessLookupError):
        os.kill(ref.pid, signal.SIGKILL)
    wait_gone(ref, 5.0)
