"""Session directories and their state files: `<repo>/sessions/<name>/`.

Owns the layout of one recovery session on disk and the rules for reading it back:

    request.json     what `appliance boot` asked for (written once, before the supervisor starts)
    state.json       what the supervisor reports: PIDs, sockets, NBD address, state
    migration.json   written by `appliance migrate` after the pivot (targets per disk)
    serial.log       the guest's serial console (unless --serial names another file)
    qmp.sock         QEMU's QMP socket (QEMU backend)
    supervisor.log   the supervisor's own log (and QEMU's stderr)

Writers replace whole files atomically (write a temp file, fsync, rename), so a reader never
sees half a JSON document. state.json has one writer, the supervisor, except when the supervisor
is dead (then `appliance stop` marks the session stopped). This module must not start or stop
processes; it only observes them (`pid_alive`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SESSIONS_DIR = "sessions"
REQUEST_FILE = "request.json"
STATE_FILE = "state.json"
MIGRATION_FILE = "migration.json"

#: Session names are overlay names too (dedupstore's rule), so keep them plain.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")

# Session states, as written by the supervisor.
STARTING = "starting"
RUNNING = "running"
MIGRATED = "migrated"  # the VM runs from local files; NBD and the overlay are no longer used
STOPPED = "stopped"  # QEMU exited (guest powered off, `appliance stop`, or a crash)
FAILED = "failed"  # the supervisor could not start nbdkit or QEMU (see `error`)


class SessionError(Exception):
    """A recovery session could not be started, found, stopped or migrated."""


class PivotedError(SessionError):
    """A migration failed after the guest moved onto its targets: they hold its disks now."""


def validate_session_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise SessionError(
            f"bad session name {name!r} (letters, digits, '.', '_', '-'; at most 100; "
            "must start with a letter or digit)"
        )


def sessions_root(repo_root: Path) -> Path:
    return Path(repo_root) / SESSIONS_DIR


def session_dir(repo_root: Path, name: str) -> Path:
    validate_session_name(name)
    return sessions_root(repo_root) / name


def write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    """Replace `path` with `obj` as JSON so that readers see the old or the new file, whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise SessionError(f"{path}: not a JSON object")
    return data


def proc_start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (/proc/PID/stat field 22), None if gone.

    Stored next to every PID so that a recycled PID is never mistaken for our process.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":  # a zombie has exited; only its parent has not reaped it yet
        return None
    return int(fields[19])


@dataclass
class ProcRef:
    """A process we started: its PID plus its start time, to survive PID reuse."""

    pid: int
    start_ticks: int | None

    @classmethod
    def of(cls, pid: int) -> ProcRef:
        return cls(pid, proc_start_ticks(pid))

    def alive(self) -> bool:
        ticks = proc_start_ticks(self.pid)
        return ticks is not None and (self.start_ticks is None or ticks == self.start_ticks)

    @classmethod
    def from_json(cls, obj: Any) -> ProcRef | None:
        if not isinstance(obj, dict) or "pid" not in obj:
            return None
        return cls(int(obj["pid"]), obj.get("start_ticks"))


def pid_alive(ref: ProcRef | None) -> bool:
    return ref is not None and ref.alive()


@dataclass
class BootRequest:
    """Everything the supervisor needs to start one session (request.json)."""

    name: str
    point: str  # resolved SOURCE@ID
    repo_root: str
    disks: list[dict[str, Any]]  # [{"name": "disk0", "size": N}] from the overlay
    memory: str = "512M"
    cpus: int = 1
    serial_log: str = ""
    vnc: str | None = None
    accel: str = "tcg"
    bus: str = "virtio"
    libvirt_uri: str | None = None
    nbd_listen: str = "127.0.0.1:0"
    extra_qemu_args: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> BootRequest:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in obj.items() if k in known})


@dataclass
class SessionInfo:
    """One session as `appliance sessions` shows it: state.json plus liveness checks."""

    name: str
    path: Path
    state: str
    point: str
    backend: str
    serial_log: str | None
    qmp_socket: str | None
    nbd_uri: str | None
    supervisor: ProcRef | None
    qemu: ProcRef | None
    nbdkit: ProcRef | None
    domain: str | None
    libvirt_uri: str | None
    error: str | None
    migrated_to: list[str]
    raw: dict[str, Any]

    @property
    def supervisor_alive(self) -> bool:
        return pid_alive(self.supervisor)

    @property
    def qemu_alive(self) -> bool:
        return pid_alive(self.qemu)

    @property
    def nbdkit_alive(self) -> bool:
        return pid_alive(self.nbdkit)

    @property
    def effective_state(self) -> str:
        """The recorded state, corrected when the supervisor died without saying so."""
        if self.state in (STARTING, RUNNING, MIGRATED) and not self.supervisor_alive:
            return STOPPED if not self.qemu_alive else self.state
        return self.state

    def as_dict(self) -> dict[str, Any]:
        def ref(r: ProcRef | None, alive: bool) -> dict[str, Any] | None:
            return None if r is None else {"pid": r.pid, "alive": alive}

        return {
            "name": self.name,
            "path": str(self.path),
            "state": self.effective_state,
            "recorded_state": self.state,
            "point": self.point,
            "backend": self.backend,
            "serial_log": self.serial_log,
            "qmp_socket": self.qmp_socket,
            "nbd_uri": self.nbd_uri,
            "supervisor": ref(self.supervisor, self.supervisor_alive),
            "qemu": ref(self.qemu, self.qemu_alive),
            "nbdkit": ref(self.nbdkit, self.nbdkit_alive),
            "domain": self.domain,
            "libvirt_uri": self.libvirt_uri,
            "error": self.error,
            "migrated_to": self.migrated_to,
        }


def load_session(path: Path) -> SessionInfo:
    """Read one session directory. Raises SessionError if it has no readable state yet."""
    try:
        st = read_json(path / STATE_FILE)
    except FileNotFoundError:
        st = {"state": STARTING}
    except ValueError as exc:
        raise SessionError(f"{path / STATE_FILE}: {exc}") from exc
    try:
        req = read_json(path / REQUEST_FILE)
    except (OSError, ValueError) as exc:
        raise SessionError(f"{path}: no readable {REQUEST_FILE}: {exc}") from exc
    migrated: list[str] = []
    with contextlib.suppress(OSError, ValueError):
        mig = read_json(path / MIGRATION_FILE)
        migrated = [str(t["target"]) for t in mig.get("disks", [])]
    return SessionInfo(
        name=path.name,
        path=path,
        state=str(st.get("state", STARTING)),
        point=str(req.get("point", "?")),
        backend="libvirt" if req.get("libvirt_uri") else "qemu",
        serial_log=st.get("serial_log") or req.get("serial_log"),
        qmp_socket=st.get("qmp_socket"),
        nbd_uri=st.get("nbd_uri"),
        supervisor=ProcRef.from_json(st.get("supervisor")),
        qemu=ProcRef.from_json(st.get("qemu")),
        nbdkit=ProcRef.from_json(st.get("nbdkit")),
        domain=st.get("domain"),
        libvirt_uri=req.get("libvirt_uri"),
        error=st.get("error"),
        migrated_to=migrated,
        raw=st,
    )


def list_session_dirs(repo_root: Path) -> list[Path]:
    root = sessions_root(repo_root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def now_s() -> float:
    return time.time()
