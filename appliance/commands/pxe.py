"""Network boot and iSCSI sub-commands: `pxe serve|assign|list|unassign`, `iscsi
export|unexport|list`.

Wiring only: the protocol work lives in `pxe/` (dnsmasq, boot HTTP, iPXE scripts, tgt, nbdfuse),
NBD in `nbd/`, overlays in `dedupstore`. This module decides what a machine boots. Side effects
happen on assignment (`pxe assign MAC sanboot P` creates the overlay and iSCSI session), never
on a fetch: a machine's script (with its secrets: CHAP, the NBD PSK, the rescue callback token)
is handed out once per `pxe assign`; a second GET gets a script that says so, a HEAD nothing.
A rescue assignment is consumed only when the rescue system POSTs `/rescue/<token>/done`.
`pxe serve`'s NBD server requires TLS-PSK (the PSK, `<repo>/pxe/nbd.psk`, reaches the rescue
system in its one-time script) and exports only the points of rescues in progress
(`<repo>/pxe/run/nbd-allow`).

An iSCSI session `S` = overlay `S` on a point + one `appliance nbd serve` (nbdkit on a unix
socket, overlays only) + one nbdfuse per disk turning `overlay/S/diskN` into a file + a tgt
target whose LUN 1 is disk0 (the one machines SAN-boot from), LUN 2 disk1, and so on.
Writes: initiator -> tgtd -> nbdfuse -> nbdkit -> the overlay's delta. SAN-boot sessions (and
`iscsi export --chap`) require CHAP with a per-session user and random secret (kept in the
root-only session.json, printed by `iscsi export`, and put into the iPXE script of the machine
assigned to SAN-boot it, whose iBFT hands them on to the OS's initiator).
Sessions outlive the command that made them (helpers run detached); their PIDs are recorded in
`<repo>/pxe/iscsi/<S>/session.json` and `unexport` stops them by PID. One tgtd serves every
session of every repository (`pxe.iscsi.TargetDaemon`); it stops with the last target. IQNs
name the repository (id prefix) and the session.
Must not kill anything it did not start, nor hold the repository writer lock except to commit.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import dedupstore as ds
from nbd import NbdServer, NbdServerError, parse_listen, write_psk_file
from pxe import _proc
from pxe.assignments import (
    DEFAULT_DST,
    Assignment,
    AssignmentError,
    AssignmentStore,
    normalize_mac,
)
from pxe.dnsmasq import (
    DnsmasqError,
    DnsmasqProcess,
    ProxyDhcpConfig,
    prepare_tftp_root,
    render_config,
    unreadable_for_others,
)
from pxe.http import BootHttpServer
from pxe.ipxe import (
    DISK_LUN,
    ScriptError,
    error_script,
    iscsi_root_path,
    local_script,
    rescue_script,
    sanboot_script,
    spent_script,
    unassigned_script,
)
from pxe.iscsi import (
    NBDFUSE_FILE,
    Chap,
    IscsiError,
    TargetDaemon,
    TargetInfo,
    check_portal_free,
    mount_nbdfuse,
    target_iqn,
    unmount_nbdfuse,
)

from .._ui import UserError, emit_json
from ..cli import _needs_passphrase, open_repo, passphrase, repo_path
from .build import build_rescue

log = logging.getLogger(__name__)

DEFAULT_HTTP = "0.0.0.0:8080"
DEFAULT_NBD = "0.0.0.0:10809"  # TLS-PSK always: see cmd_serve
DEFAULT_PORTAL = "127.0.0.1:3260"  # CHAP protects SAN boot; a LAN portal is asked for
NBD_PSK_USER = "dr-appliance"
RESCUE_PSK_PATH = "/etc/nbd.psk"  # where the rescue init writes restore.psk
RESCUE_BASE_CMDLINE = "console=tty0 console=ttyS0 panic=-1 quiet"
SAN_DISK = "disk0"
NBD_START_TIMEOUT_S = 30.0
SUPERVISE_S = 2.0  # how often `pxe serve` checks its iSCSI sessions
# Also an overlay name and (lower-cased) part of an IQN.
_SESSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


# -- repository paths ---------------------------------------------------------------------------
def _disk_order(disk: str) -> tuple[int, str]:
    """disk0, disk1, ..., disk10 in numeric order (LUN i+1 = disk i)."""
    digits = disk.removeprefix("disk")
    return (int(digits), "") if digits.isdigit() else (1 << 30, disk)


def boot_disks(point_name: str, names: Iterable[str]) -> list[str]:
    """A point's disk names in LUN/restore order; the first must be the boot disk (disk0)."""
    disks = sorted(names, key=_disk_order)
    if not disks or disks[0] != SAN_DISK:
        raise UserError(f"{point_name} has no {SAN_DISK}")
    return disks


def pxe_dir(root: Path) -> Path:
    return root / "pxe"


def iscsi_dir(root: Path) -> Path:
    return root / "pxe" / "iscsi"


def assignments(root: Path) -> AssignmentStore:
    return AssignmentStore(pxe_dir(root))


def run_dir(root: Path) -> Path:
    return root / "pxe" / "run"


def nbd_allow_path(root: Path) -> Path:
    return run_dir(root) / "nbd-allow"


def sync_nbd_allow(root: Path) -> None:
    """Write the points `pxe serve`'s NBD server may export now (rescues in progress)."""
    assignments(root).write_pinned_points(nbd_allow_path(root))


def serve_portal(root: Path) -> str | None:
    """The iSCSI portal of a running `pxe serve` of this repository, if any."""
    st = _read_json(run_dir(root) / "serve.json")
    if st is None or not _proc.alive(_proc.ProcRef.from_dict(st["proc"])):
        return None
    return str(st["iscsi_portal"])


def pxe_session_name(mac: str) -> str:
    """The iSCSI session/overlay of a SAN-booting machine: `pxe-525400123456`."""
    return "pxe-" + normalize_mac(mac).replace(":", "")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically, readable by root only (session files carry CHAP secrets)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


# -- iSCSI sessions -----------------------------------------------------------------------------
class IscsiSessions:
    """The iSCSI sessions of one repository. Serialised between processes and threads by a
    flock on `<repo>/pxe/iscsi/.lock` (held for the whole of export/unexport)."""

    _thread_lock = threading.Lock()

    def __init__(
        self,
        root: Path,
        *,
        passphrase: str | None = None,
        portal: str = DEFAULT_PORTAL,
        daemon: TargetDaemon | None = None,
    ) -> None:
        self.root = root.resolve()
        self.dir = iscsi_dir(self.root)
        self.passphrase = passphrase
        self.portal = portal
        self.daemon = daemon or TargetDaemon()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._thread_lock:
            fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    # tgtd (the appliance's one daemon) ------------------------------------------------------
    def _targets_by_iqn(self) -> dict[str, TargetInfo]:
        tgt = self.daemon.tgt()
        if tgt is None:
            return {}
        return {t.iqn: t for t in tgt.targets().values()}

    # sessions ---------------------------------------------------------------------------------
    def _session_names(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.parent.name for p in self.dir.glob("*/session.json"))

    def _session(self, name: str) -> dict[str, Any] | None:
        return _read_json(self.dir / name / "session.json")

    def get(self, name: str) -> dict[str, Any] | None:
        """Session `name` as recorded (None: no such session)."""
        return self._session(name)

    def revive(self) -> list[str]:
        """Supervision: restart every recorded session of this repository that is down (its
        target vanished, e.g. tgtd died, or a helper died), on its point and overlay, with the
        same CHAP credentials. Returns the names restarted; a failure is logged, not raised."""
        revived = []
        for name in self._session_names():
            with self._locked():
                s = self._session(name)
                if s is None or self._alive(s):
                    continue
                log.warning("iSCSI session %s is down: restarting it", name)
                try:
                    self._teardown(s)
                    creds = (Chap(s["chap_user"], s["chap_secret"])
                             if s.get("chap_user") else None)  # fmt: skip
                    self._create(s["point"], name, chap=creds is not None, creds=creds)
                except (UserError, ds.StoreError, IscsiError, OSError) as exc:
                    log.error("iSCSI session %s could not be restarted: %s", name, exc)
                    continue
            revived.append(name)
        return revived

    def list(self) -> list[dict[str, Any]]:
        """Every recorded session with liveness of its helpers and target."""
        out = []
        by_iqn = self._targets_by_iqn()
        for name in self._session_names():
            s = self._session(name)
            if s is None:
                continue
            t = by_iqn.get(s["iqn"])
            s["alive"] = t is not None and self._helpers_alive(s)
            s["initiators"] = t.sessions if t else 0
            out.append(s)
        return out

    def export(
        self, point_ref: str, name: str, *, chap: bool = False, rotate_chap: bool = False
    ) -> dict[str, Any]:
        """Make session `name` (overlay `name` on `point_ref`) available as an iSCSI target.

        `chap`: only an initiator presenting the session's generated CHAP credentials logs in.
        Idempotent: a live session is returned as is (with `rotate_chap`, under a new CHAP
        secret); an existing overlay of that name is reused (its writes survive an appliance
        restart). Raises UserError/StoreError.
        """
        if not _SESSION_RE.match(name):
            raise UserError(f"bad session name {name!r}: use A-Z a-z 0-9 . _ - (max 64)")
        with self._locked():
            s = self._session(name)
            if s is not None:
                if self._alive(s):
                    if rotate_chap and s.get("chap_user"):
                        self._rotate_chap(s)
                    return s
                log.info("session %s is stale: tearing it down and starting it again", name)
                self._teardown(s)
            return self._create(point_ref, name, chap=chap)

    @staticmethod
    def _helpers_alive(s: dict[str, Any]) -> bool:
        """nbdkit's keeper and every disk's nbdfuse still run (checked against PID reuse)."""
        refs = [s["nbd_server"], *(d["nbdfuse"] for d in s.get("disks", []))]
        return bool(s.get("disks")) and all(_proc.alive(_proc.ProcRef.from_dict(r)) for r in refs)

    def _alive(self, s: dict[str, Any]) -> bool:
        return s["iqn"] in self._targets_by_iqn() and self._helpers_alive(s)

    def _rotate_chap(self, s: dict[str, Any]) -> None:
        """A new CHAP secret for a live session (whoever saw the old one cannot log in again;
        initiators logged in stay logged in)."""
        tgt = self.daemon.tgt()
        t = self._targets_by_iqn().get(s["iqn"])
        if tgt is None or t is None:
            raise UserError(f"iSCSI session {s['name']} has no target")
        creds = Chap.generate(str(s["chap_user"]))
        with self.daemon.locked():
            tgt.set_chap(t.tid, creds)
        s["chap_secret"] = creds.secret
        _write_json(self.dir / s["name"] / "session.json", s)

    def _create(
        self, point_ref: str, name: str, *, chap: bool, creds: Chap | None = None
    ) -> dict[str, Any]:
        sdir = self.dir / name
        sdir.mkdir(parents=True, exist_ok=True)
        sdir.chmod(0o700)  # its NBD socket serves the overlay writable
        with ds.Repository.open(self.root, passphrase=self.passphrase) as repo:
            repo_id = repo.config.repo_id
            try:
                info = ds.overlay_info(repo, name)
                if info.base != repo.resolve(point_ref).name:
                    raise UserError(
                        f"overlay {name} exists on {info.base}, not {point_ref}: "
                        "commit or drop it first"
                    )
                log.info("reusing overlay %s on %s", name, info.base)
            except ds.NotFound:
                info = ds.create_overlay(repo, point_ref, name)
        names = boot_disks(info.base, (d.name for d in info.disks))
        s: dict[str, Any] = {
            "name": name,
            "point": info.base,
            "overlay": name,
            "iqn": target_iqn(repo_id, name),
            "created_ns": time.time_ns(),
            "nbd_server": {"pid": 0, "start_ticks": 0},
            "disks": [],
        }
        if creds is None and chap:
            creds = Chap.generate(f"dr-{repo_id[:8]}-{name}")
        s["chap_user"] = creds.user if creds else None
        s["chap_secret"] = creds.secret if creds else None
        try:
            ref, sock = self._start_nbd_keeper(sdir, name)
            s["nbd_server"] = ref.as_dict()
            s["nbd_socket"] = str(sock)
            _write_json(sdir / "session.json", s)
            for lun, disk in enumerate(names, start=DISK_LUN):
                uri = f"nbd+unix:///overlay/{name}/{disk}?socket={sock}"
                mnt = sdir / f"mnt-{disk}"
                fuse = mount_nbdfuse(mnt, uri, log_path=sdir / f"nbdfuse-{disk}.log")
                s["disks"].append({"disk": disk, "lun": lun, "nbd_uri": uri,
                                   "nbdfuse": fuse.as_dict(), "mount": str(mnt),
                                   "backing": str(mnt / NBDFUSE_FILE)})  # fmt: skip
                _write_json(sdir / "session.json", s)
            with self.daemon.locked():
                tgt = self.daemon.ensure(self.portal)
                s["tid"] = tgt.add_target(s["iqn"], [Path(d["backing"]) for d in s["disks"]],
                                          chap=creds)  # fmt: skip
            s["portal"] = self.portal
            _write_json(sdir / "session.json", s)
        except (UserError, IscsiError, OSError) as exc:
            self._teardown(s)
            with contextlib.suppress(IscsiError), self.daemon.locked():
                self.daemon.stop_if_idle()
            if isinstance(exc, UserError):
                raise
            raise UserError(f"iSCSI export of {point_ref} failed: {exc}") from exc
        log.info("iSCSI session %s: %s on %s as %s", name, info.base, s["portal"], s["iqn"])
        return s

    def _start_nbd_keeper(self, sdir: Path, name: str) -> tuple[_proc.ProcRef, Path]:
        """`appliance nbd serve --socket ... --overlays-only` in a session of its own, as the
        session's NBD server (it owns nbdkit through NbdServer: SIGTERM stops nbdkit and syncs
        the overlays).

        Why not NbdServer here directly: nbdkit gets SIGTERM (si_pid = its parent, seen with
        strace) when the process that started it exits, even with exit_with_parent=False and
        in a new session; under nbdfuse it then hung half-stopped (reads failed with ESHUTDOWN,
        the overlay stayed locked). So a long-lived process of its own must own nbdkit.
        """
        sock = sdir / "nbd.sock"
        sock.unlink(missing_ok=True)
        log_path = sdir / "nbdkit.log"
        env = dict(os.environ, APPLIANCE_REPO=str(self.root))
        env.pop("APPLIANCE_PASSPHRASE", None)  # the keys go over a pipe (ds.KeyHandoff)
        env.pop(ds.KEY_FD_ENV, None)
        keys = ds.unlock_keys(self.root, self.passphrase) if self.passphrase else None
        cmd = [sys.executable, "-c", "import sys; from appliance.cli import main; "
               "sys.argv[0] = 'appliance'; sys.exit(main())",
               "--repo", str(self.root), "nbd", "serve", "--socket", str(sock),
               "--overlays-only", "--only", f"overlay/{name}"]  # fmt: skip
        with ds.KeyHandoff(keys) as handoff, log_path.open("ab") as out:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    env={**env, **handoff.env}, pass_fds=handoff.fds,
                                    start_new_session=True)  # fmt: skip
        ref = _proc.ref_of(proc.pid)
        deadline = time.monotonic() + NBD_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()
                raise UserError(f"NBD server for {name} exited: {tail[-1] if tail else '?'}")
            if sock.is_socket():
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                    try:
                        probe.connect(str(sock))
                        break
                    except OSError:
                        pass
            if time.monotonic() > deadline:
                _proc.stop(ref)
                raise UserError(
                    f"NBD server for {name} did not start in {NBD_START_TIMEOUT_S:.0f} s"
                )
            time.sleep(0.05)
        return ref, sock

    def _teardown(self, s: dict[str, Any]) -> None:
        """Target, then nbdfuse (flushes to nbdkit), then nbdkit, then sync the overlay."""
        sdir = self.dir / s["name"]
        tgt = self.daemon.tgt()
        if tgt is not None:
            with contextlib.suppress(IscsiError), self.daemon.locked():
                tgt.delete_target(s["iqn"], chap_user=s.get("chap_user"))
        for d in s.get("disks", []):
            fuse_ref = _proc.ProcRef.from_dict(d["nbdfuse"])
            if fuse_ref.pid:
                unmount_nbdfuse(Path(d["mount"]), fuse_ref)
        nbd_ref = _proc.ProcRef.from_dict(s["nbd_server"])
        if nbd_ref.pid:  # SIGTERM: `nbd serve` stops nbdkit (SIGKILL after 3 s) and syncs
            _proc.stop(nbd_ref, timeout_s=10.0)
        ds.sync_overlays(self.root)
        (sdir / "session.json").unlink(missing_ok=True)
        (sdir / "nbd.sock").unlink(missing_ok=True)

    def unexport(
        self, name: str, *, commit: bool = False, label: str | None = None, drop: bool = False
    ) -> str | None:
        """Stop session `name`; optionally commit its overlay (returns the new point's name)
        and/or drop it. Raises UserError if there is no such session."""
        with self._locked():
            s = self._session(name)
            if s is None:
                raise UserError(f"no iSCSI session {name!r} (appliance iscsi list)")
            self._teardown(s)
            with self.daemon.locked():
                self.daemon.stop_if_idle()
        new_point = None
        if commit:
            with ds.Repository.open(self.root, passphrase=self.passphrase, writable=True) as repo:
                new_point = ds.commit_overlay(repo, s["overlay"], label=label).name
        if drop:
            with ds.Repository.open(self.root, passphrase=self.passphrase) as repo:
                ds.drop_overlay(repo, s["overlay"])
        shutil.rmtree(self.dir / name, ignore_errors=True)
        return new_point


# -- boot decisions ---------------------------------------------------------------------------
class BootPlanner:
    """script_for(mac, host) and report(token, ok, message) for the HTTP server.

    script_for hands a machine's secrets out once per arming (`AssignmentStore.fetch`), pins
    a rescue's point and opens it on the NBD server (the allow file); it creates nothing:
    `pxe assign` made the SAN-boot session (a session found dead, e.g. after an appliance
    restart, is restarted for the one fetch that may have it). report() consumes a rescue
    assignment on success only.
    """

    def __init__(
        self,
        root: Path,
        *,
        http_port: int,
        nbd_port: int,
        sessions: IscsiSessions,
        passphrase: str | None,
        nbd_psk: tuple[str, str] | None = None,
        scheme: str = "http",
    ) -> None:
        self.root = root
        self.http_port = http_port
        self.nbd_port = nbd_port
        self.sessions = sessions
        self.passphrase = passphrase
        self.nbd_psk = nbd_psk
        self.scheme = scheme
        self.store = assignments(root)

    def _pin(self, a: Assignment) -> str:
        """The point id the script is made for (`@latest` resolved now, once; SAN boot: the
        point its session was made on at assignment)."""
        assert a.point is not None
        if a.action == "sanboot":
            s = self.sessions.get(pxe_session_name(a.mac))
            if s is not None:
                return str(s["point"])
        with ds.Repository.open(self.root, passphrase=self.passphrase) as repo:
            return repo.resolve(a.point).name

    def script_for(self, mac: str, host: str) -> str:
        f = self.store.fetch(mac, pin=self._pin)
        a = f.assignment
        if a is None:
            log.info("%s: not assigned", mac)
            return unassigned_script(mac)
        log.info("%s asks for its script (via %s): %s", mac, host, a.describe())
        if a.action == "local":
            return local_script()
        if not f.first:
            log.warning("%s: boot script asked for again (via %s) after it was handed out: "
                        "answered without secrets; `appliance pxe assign` re-arms it",
                        mac, host)  # fmt: skip
            return spent_script(mac)
        try:
            script, handed_out = self._first_script(a, mac, host)
        except Exception:
            self.store.unfetch(mac, a.token)
            raise
        if not handed_out:
            self.store.unfetch(mac, a.token)
        sync_nbd_allow(self.root)
        return script

    def _first_script(self, a: Assignment, mac: str, host: str) -> tuple[str, bool]:
        """(script, whether it carries this arming's secrets)."""
        assert a.pinned is not None
        if a.action == "rescue":
            with ds.Repository.open(self.root, passphrase=self.passphrase) as repo:
                point = repo.resolve(a.pinned)
            disks = boot_disks(point.name, (str(d["name"]) for d in point.manifest["disks"]))
            if len(disks) != len(a.dsts):
                log.error("%s: %s has %d disk(s), the assignment names %d destination(s)",
                          mac, point.name, len(disks), len(a.dsts))  # fmt: skip
                return error_script(
                    f"{point.name} has {len(disks)} disk(s) but the assignment names "
                    f"{len(a.dsts)} local disk(s); reassign with --dst"
                ), False
            base = f"{self.scheme}://{host}:{self.http_port}"
            if self.nbd_psk is not None:
                user, key = self.nbd_psk
                srcs = [f"nbds://{user}@{host}:{self.nbd_port}/{point.name}/{d}"
                        f"?tls-psk-file={RESCUE_PSK_PATH}" for d in disks]  # fmt: skip
                psk = f" restore.psk={user}:{key}"
            else:
                srcs = [f"nbd://{host}:{self.nbd_port}/{point.name}/{d}" for d in disks]
                psk = ""
            cmdline = (
                f"{RESCUE_BASE_CMDLINE} restore.src={','.join(srcs)} restore.dst={a.dst} "
                f"restore.zero=0 restore.reboot=1 restore.report={base}/rescue/{a.token}{psk}"
            )
            return rescue_script(base, cmdline), True
        s = self.sessions.export(a.pinned, pxe_session_name(mac), chap=True)
        _, port = parse_listen(s["portal"])
        creds = (s["chap_user"], s["chap_secret"]) if s.get("chap_user") else None
        return sanboot_script(iscsi_root_path(host, port, s["iqn"]), chap=creds), True

    def report(self, token: str, ok: bool, message: str) -> bool:
        """The rescue system of the arming `token` reports. Success consumes the assignment
        (one-shot: next boot local); failure re-arms it (a reboot restores again) and logs
        the reason. False for a token no assignment carries."""
        text = " ".join(message.split())[:300]
        if ok:
            a = self.store.complete(token)
            if a is None:
                log.warning("rescue success reported with an unknown or spent token")
                return False
            log.info("%s: rescue of %s done (%s)", a.mac, a.pinned or a.point, text)
        else:
            a = self.store.find_token(token)
            if a is None or a.action != "rescue":
                log.warning("rescue failure reported with an unknown or spent token")
                return False
            self.store.unfetch(a.mac, token)
            log.error("%s: rescue of %s FAILED: %s; the machine stays in the rescue system and "
                      "its assignment stays armed (its next boot restores again)",
                      a.mac, a.pinned or a.point, text)  # fmt: skip
        sync_nbd_allow(self.root)
        return True


# -- CLI ----------------------------------------------------------------------------------------
def register(sub: Any) -> None:
    p = sub.add_parser("pxe", help="network boot: rescue restore, SAN boot, local boot")
    psub = p.add_subparsers(dest="pxe_command", metavar="ACTION")
    psub.required = True
    s = psub.add_parser("serve", help="proxy-DHCP/TFTP + boot HTTP + NBD until SIGTERM/SIGINT")
    s.add_argument(
        "--interface",
        metavar="IF",
        help="run dnsmasq proxy-DHCP + TFTP on IF (omit: HTTP/NBD/iSCSI only, "
        "e.g. when the DHCP server or QEMU hands out boot.ipxe itself)",
    )
    s.add_argument(
        "--http",
        default=DEFAULT_HTTP,
        metavar="HOST:PORT",
        help=f"boot HTTP server address (default {DEFAULT_HTTP})",
    )
    s.add_argument(
        "--nbd",
        default=DEFAULT_NBD,
        metavar="HOST:PORT",
        help=f"NBD server for rescue restores, always TLS-PSK (default {DEFAULT_NBD}); it "
        "exports only the points of rescues in progress",
    )
    s.add_argument(
        "--iscsi-portal",
        default=DEFAULT_PORTAL,
        metavar="HOST:PORT",
        help=f"iSCSI portal of SAN-boot sessions assigned while this runs (default "
        f"{DEFAULT_PORTAL}: loopback; SAN boot from the LAN needs e.g. 0.0.0.0:3260)",
    )
    s.add_argument(
        "--https",
        metavar="CERT,KEY",
        help="serve the boot HTTP server over HTTPS with these PEM files (only for an iPXE "
        "built with HTTPS: Debian's ipxe package has none)",
    )
    s.add_argument(
        "--tftp-root", type=Path, metavar="DIR", help="TFTP root (default <repo>/pxe/tftp)"
    )
    s.add_argument(
        "--rescue-dir",
        type=Path,
        metavar="DIR",
        help="rescue vmlinuz/initrd.img (default <repo>/pxe/rescue, built if absent)",
    )
    s.add_argument(
        "--advertise",
        metavar="HOST",
        help="address clients reach the appliance at, written into boot.ipxe "
        "(default: the interface's address, else the HTTP host)",
    )
    s.set_defaults(func=cmd_serve)

    a = psub.add_parser(
        "assign",
        help="what a machine boots next",
        description="rescue POINT: restore POINT onto the local disk (once); "
        "sanboot POINT: boot POINT over iSCSI (writes go to an overlay); "
        "local: boot the local disk",
    )
    a.add_argument("mac")
    a.add_argument("action", choices=("rescue", "sanboot", "local"))
    a.add_argument("point", nargs="?", help="SOURCE@ID or SOURCE@latest (rescue, sanboot)")
    a.add_argument(
        "--always",
        action="store_true",
        help="rescue: keep serving the rescue system on every boot (default: once)",
    )
    a.add_argument(
        "--portal",
        metavar="HOST:PORT",
        help="sanboot: iSCSI portal of the session (default: that of the running `pxe serve`, "
        f"else {DEFAULT_PORTAL})",
    )
    a.add_argument(
        "--dst",
        default=DEFAULT_DST,
        metavar="DEV",
        help=f"rescue: the disk to overwrite (default {DEFAULT_DST}; e.g. /dev/nvme0n1); "
        "a point with several disks needs one per disk, in order: /dev/sda,/dev/sdb",
    )
    a.set_defaults(func=cmd_assign)
    ls = psub.add_parser("list", help="list assignments")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)
    u = psub.add_parser(
        "unassign",
        help="forget a machine (stops its SAN boot session; the "
        "overlay stays for `appliance overlay commit|drop`)",
    )
    u.add_argument("mac")
    u.set_defaults(func=cmd_unassign)

    i = sub.add_parser("iscsi", help="iSCSI targets of backup points (writable overlays)")
    isub = i.add_subparsers(dest="iscsi_command", metavar="ACTION")
    isub.required = True
    e = isub.add_parser("export", help="export a point as an iSCSI LUN through an overlay")
    e.add_argument("point", help="SOURCE@ID or SOURCE@latest")
    e.add_argument("--name", help="session/overlay name (default: SOURCE-ID)")
    e.add_argument(
        "--portal",
        default=DEFAULT_PORTAL,
        metavar="HOST:PORT",
        help=f"iSCSI portal if tgtd is not running yet (default {DEFAULT_PORTAL})",
    )
    e.add_argument("--chap", action="store_true",
                   help="require CHAP with a generated user and secret")  # fmt: skip
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_iscsi_export)
    x = isub.add_parser("unexport", help="stop an iSCSI session")
    x.add_argument("name")
    x.add_argument("--commit", action="store_true", help="store the session's writes as a point")
    x.add_argument("--label", help="label of the committed point")
    x.add_argument("--drop", action="store_true", help="delete the overlay afterwards")
    x.set_defaults(func=cmd_iscsi_unexport)
    li = isub.add_parser("list", help="list iSCSI sessions")
    li.add_argument("--json", action="store_true")
    li.set_defaults(func=cmd_iscsi_list)


def _pw(root: Path, args: argparse.Namespace) -> str | None:
    return passphrase(args) if _needs_passphrase(root) else None


def cmd_assign(args: argparse.Namespace) -> int:
    root = repo_path(args)
    try:
        mac = normalize_mac(args.mac)
        if args.action == "local":
            if args.point:
                raise UserError("'local' takes no point")
            point = None
        else:
            if not args.point:
                raise UserError(f"'{args.action}' needs a point (SOURCE@ID or SOURCE@latest)")
            with open_repo(args) as repo:
                p = repo.resolve(args.point)  # unknown point: NotFound, a one-line error
                if p.kind != "image":
                    raise UserError(f"{p.name} is a {p.kind} point: only image points boot")
                disks = boot_disks(p.name, (str(d["name"]) for d in p.manifest["disks"]))
                ndst = len(args.dst.split(","))
                if args.action == "rescue" and ndst != len(disks):
                    example = ",".join(f"/dev/sd{'abcdefghijklmnopqrstuvwxyz'[i]}"
                                       for i in range(min(len(disks), 26)))  # fmt: skip
                    raise UserError(
                        f"{p.name} has {len(disks)} disk(s) ({', '.join(disks)}) but --dst names "
                        f"{ndst}: give one local disk per backed-up disk, e.g. --dst {example}"
                    )
            point = args.point
        session = None
        if args.action == "sanboot":
            assert point is not None
            # side effects on assignment, not on fetch: the overlay and the iSCSI target exist
            # now; a live session gets a new CHAP secret (the last script's is spent)
            portal = args.portal or serve_portal(root) or DEFAULT_PORTAL
            sessions = IscsiSessions(root, passphrase=_pw(root, args), portal=portal)
            session = sessions.export(point, pxe_session_name(mac), chap=True, rotate_chap=True)
        a = assignments(root).set(mac, args.action, point, once=not args.always, dst=args.dst)
        sync_nbd_allow(root)
    except AssignmentError as exc:
        raise UserError(str(exc)) from None
    extra = ""
    if session is not None:
        extra = f"; iSCSI session {session['name']} {session['iqn']} on {session['portal']}"
    print(f"{a.mac}: {a.describe()}{extra}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    try:
        items = assignments(repo_path(args)).all()
    except AssignmentError as exc:
        raise UserError(str(exc)) from None
    if args.json:
        emit_json([a.public_dict() for a in items])
    elif not items:
        print("no assignments")
    else:
        for a in items:
            print(f"{a.mac}  {a.describe()}")
    return 0


def cmd_unassign(args: argparse.Namespace) -> int:
    root = repo_path(args)
    try:
        old = assignments(root).remove(args.mac)
        sync_nbd_allow(root)
    except AssignmentError as exc:
        raise UserError(str(exc)) from None
    name = pxe_session_name(old.mac)
    sessions = IscsiSessions(root, passphrase=_pw(root, args))
    msg = f"unassigned {old.mac} (was {old.describe()})"
    if name in {s["name"] for s in sessions.list()}:
        sessions.unexport(name)
        msg += f"; stopped its SAN boot session, overlay {name} kept (appliance overlay commit)"
    print(msg)
    return 0


def cmd_iscsi_export(args: argparse.Namespace) -> int:
    root = repo_path(args)
    name = args.name or args.point.replace("@", "-")
    sessions = IscsiSessions(root, passphrase=_pw(root, args), portal=args.portal)
    s = sessions.export(args.point, name, chap=args.chap)
    if args.json:
        emit_json(s)
        return 0
    luns = ", ".join(f"LUN {d['lun']} = {d['disk']}" for d in s["disks"])
    print(f"{s['name']}: {s['point']} as {s['iqn']} ({luns}) on {s['portal']}")
    sanboot = f"sanboot iscsi:HOST::{parse_listen(s['portal'])[1]}:1:{s['iqn']}"
    if s.get("chap_user"):
        print(f"  CHAP user {s['chap_user']} secret {s['chap_secret']}")
        print(f"  iPXE: set username {s['chap_user']}; set password {s['chap_secret']}; {sanboot}")
    else:
        print("  open to every initiator that can reach the portal (--chap requires credentials)")
        print(f"  iPXE: {sanboot}")
    return 0


def cmd_iscsi_unexport(args: argparse.Namespace) -> int:
    root = repo_path(args)
    point = IscsiSessions(root, passphrase=_pw(root, args)).unexport(
        args.name, commit=args.commit, label=args.label, drop=args.drop
    )
    print(f"stopped {args.name}" + (f"; committed as {point}" if point else ""))
    return 0


def cmd_iscsi_list(args: argparse.Namespace) -> int:
    root = repo_path(args)
    items = IscsiSessions(root).list()
    if args.json:
        emit_json(items)
    elif not items:
        print("no iSCSI sessions")
    else:
        for s in items:
            state = "up" if s["alive"] else "DOWN"
            print(
                f"{s['name']:<24} {s['point']:<28} {s['iqn']}  {state}, "
                f"{s['initiators']} initiator(s)"
            )
    return 0


class _Stop(Exception):
    """Raised by the SIGTERM handler to leave the serve loop."""


def _interface_ipv4(interface: str) -> tuple[str, str]:
    """(address, network address) of `interface`'s first IPv4 address."""
    import ipaddress

    proc = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", interface],
                          capture_output=True, text=True, check=False)  # fmt: skip
    for line in proc.stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            iface = ipaddress.IPv4Interface(parts[parts.index("inet") + 1])
            return str(iface.ip), str(iface.network.network_address)
    raise UserError(
        f"interface {interface!r} has no IPv4 address "
        f"({proc.stderr.strip() or 'ip addr shows none'})"
    )


def cmd_serve(args: argparse.Namespace) -> int:
    root = repo_path(args).resolve()
    pw = _pw(root, args)
    ds.Repository.open(root, passphrase=pw).close()  # bad repo/passphrase: one line, now
    rescue_dir = (args.rescue_dir or pxe_dir(root) / "rescue").resolve()
    if not ((rescue_dir / "vmlinuz").is_file() and (rescue_dir / "initrd.img").is_file()):
        print(f"building the rescue system into {rescue_dir} ...", flush=True)
        build_rescue(rescue_dir)
    tftp_root = (args.tftp_root or pxe_dir(root) / "tftp").resolve()
    tls: tuple[Path, Path] | None = None
    try:
        http_host, http_port = parse_listen(args.http)
        parse_listen(args.iscsi_portal)
        if args.https:
            cert, sep, key = args.https.partition(",")
            if not sep or not cert or not key:
                raise ValueError(f"--https wants CERT,KEY (two PEM files), not {args.https!r}")
            tls = (Path(cert).resolve(), Path(key).resolve())
    except ValueError as exc:
        raise UserError(str(exc)) from None
    server_ip = subnet = None
    if args.interface:
        server_ip, subnet = _interface_ipv4(args.interface)
    sessions = IscsiSessions(root, passphrase=pw, portal=args.iscsi_portal)
    # a busy iSCSI portal is an error now, naming its owner (our own tgtd may hold it)
    tgtd = sessions.daemon.state()
    try:
        check_portal_free(args.iscsi_portal,
                          ours=_proc.ProcRef.from_dict(tgtd["proc"]) if tgtd else None)  # fmt: skip
    except IscsiError as exc:
        raise UserError(str(exc)) from None
    # NBD: always TLS-PSK (the rescue system gets the PSK in its one-time script), and only
    # the points of rescues in progress
    try:
        psk_user, psk_key = write_psk_file(pxe_dir(root) / "nbd.psk", NBD_PSK_USER)
    except NbdServerError as exc:
        raise UserError(str(exc)) from None
    sync_nbd_allow(root)
    nbd = NbdServer(
        root, listen=args.nbd, passphrase=pw, readonly=True, stderr=None, exit_with_parent=True,
        tls_psk=pxe_dir(root) / "nbd.psk", allow_file=nbd_allow_path(root),
    )  # fmt: skip
    httpd: BootHttpServer | None = None
    dnsmasq: DnsmasqProcess | None = None

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise _Stop

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        nbd.start()
        assert nbd.port is not None
        planner = BootPlanner(
            root, http_port=0, nbd_port=nbd.port, sessions=sessions, passphrase=pw,
            nbd_psk=(psk_user, psk_key), scheme="https" if tls else "http",
        )  # fmt: skip
        try:
            httpd = BootHttpServer(
                (http_host, http_port), rescue_dir=rescue_dir, script_for=planner.script_for,
                report=planner.report, tls=tls,
            )  # fmt: skip
        except ssl.SSLError as exc:
            raise UserError(f"--https {args.https}: {exc.reason or exc}") from None
        except OSError as exc:
            where = args.https if exc.filename is None and tls else args.http
            raise UserError(f"cannot use {where}: {exc.strerror}") from None
        planner.http_port = httpd.port
        run = run_dir(root)
        run.mkdir(parents=True, exist_ok=True)
        _write_json(run / "serve.json", {"proc": _proc.ref_of(os.getpid()).as_dict(),
                                         "iscsi_portal": args.iscsi_portal})  # fmt: skip
        advertise = (
            args.advertise
            or server_ip
            or (
                "127.0.0.1" if http_host == "0.0.0.0" else http_host  # noqa: S104
            )
        )
        prepare_tftp_root(tftp_root, f"{httpd.scheme}://{advertise}:{httpd.port}")
        httpd.start()
        if args.interface:
            assert server_ip is not None and subnet is not None
            conf = run / "dnsmasq.conf"
            conf.write_text(
                render_config(
                    ProxyDhcpConfig(
                        interface=args.interface,
                        subnet=subnet,
                        tftp_root=tftp_root,
                        server_ip=args.advertise or server_ip,
                        pid_file=run / "dnsmasq.pid",
                        log_file="-",
                    )
                )
            )
            blocked = unreadable_for_others(tftp_root)
            if blocked is not None:
                log.warning(
                    "dnsmasq serves TFTP as nobody and cannot enter %s (mode %o): "
                    "use --tftp-root under a world-readable directory",
                    blocked,
                    blocked.stat().st_mode & 0o777,
                )
            dnsmasq = DnsmasqProcess(conf, log_path=run / "dnsmasq.log")
            dnsmasq.start()
        print(
            f"pxe: {httpd.scheme} {http_host}:{httpd.port}, nbd {nbd.host}:{nbd.port} (TLS-PSK), "
            f"iscsi portal {args.iscsi_portal}, "
            f"tftp {tftp_root}, boot.ipxe -> {httpd.scheme}://{advertise}:{httpd.port}"
            + (
                f", dnsmasq pid {dnsmasq.pid} on {args.interface}"
                if dnsmasq
                else ", no DHCP (no --interface)"
            ),
            flush=True,
        )
        next_check = time.monotonic() + SUPERVISE_S
        while True:
            if not nbd.alive():
                print("appliance: nbdkit died", flush=True)
                return 1
            if dnsmasq is not None and dnsmasq.proc is not None and dnsmasq.proc.poll() is not None:
                print("appliance: dnsmasq died", flush=True)
                return 1
            if time.monotonic() >= next_check:  # SAN-boot sessions (and the tgtd) supervised
                for name in sessions.revive():
                    print(f"pxe: restarted iSCSI session {name}", flush=True)
                next_check = time.monotonic() + SUPERVISE_S
            time.sleep(0.5)
    except (_Stop, KeyboardInterrupt):
        return 0
    except (NbdServerError, DnsmasqError, ScriptError) as exc:
        raise UserError(str(exc)) from None
    finally:
        if dnsmasq is not None:
            dnsmasq.stop()
        if httpd is not None:
            httpd.stop()
        nbd.stop()
        (run_dir(root) / "serve.json").unlink(missing_ok=True)
        signal.signal(signal.SIGTERM, old)
        _say_sessions_left(sessions)


def _say_sessions_left(sessions: IscsiSessions) -> None:
    """`pxe serve` leaves iSCSI sessions running (machines run from them): say which, and how
    to end them."""
    try:
        left = [s for s in sessions.list() if s["alive"]]
    except (IscsiError, OSError, subprocess.SubprocessError) as exc:
        print(f"pxe: could not list the iSCSI sessions left running: {exc}", flush=True)
        return
    if not left:
        return
    print(f"pxe: stopped; {len(left)} SAN-boot/iSCSI session(s) keep running (machines may "
          "run from them):", flush=True)  # fmt: skip
    for s in left:
        how = f"appliance iscsi unexport {s['name']} [--commit]"
        if s["name"].startswith("pxe-"):
            mac = ":".join(s["name"][4:][i : i + 2] for i in range(0, 12, 2))
            how = f"appliance pxe unassign {mac}  (or {how})"
        print(f"  {s['name']}: {s['point']} as {s['iqn']} on {s.get('portal')}, "
              f"{s['initiators']} initiator(s); stop: {how}", flush=True)  # fmt: skip
