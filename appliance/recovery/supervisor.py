"""Per-session supervisor daemon: `python -m appliance.recovery.supervisor SESSION_DIR`.

Started by `appliance boot` in a new session (`start_new_session=True`), it owns the session's
processes until they end: nbdkit (`nbd.NbdServer`, started from this process's main thread so
`--exit-with-parent` ties nbdkit's life to ours) and QEMU (our child; or a libvirt domain, which
libvirtd owns). It is the only writer of `state.json` while it lives.

Signals: SIGTERM = end the session (QMP `quit`, then SIGTERM/SIGKILL QEMU by PID; destroy the
libvirt domain; stop nbdkit). SIGUSR1 = "the VM was migrated off NBD" (sent by `appliance
migrate` after the pivot): stop nbdkit, keep QEMU, record state `migrated`. When QEMU exits by
itself (guest power-off) the supervisor stops nbdkit, records `stopped` and exits; the overlay is
left for `appliance stop [--commit]`.

It must not commit or drop overlays (the CLI does, after we are gone) and must not open the
repository for writing.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import IO, Any

from dedupstore import Keys, inherited_keys
from nbd import NbdServer, NbdServerError, overlay_export_name

from ._qemu import Qmp, qemu_command
from ._state import (
    FAILED,
    MIGRATED,
    REQUEST_FILE,
    RUNNING,
    STARTING,
    STATE_FILE,
    STOPPED,
    BootRequest,
    ProcRef,
    SessionError,
    read_json,
    write_json_atomic,
)

log = logging.getLogger(__name__)

POLL_S = 0.2
QUIT_GRACE_S = 5.0


class Supervisor:
    """Runs one session; `run()` returns the process exit status."""

    def __init__(self, session_dir: Path, keys: Keys | None = None) -> None:
        self.dir = session_dir
        self.keys = keys  # handed over by `appliance boot` (KeyHandoff), kept for nbdkit
        self.req = BootRequest.from_json(read_json(session_dir / REQUEST_FILE))
        self.state: dict[str, Any] = {
            "state": STARTING,
            "supervisor": ProcRef.of(os.getpid()).__dict__,
            "serial_log": self.req.serial_log,
            "started_at": time.time(),
        }
        self.nbd: NbdServer | None = None
        self.nbd_log: IO[bytes] | None = None
        self.qemu: subprocess.Popen[bytes] | None = None
        self.domain: Any = None  # libvirt.virDomain (libvirt backend)
        self.conn: Any = None  # libvirt.virConnect
        self._term = False
        self._migrated = False

    # -- state -----------------------------------------------------------------------------
    def save(self, **changes: Any) -> None:
        self.state.update(changes)
        self.state["updated_at"] = time.time()
        write_json_atomic(self.dir / STATE_FILE, self.state)

    # -- signals ---------------------------------------------------------------------------
    def _on_term(self, signum: int, frame: FrameType | None) -> None:
        self._term = True

    def _on_usr1(self, signum: int, frame: FrameType | None) -> None:
        self._migrated = True

    # -- start -----------------------------------------------------------------------------
    def start_nbd(self) -> tuple[str, int, dict[str, str]]:
        self.nbd_log = open(self.dir / "nbdkit.log", "ab")  # noqa: SIM115 - closed in stop_nbd
        self.nbd = NbdServer(
            self.req.repo_root, listen=self.req.nbd_listen, overlays_only=True,
            keys=self.keys, exit_with_parent=True,
            stderr=self.nbd_log,
        )  # fmt: skip
        self.nbd.start()
        assert self.nbd.host is not None and self.nbd.port is not None
        exports = {str(d["name"]): overlay_export_name(self.req.name, str(d["name"]))
                   for d in self.req.disks}  # fmt: skip
        assert self.nbd.pid is not None
        self.save(
            nbdkit=ProcRef.of(self.nbd.pid).__dict__,
            nbd_host=self.nbd.host, nbd_port=self.nbd.port,
            nbd_uri=self.nbd.uri(), exports=exports,
        )  # fmt: skip
        return self.nbd.host, self.nbd.port, exports

    def start_qemu(self, host: str, port: int, exports: dict[str, str]) -> None:
        qmp_socket = self.dir / "qmp.sock"
        with contextlib.suppress(FileNotFoundError):
            qmp_socket.unlink()
        cmd = qemu_command(self.req, nbd_host=host, nbd_port=port, exports=exports,
                           qmp_socket=qmp_socket)  # fmt: skip
        log.info("starting %s", " ".join(cmd))
        with open(self.dir / "qemu.log", "ab") as out:
            self.qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)  # fmt: skip
        self.save(qemu=ProcRef.of(self.qemu.pid).__dict__, qmp_socket=str(qmp_socket),
                  qemu_command=cmd)  # fmt: skip
        # Ready = QMP answers and the VM runs (QEMU has opened every NBD export by then).
        deadline = time.monotonic() + 30
        while True:
            if self.qemu.poll() is not None:
                tail = (self.dir / "qemu.log").read_bytes()[-1500:].decode(errors="replace")
                raise SessionError(f"qemu exited with status {self.qemu.returncode}: {tail}")
            try:
                with Qmp(qmp_socket, timeout_s=2) as q:
                    if q.status() == "running":
                        return
            except SessionError as exc:
                if time.monotonic() > deadline:
                    raise SessionError(f"qemu did not start: {exc}") from exc
            time.sleep(0.05)

    def start_libvirt(self, host: str, port: int, exports: dict[str, str]) -> None:
        from ._libvirt import define_and_start

        self.conn, self.domain = define_and_start(self.req, nbd_host=host, nbd_port=port,
                                                  exports=exports)  # fmt: skip
        self.save(domain=self.domain.name(), libvirt_uri=self.req.libvirt_uri)

    # -- stop ------------------------------------------------------------------------------
    def stop_nbd(self) -> None:
        if self.nbd is not None:
            rc = self.nbd.stop(timeout_s=3.0)
            log.info("nbdkit stopped (status %s)", rc)
            self.nbd = None
        if self.nbd_log is not None:
            self.nbd_log.close()
            self.nbd_log = None

    def stop_vm(self) -> None:
        if self.qemu is not None and self.qemu.poll() is None:
            sock = self.state.get("qmp_socket")
            if sock:
                try:
                    with Qmp(sock, timeout_s=2) as q:
                        q.cmd("quit")
                except Exception:  # QMP gone or wedged: fall back to signals
                    log.info("QMP quit failed: signalling qemu", exc_info=True)
            try:
                self.qemu.wait(QUIT_GRACE_S)
            except subprocess.TimeoutExpired:
                self.qemu.terminate()
                try:
                    self.qemu.wait(QUIT_GRACE_S)
                except subprocess.TimeoutExpired:
                    self.qemu.kill()
                    self.qemu.wait()
        if self.domain is not None:
            from ._libvirt import destroy

            destroy(self.conn, self.domain)
            self.domain = None

    def vm_running(self) -> bool:
        if self.qemu is not None:
            return self.qemu.poll() is None
        if self.domain is not None:
            from ._libvirt import is_active

            return is_active(self.domain)
        return False

    # -- main ------------------------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        signal.signal(signal.SIGUSR1, self._on_usr1)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self.save()
        try:
            host, port, exports = self.start_nbd()
            if self.req.libvirt_uri:
                self.start_libvirt(host, port, exports)
            else:
                self.start_qemu(host, port, exports)
        except (SessionError, NbdServerError, OSError) as exc:
            log.error("session %s failed to start: %s", self.req.name, exc)
            self.stop_vm()
            self.stop_nbd()
            self.save(state=FAILED, error=str(exc))
            return 1
        except Exception as exc:  # libvirt errors and bugs: record them, then clean up
            log.exception("session %s failed to start", self.req.name)
            self.stop_vm()
            self.stop_nbd()
            self.save(state=FAILED, error=f"{type(exc).__name__}: {exc}")
            return 1
        self.save(state=RUNNING)
        log.info("session %s running", self.req.name)
        return self.loop()

    def loop(self) -> int:
        last_vm_check = 0.0
        while True:
            if self._term:
                log.info("SIGTERM: ending session %s", self.req.name)
                self.stop_vm()
                self.stop_nbd()
                self.save(state=STOPPED, stopped_by="signal", ended_at=time.time())
                return 0
            if self._migrated and self.state["state"] != MIGRATED:
                log.info("VM migrated off NBD: stopping nbdkit")
                self.stop_nbd()
                self.save(state=MIGRATED)
            now = time.monotonic()
            # libvirt calls cost a round trip: check a domain once a second.
            if self.qemu is not None or now - last_vm_check > 1.0:
                last_vm_check = now
                if not self.vm_running():
                    rc = self.qemu.returncode if self.qemu is not None else None
                    log.info("VM of session %s ended (status %s)", self.req.name, rc)
                    self.stop_vm()
                    self.stop_nbd()
                    self.save(state=STOPPED, stopped_by="guest", qemu_status=rc,
                              ended_at=time.time())  # fmt: skip
                    return 0
            if self.nbd is not None and not self.nbd.alive() and not self._term:
                log.error("nbdkit died; the guest's disks are gone")
                self.save(error="nbdkit exited unexpectedly")
                self.stop_nbd()
            time.sleep(POLL_S)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m appliance.recovery.supervisor")
    p.add_argument("session_dir", type=Path)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    keys = inherited_keys()  # first: closes the key pipe before anything else starts
    return Supervisor(args.session_dir.resolve(), keys).run()


if __name__ == "__main__":
    sys.exit(main())
