"""iSCSI targets for SAN boot and takeover: tgtd/tgtadm, and nbdfuse as the LUN's backing file.

Owns the one tgtd of the appliance (:class:`TargetDaemon`: shared by every repository and
session, its state in ``$APPLIANCE_RUN_DIR/iscsi`` (default ``/run/dr-appliance/iscsi``) under a
flock; reused while it lives, started otherwise, given more portals with ``tgtadm --mode
portal``; started detached in the foreground mode ``-f`` on its own control port, stopped through
``tgtadm`` because tgtd ignores SIGTERM, when its last target goes), targets (one per session,
named per repository and session by :func:`target_iqn`; the disk is **LUN 1**, LUN 0 being tgt's
controller), portal ownership (a port another process listens on is an error naming it: tgtd
itself reports success and binds nothing) and the nbdfuse mounts that turn an NBD export (an
overlay) into the regular file tgt's ``rdwr`` backing store needs.

Receives NBD URIs as plain strings: it never imports ``nbd/`` nor the store. It must not kill
anything by name: every process is a :class:`pxe._proc.ProcRef`.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


RUN_DIR_ENV = "APPLIANCE_RUN_DIR"
DEFAULT_RUN_DIR = Path("/run/dr-appliance")


def target_iqn(repo_id: str, session: str) -> str:
    """IQN of a session's target: unique per repository (first 8 hex digits of its id) and
    session, lower case as RFC 3722 stringprep would make it."""
    return f"{IQN_PREFIX}:{repo_id[:8].lower()}.{session.lower()}"


# -- who listens on a TCP port ------------------------------------------------------------------
def _hex_addr(text: str) -> str:
    """``/proc/net/tcp{,6}`` address (host-order 32-bit words in hex) -> printable IP."""
    raw = bytes.fromhex(text)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(words)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)  # ::ffff:127.0.0.1 collides like 127.0.0.1
    return str(ip)


def _listeners(port: int) -> list[tuple[str, int]]:
    """(address, socket inode) of every TCP listener on ``port`` in this network namespace."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                addr, _, hport = f[1].partition(":")
                if f[3] == "0A" and int(hport, 16) == port:  # 0A: TCP_LISTEN
                    out.append((_hex_addr(addr), int(f[9])))
    return out


def _socket_pids(inodes: set[int]) -> dict[int, int]:
    """inode -> pid of a process holding that socket (scans ``/proc/*/fd``)."""
    found: dict[int, int] = {}
    want = {f"socket:[{i}]": i for i in inodes}
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (pid_dir / "fd").iterdir():
                with contextlib.suppress(OSError):
                    ino = want.get(os.readlink(fd))
                    if ino is not None:
                        found.setdefault(ino, int(pid_dir.name))
    return found


def _overlaps(a: str, b: str) -> bool:
    wild = ("0.0.0.0", "::")  # noqa: S104 - comparisons, not binds
    return a == b or a in wild or b in wild


@dataclass(frozen=True)
class PortOwner:
    """A process listening on a port (pid 0: the socket's owner could not be found)."""

    address: str
    pid: int
    command: str

    def describe(self) -> str:
        who = f"pid {self.pid} ({self.command})" if self.pid else "an unknown process"
        return f"{who} listens on {self.address}"


def port_owners(host: str, port: int) -> list[PortOwner]:
    """Processes listening on ``port`` at an address that collides with ``host``."""
    hits = [(a, i) for a, i in _listeners(port) if _overlaps(a, host)]
    if not hits:
        return []
    pids = _socket_pids({i for _, i in hits})
    out = []
    for addr, ino in hits:
        pid = pids.get(ino, 0)
        cmd = "?"
        if pid:
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                    errors="replace").strip()[:120] or "?"
        out.append(PortOwner(f"{addr}:{port}", pid, cmd))
    return out


def _split_portal(portal: str) -> tuple[str, int]:
    host, sep, port = portal.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise IscsiError(f"bad iSCSI portal {portal!r} (expected HOST:PORT)")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - only when asked for


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

    def portals(self) -> list[str]:
        """``HOST:PORT`` of every portal tgtd was told to listen on."""
        out = self.adm("--mode", "portal", "--op", "show")
        return [m.group(1) for m in re.finditer(r"^Portal: (\S+?),\d+$", out, re.M)]

    def add_portal(self, portal: str) -> None:
        self.adm("--mode", "portal", "--op", "new", "--param", f"portal={portal}")

    def delete_portal(self, portal: str) -> None:
        self.adm("--mode", "portal", "--op", "delete", "--param", f"portal={portal}",
                 check=False)  # fmt: skip

    def set_chap(self, tid: int, chap: Chap) -> None:
        """Give target ``tid`` (new) CHAP credentials; logged-in initiators stay logged in."""
        self.adm("--mode", "account", "--op", "delete", "--user", chap.user, check=False)
        self.adm("--mode", "account", "--op", "new", "--user", chap.user,
                 "--password", chap.secret)  # fmt: skip
        self.adm("--mode", "account", "--op", "bind", "--tid", str(tid), "--user", chap.user)

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


def check_portal_free(portal: str, *, ours: ProcRef | None = None) -> None:
    """Raise IscsiError naming the process if anything but ``ours`` listens where ``portal``
    would."""
    host, port = _split_portal(portal)
    others = [o for o in port_owners(host, port) if ours is None or o.pid != ours.pid]
    if others:
        raise IscsiError(
            f"iSCSI portal {portal} is busy: {others[0].describe()} "
            "(stop it, or choose another port with --portal / --iscsi-portal)"
        )


def _portal_listening(ref: ProcRef, portal: str) -> bool:
    host, port = _split_portal(portal)
    return any(o.pid == ref.pid for o in port_owners(host, port))


def start_tgtd(portal: str, *, log_path: Path, timeout_s: float = 10.0) -> tuple[ProcRef, int]:
    """Start a tgtd on a free control port listening on ``portal`` (HOST:PORT).

    Returns (process, control port) once tgtadm gets answers and the portal is tgtd's.
    Raises IscsiError (also when another process holds the portal: it is named).
    """
    tgtd = _require("tgtd", "tgt")
    check_portal_free(portal)
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
    # tgtd answers tgtadm before its iSCSI portal listens, and it "succeeds" with a portal it
    # could not bind (another process took the port meanwhile): wait until the port is its own
    while not _portal_listening(ref, portal):
        if time.monotonic() > deadline:
            stop_tgtd(ref, port)
            owners = port_owners(*_split_portal(portal))
            why = owners[0].describe() if owners else "nothing listens there"
            raise IscsiError(f"tgtd started but does not listen on {portal}: {why}")
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


class TargetDaemon:
    """The appliance's one tgtd, shared by every repository and session.

    State: ``<run dir>/iscsi/tgtd.json`` (process, control port); every change runs under the
    flock of ``<run dir>/iscsi/tgtd.lock`` (:meth:`locked`), so two repositories never start
    two daemons nor pick the same tid. A dead daemon's state is ignored and replaced.
    """

    def __init__(self, state_dir: Path | None = None) -> None:
        base = Path(os.environ.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR)
        self.dir = state_dir or base / "iscsi"
        self.state_path = self.dir / "tgtd.json"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.dir / "tgtd.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def state(self) -> dict[str, Any] | None:
        """The live daemon's state (``proc``, ``control_port``), or None."""
        try:
            st: dict[str, Any] = json.loads(self.state_path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        if _proc.alive(ProcRef.from_dict(st["proc"])):
            return st
        return None

    def tgt(self) -> Tgt | None:
        st = self.state()
        return None if st is None else Tgt(int(st["control_port"]))

    def ensure(self, portal: str) -> Tgt:
        """The running daemon (started if none) listening on ``portal`` too. Caller holds
        :meth:`locked`. Raises IscsiError (a busy portal names its owner)."""
        st = self.state()
        if st is None:
            ref, port = start_tgtd(portal, log_path=self.dir / "tgtd.log")
            st = {"proc": ref.as_dict(), "control_port": port}
            tmp = self.state_path.with_name(".tgtd.json.tmp")
            tmp.write_text(json.dumps(st) + "\n")
            tmp.replace(self.state_path)
            return Tgt(port)
        ref = ProcRef.from_dict(st["proc"])
        tgt = Tgt(int(st["control_port"]))
        if portal not in tgt.portals():
            check_portal_free(portal, ours=ref)
            tgt.add_portal(portal)
            deadline = time.monotonic() + 10
            while not _portal_listening(ref, portal):
                if time.monotonic() > deadline:
                    tgt.delete_portal(portal)
                    owners = port_owners(*_split_portal(portal))
                    why = owners[0].describe() if owners else "nothing listens there"
                    raise IscsiError(f"tgtd could not listen on {portal}: {why}")
                time.sleep(0.05)
            log.info("tgtd pid %d: added portal %s", ref.pid, portal)
        return tgt

    def stop_if_idle(self) -> bool:
        """Stop the daemon if it serves no target at all (of any repository). Caller holds
        :meth:`locked`. True if it was stopped."""
        st = self.state()
        if st is None:
            self.state_path.unlink(missing_ok=True)
            return False
        with contextlib.suppress(IscsiError, subprocess.TimeoutExpired):
            if Tgt(int(st["control_port"])).targets():
                return False
        stop_tgtd(ProcRef.from_dict(st["proc"]), int(st["control_port"]))
        self.state_path.unlink(missing_ok=True)
        return True


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
