"""iSCSI targets for SAN boot and takeover: tgtd/tgtadm, and nbdfuse as the LUN's backing file.

Owns the tgtd daemon of one appliance (started detached in the foreground mode ``-f``, on its own
control port, stopped through ``tgtadm`` because tgtd ignores SIGTERM), targets (one per
session; the disk is **LUN 1**, LUN 0 being tgt's controller) and the nbdfuse mounts that turn an
NBD export (an overlay) into the regular file tgt's ``rdwr`` backing store needs.

Receives NBD URIs as plain strings: it never imports ``nbd/`` nor the store. It must not kill
anything by name: every process is a :class:`pxe._proc.ProcRef`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pxe import _proc
from pxe._proc import ProcRef
from pxe.ipxe import DISK_LUN

log = logging.getLogger(__name__)

TGTD_SOCKET_DIR = Path("/var/run/tgtd")
IQN_PREFIX = "iqn.2024-01.org.dr-appliance"
NBDFUSE_FILE = "disk"
_CONTROL_PORTS = range(3300, 3400)


class IscsiError(Exception):
    """tgtd/tgtadm/nbdfuse failed; the message carries the tool's own words."""


def target_iqn(session: str) -> str:
    """IQN of a session's target (lower case, as RFC 3722 stringprep would make it)."""
    return f"{IQN_PREFIX}:{session.lower()}"


def _require(tool: str, package: str) -> str:
    exe = shutil.which(tool)
    if exe is None:
        raise IscsiError(f"{tool} not found (apt-get install {package})")
    return exe


def control_port_in_use(port: int) -> bool:
    path = TGTD_SOCKET_DIR / f"socket.{port}"
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def free_control_port() -> int:
    for port in _CONTROL_PORTS:
        if not control_port_in_use(port):
            return port
    raise IscsiError(f"no free tgtd control port in {_CONTROL_PORTS.start}-{_CONTROL_PORTS.stop}")


@dataclass(frozen=True)
class Chap:
    """CHAP credentials an initiator must present to log in to a target."""

    user: str
    secret: str

    @classmethod
    def generate(cls, user: str) -> Chap:
        """A fresh 16-character secret (the length every common initiator accepts)."""
        return cls(user, secrets.token_hex(8))


@dataclass
class TargetInfo:
    tid: int
    iqn: str
    sessions: int = 0
    backing: list[str] = field(default_factory=list)


class Tgt:
    """``tgtadm`` against one tgtd (by control port). Thread-compatible, no state of its own."""

    def __init__(self, control_port: int) -> None:
        self.control_port = control_port
        self.tgtadm = _require("tgtadm", "tgt")

    def adm(self, *args: str, check: bool = True) -> str:
        cmd = [self.tgtadm, "--control-port", str(self.control_port), "--lld", "iscsi", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=30)
        if check and proc.returncode != 0:
            msg = (proc.stderr or proc.stdout).strip()
            raise IscsiError(f"tgtadm {' '.join(args[:4])}: {msg or proc.returncode}")
        return proc.stdout

    def ready(self) -> bool:
        try:
            self.adm("--mode", "system", "--op", "show")
        except (IscsiError, subprocess.TimeoutExpired):
            return False
        return True

    def targets(self) -> dict[int, TargetInfo]:
        out: dict[int, TargetInfo] = {}
        cur: TargetInfo | None = None
        for line in self.adm("--mode", "target", "--op", "show").splitlines():
            m = re.match(r"^Target (\d+): (\S+)", line)
            if m:
                cur = out[int(m.group(1))] = TargetInfo(int(m.group(1)), m.group(2))
            elif cur is not None:
                s = line.strip()
                if s.startswith("I_T nexus:"):
                    cur.sessions += 1
                elif s.startswith("Backing store path:") and "None" not in s:
                    cur.backing.append(s.split(":", 1)[1].strip())
        return out

    def add_target(
        self, iqn: str, backings: Sequence[Path], *, readonly: bool = False,
        chap: Chap | None = None,
    ) -> int:
        """New target ``iqn`` with ``backings[i]`` as LUN ``i + 1``.

        Any initiator address may connect; with ``chap`` only one that logs in with those
        credentials gets in. Returns its tid. On failure the half-made target is deleted.
        """
        if not backings:
            raise IscsiError(f"target {iqn}: no disks to export")
        tids = self.targets()
        if any(t.iqn == iqn for t in tids.values()):
            raise IscsiError(f"target {iqn} already exists")
        tid = max(tids, default=0) + 1
        self.adm("--mode", "target", "--op", "new", "--tid", str(tid), "--targetname", iqn)
        try:
            for i, backing in enumerate(backings):
                # tgtd chdirs to / : the backing path must be absolute
                lun = ["--mode", "logicalunit", "--op", "new", "--tid", str(tid),
                       "--lun", str(DISK_LUN + i), "--backing-store", str(Path(backing).resolve()),
                       "--bstype", "rdwr"]  # fmt: skip
                if readonly:
                    lun += ["--params", "readonly=1"]
                self.adm(*lun)
            if chap is not None:
                # a leftover account of that name (a session that crashed) gets the new secret
                self.adm("--mode", "account", "--op", "delete", "--user", chap.user, check=False)
                self.adm("--mode", "account", "--op", "new", "--user", chap.user,
                         "--password", chap.secret)  # fmt: skip
                self.adm("--mode", "account", "--op", "bind", "--tid", str(tid),
                         "--user", chap.user)  # fmt: skip
            self.adm("--mode", "target", "--op", "bind", "--tid", str(tid),
                     "--initiator-address", "ALL")  # fmt: skip
        except IscsiError:
            self.adm("--mode", "target", "--op", "delete", "--force", "--tid", str(tid),
                     check=False)  # fmt: skip
            if chap is not None:
                self.adm("--mode", "account", "--op", "delete", "--user", chap.user, check=False)
            raise
        log.info("iSCSI target %d %s -> %s", tid, iqn, ", ".join(map(str, backings)))
        return tid

    def delete_target(self, iqn: str, *, chap_user: str | None = None) -> bool:
        """Delete the target named ``iqn`` even with initiators logged in, and its CHAP
        account ``chap_user``. False if there was no such target."""
        found = False
        for tid, t in self.targets().items():
            if t.iqn == iqn:
                self.adm("--mode", "target", "--op", "delete", "--force", "--tid", str(tid))
                log.info("deleted iSCSI target %d %s", tid, iqn)
                found = True
        if chap_user:
            self.adm("--mode", "account", "--op", "delete", "--user", chap_user, check=False)
        return found


def start_tgtd(portal: str, *, log_path: Path, timeout_s: float = 10.0) -> tuple[ProcRef, int]:
    """Start a tgtd on a free control port listening on ``portal`` (HOST:PORT).

    Returns (process, control port) once tgtadm gets answers. Raises IscsiError.
    """
    tgtd = _require("tgtd", "tgt")
    port = free_control_port()
    proc = _proc.spawn_detached(
        [tgtd, "-f", "--control-port", str(port), "--iscsi", f"portal={portal}"],
        log_path=log_path,
        cwd=Path("/"),
    )
    ref = _proc.ref_of(proc.pid)
    tgt = Tgt(port)
    deadline = time.monotonic() + timeout_s
    while not tgt.ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                _proc.stop(ref, sig=9)
            tail = log_path.read_text(errors="replace").strip()[-300:]
            raise IscsiError(f"tgtd did not start on {portal}: {tail}")
        time.sleep(0.05)
    # tgtd answers tgtadm before its iSCSI portal listens: wait for the portal too
    host, _, pport = portal.rpartition(":")
    while True:
        with contextlib.suppress(OSError), socket.create_connection((host, int(pport)), 0.5):
            break
        if time.monotonic() > deadline:
            stop_tgtd(ref, port)
            raise IscsiError(f"tgtd is up but nothing listens on {portal} (port taken?)")
        time.sleep(0.05)
    log.info("tgtd pid %d, control port %d, portal %s", ref.pid, port, portal)
    return ref, port


def stop_tgtd(ref: ProcRef, control_port: int) -> None:
    """tgtd ignores SIGTERM: take it offline, delete every target, delete the system; SIGKILL
    only if that did not end it."""
    if _proc.alive(ref):
        with contextlib.suppress(IscsiError, subprocess.TimeoutExpired):
            tgt = Tgt(control_port)
            tgt.adm("--mode", "system", "--op", "update", "--name", "State", "--value", "offline",
                    check=False)  # fmt: skip
            for tid in tgt.targets():
                tgt.adm("--mode", "target", "--op", "delete", "--force", "--tid", str(tid),
                        check=False)  # fmt: skip
            tgt.adm("--mode", "system", "--op", "delete", check=False)
        if not _proc.wait_gone(ref, 5.0):
            _proc.stop(ref, sig=9, timeout_s=5.0)
    log.info("tgtd pid %d stopped", ref.pid)


def mount_nbdfuse(
    mountpoint: Path, uri: str, *, log_path: Path, timeout_s: float = 15.0
) -> ProcRef:
    """Expose NBD ``uri`` as the file ``mountpoint/disk`` (nbdfuse, detached).

    Returns once nbdfuse wrote its PID file (it is connected and serving). Raises IscsiError.
    """
    nbdfuse = _require("nbdfuse", "libnbd-bin")
    mountpoint.mkdir(parents=True, exist_ok=True)
    pidfile = mountpoint.with_name(mountpoint.name + ".pid")
    pidfile.unlink(missing_ok=True)
    proc = _proc.spawn_detached(
        [nbdfuse, "-P", str(pidfile), str(mountpoint / NBDFUSE_FILE), uri], log_path=log_path
    )
    ref = _proc.ref_of(proc.pid)
    deadline = time.monotonic() + timeout_s
    while not (pidfile.exists() and pidfile.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                unmount_nbdfuse(mountpoint, ref)
            tail = log_path.read_text(errors="replace").strip()[-300:]
            raise IscsiError(f"nbdfuse could not attach {uri}: {tail}")
        time.sleep(0.05)
    log.info("nbdfuse pid %d: %s -> %s", ref.pid, uri, mountpoint / NBDFUSE_FILE)
    return ref


def unmount_nbdfuse(mountpoint: Path, ref: ProcRef, timeout_s: float = 10.0) -> None:
    """``fusermount3 -u`` (nbdfuse then flushes and exits); SIGTERM/SIGKILL by PID and a lazy
    unmount if it hangs."""
    fusermount = shutil.which("fusermount3") or "fusermount3"
    if _proc.alive(ref):
        subprocess.run([fusermount, "-u", str(mountpoint)], capture_output=True, check=False,
                       timeout=30)  # fmt: skip
        if not _proc.wait_gone(ref, timeout_s):
            _proc.stop(ref)
    if mountpoint.is_mount():
        subprocess.run([fusermount, "-u", "-z", str(mountpoint)], capture_output=True,
                       check=False, timeout=30)  # fmt: skip
