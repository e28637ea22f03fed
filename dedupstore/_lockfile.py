"""Exclusive, non-blocking flocks that name their holder (repository writer, overlays)."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from .errors import Locked


def take_flock(path: Path, *, purpose: str, busy: str) -> int:
    """Lock `path` (created if needed) or raise Locked("<busy> (<holder>)").

    The holder writes "<purpose> by pid N since HH:MM:SS" into the file so the next one can
    say who has it. Returns the fd; closing it releases the lock.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise Locked(f"{busy} ({holder})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{purpose} by pid {os.getpid()} since {time.strftime('%H:%M:%S')}\n".encode(), 0)
    return fd
