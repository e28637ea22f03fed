"""Reader leases: which processes are reading a repository, so GC and repair spare them.

Owns `REPO/readers/`. Every read-only `Repository` holds one lease file there,
`<pid>-<start ns>-<random>.lock`, flock-held (exclusively) for as long as it is open and
holding JSON {pid, command, points}. The flock is released by the kernel when the process
dies, so a lease is live exactly while its lock is held: `live_readers` removes the files
of dead readers as it goes. The start time in the name is what GC needs (a reader can only
have seen points that existed after it started), so a lease whose JSON is being rewritten
still counts.

A lease file appears only once it is locked (written under a temporary name, locked, then
renamed), so a scanner never mistakes a new lease for a stale one. Must not: block (every
lock here is non-blocking) or fail a read because the lease could not be taken (a
read-only medium holds no lease; that is logged at INFO).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

READERS_DIR = "readers"


@dataclass(frozen=True, slots=True)
class ReaderInfo:
    """A live reader of the repository, as `live_readers` found it."""

    pid: int
    command: str
    started_ns: int
    points: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return f"PID {self.pid} ({self.command or '?'})"


def _command() -> str:
    try:
        raw = Path("/proc/self/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:200]


class ReaderLease:
    """One held lease. `release()` (idempotent) ends it; so does the process's death."""

    def __init__(self, path: Path, fd: int, started_ns: int) -> None:
        self.path = path
        self._fd = fd
        self.started_ns = started_ns
        self._points: list[str] = []
        self._command = _command()
        self._lock = threading.Lock()  # resolve() may run on several threads

    @classmethod
    def take(cls, root: Path) -> ReaderLease | None:
        """Take a lease on the repository at `root`; None when the directory is not writable."""
        d = root / READERS_DIR
        now = time.time_ns()
        name = f"{os.getpid()}-{now}-{secrets.token_hex(4)}.lock"
        tmp = d / f".{name}.tmp"
        try:
            d.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            log.info("no reader lease in %s (%s): gc will not know about this reader", d, exc)
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            lease = cls(d / name, fd, now)
            lease._write()
            os.rename(tmp, lease.path)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            log.info("no reader lease in %s (%s)", d, exc)
            return None
        return lease

    def _write(self) -> None:
        body = json.dumps(
            {"pid": os.getpid(), "command": self._command, "points": self._points}
        ).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, body, 0)

    def add_point(self, name: str) -> None:
        """Name a point this reader reads (shown by `live_readers`; GC keeps it)."""
        with self._lock:
            if self._fd < 0 or name in self._points:
                return
            self._points.append(name)
            with contextlib.suppress(OSError):
                self._write()

    def release(self) -> None:
        with self._lock:
            if self._fd < 0:
                return
            # unlink first: a scanner locking the file after our close finds no path to remove
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(self._fd)
            self._fd = -1


def live_readers(root: Path) -> list[ReaderInfo]:
    """Readers holding a lease on the repository at `root`; removes leases of dead ones.

    A lease taken by this very process counts too (flock locks belong to the open file, not
    the process). Never blocks.
    """
    d = Path(root) / READERS_DIR
    out: list[ReaderInfo] = []
    try:
        paths = sorted(d.glob("*.lock"))
    except OSError:
        return out
    with contextlib.suppress(OSError):
        for tmp in d.glob(".*.tmp"):  # a taker that died between create and rename
            _remove_if_unlocked(tmp)
    for path in paths:
        try:
            pid_s, start_s, _rand = path.stem.split("-", 2)
            pid, started = int(pid_s), int(start_s)
        except ValueError:
            continue  # not a lease of ours
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # released meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                out.append(_read_lease(fd, pid, started))
                continue
            log.info("removing the lease of reader PID %d, which is gone", pid)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        finally:
            os.close(fd)
    return out


def _remove_if_unlocked(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path.unlink()
    except OSError:
        pass  # held (being taken right now) or gone
    finally:
        os.close(fd)


def _read_lease(fd: int, pid: int, started_ns: int) -> ReaderInfo:
    try:
        obj = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
    except (OSError, ValueError):
        obj = {}  # being rewritten: the name still says who and since when
    if not isinstance(obj, dict):
        obj = {}
    points = obj.get("points")
    return ReaderInfo(
        pid,
        str(obj.get("command", "")),
        started_ns,
        [str(p) for p in points] if isinstance(points, list) else [],
    )
