"""QEMU helpers for VM tests: boot a TCG guest, watch its serial log, always clean up.

Every guest runs as ``qemu-system-x86_64 -accel tcg -m 256 -display none -no-reboot
-serial file:LOG <args>``; tests wait for serial markers instead of sleeping, and the process is
stopped by its PID (terminate, then kill) whatever happens.

    with qemu_vm(["-drive", f"file={disk},format=raw"], serial_log=log) as vm:
        vm.wait_for("M BOOTED", timeout_s=60)

    result = run_qemu(args, serial_log=log, wait_for="M DONE", timeout_s=60, expect_exit=True)
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

QEMU = os.environ.get("DR_QEMU", "qemu-system-x86_64")
DEFAULT_FAIL_ON = ("Kernel panic", "No bootable device")
POLL_S = 0.1


class QemuError(AssertionError):
    """The guest failed: a ``fail_on`` string appeared, QEMU exited early, or a timeout."""

    def __init__(self, message: str, log_text: str) -> None:
        tail = "\n".join(log_text.splitlines()[-25:])
        super().__init__(f"{message}\n--- serial log (tail) ---\n{tail}")
        self.log_text = log_text


@dataclass
class QemuResult:
    """What a finished guest left behind."""

    log: str  #: the whole serial log
    elapsed_s: float  #: seconds from start until the marker appeared
    exited: bool  #: QEMU exited by itself (guest poweroff/reboot with -no-reboot)
    returncode: int | None


class QemuVM:
    """One running QEMU process with its serial log; use :func:`qemu_vm` to get one."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        serial_log: Path,
        fail_on: Sequence[str] = DEFAULT_FAIL_ON,
        memory_mib: int = 256,
        serial_input: bool = False,
    ) -> None:
        """``serial_input``: the serial port is also a unix socket :meth:`type` writes to."""
        self.serial_log = Path(serial_log)
        self.fail_on = tuple(fail_on)
        self.serial_sock: Path | None = None
        serial = ["-serial", f"file:{self.serial_log}"]
        if serial_input:
            self.serial_sock = self.serial_log.with_name(self.serial_log.name + ".sock")
            assert len(str(self.serial_sock)) < 100, f"socket path too long: {self.serial_sock}"
            serial = [
                "-chardev", f"socket,id=ser0,path={self.serial_sock},server=on,wait=off,"
                f"logfile={self.serial_log}",
                "-serial", "chardev:ser0",
            ]  # fmt: skip
        self.cmd = [
            QEMU, "-accel", "tcg", "-m", str(memory_mib), "-display", "none", "-no-reboot",
            *serial, *args,
        ]  # fmt: skip
        self.stderr_path = self.serial_log.with_name(self.serial_log.name + ".qemu-stderr")
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> QemuVM:
        self.serial_log.parent.mkdir(parents=True, exist_ok=True)
        self.serial_log.write_bytes(b"")
        log.info("starting %s", " ".join(self.cmd))
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                self.cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT
            )
        self.started_at = time.monotonic()
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self, grace_s: float = 3.0) -> int | None:
        """Terminate QEMU by PID (SIGTERM, then SIGKILL); idempotent. Returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            log.info("stopping qemu pid %d", proc.pid)
            proc.terminate()
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        return proc.returncode

    def type(self, text: str) -> None:
        """Send ``text`` to the guest's serial console (needs ``serial_input=True``).

        Connects, sends, lingers so QEMU reads it, and disconnects: nobody drains the socket,
        so staying connected would stall the guest's output once the buffer fills.
        """
        assert self.serial_sock is not None, "QemuVM(serial_input=True) first"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(self.serial_sock))
            for ch in text.encode():  # one byte at a time, like a person (16550 FIFO)
                s.sendall(bytes([ch]))
                time.sleep(0.02)
            time.sleep(0.5)

    def __enter__(self) -> QemuVM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- observation -------------------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.serial_log.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def _stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace").strip()
        except FileNotFoundError:
            return ""

    def _check_failure(self, text: str) -> None:
        for bad in self.fail_on:
            if bad in text:
                raise QemuError(f"guest printed {bad!r}", text)

    def wait_for(self, marker: str, *, timeout_s: float) -> float:
        """Wait until ``marker`` is in the serial log; return seconds since QEMU started.

        Raises :class:`QemuError` on a ``fail_on`` string, early QEMU exit, or timeout (QEMU is
        left running; the context manager stops it).
        """
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + timeout_s
        while True:
            text = self.log_text()
            if marker in text:
                return time.monotonic() - self.started_at
            self._check_failure(text)
            if self.proc.poll() is not None:
                text = self.log_text()
                if marker in text:
                    return time.monotonic() - self.started_at
                raise QemuError(
                    f"qemu exited ({self.proc.returncode}) before {marker!r}; "
                    f"stderr: {self._stderr_text()[-500:]}",
                    text,
                )
            if time.monotonic() > deadline:
                raise QemuError(f"timeout after {timeout_s:.0f}s waiting for {marker!r}", text)
            time.sleep(POLL_S)

    def wait_exit(self, *, timeout_s: float) -> int:
        """Wait for QEMU to exit by itself (guest poweroff); raise QemuError on timeout."""
        assert self.proc is not None, "start() first"
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise QemuError(
                f"qemu still running {timeout_s:.0f}s after the marker", self.log_text()
            ) from None


@contextlib.contextmanager
def qemu_vm(
    args: Sequence[str],
    *,
    serial_log: Path,
    fail_on: Sequence[str] = DEFAULT_FAIL_ON,
    memory_mib: int = 256,
    serial_input: bool = False,
) -> Iterator[QemuVM]:
    """Start a guest; stop it by PID when the block ends, whatever happened."""
    vm = QemuVM(args, serial_log=serial_log, fail_on=fail_on, memory_mib=memory_mib,
                serial_input=serial_input)  # fmt: skip
    try:
        yield vm.start()
    finally:
        vm.stop()


def run_qemu(
    args: list[str],
    *,
    serial_log: Path,
    wait_for: str,
    fail_on: Sequence[str] = DEFAULT_FAIL_ON,
    timeout_s: float,
    expect_exit: bool = False,
    memory_mib: int = 256,
) -> QemuResult:
    """Boot a guest until ``wait_for`` shows up in its serial log, then stop it.

    With ``expect_exit`` the guest must then power off by itself within the rest of
    ``timeout_s`` (so disk images are closed before the caller reads them); otherwise QEMU is
    stopped as soon as the marker appears. Raises :class:`QemuError` on failure/timeout.
    """
    start = time.monotonic()
    with qemu_vm(args, serial_log=serial_log, fail_on=fail_on, memory_mib=memory_mib) as vm:
        elapsed = vm.wait_for(wait_for, timeout_s=timeout_s)
        exited = False
        if expect_exit:
            remaining = max(1.0, timeout_s - (time.monotonic() - start))
            vm.wait_exit(timeout_s=remaining)
            exited = True
        else:
            exited = vm.proc is not None and vm.proc.poll() is not None
        returncode = vm.stop()
        return QemuResult(log=vm.log_text(), elapsed_s=elapsed, exited=exited,
                          returncode=returncode)  # fmt: skip


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (bind to port 0, then release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def managed_process(
    cmd: Sequence[str], *, log_path: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a helper daemon (qemu-nbd, nbdkit, ...) in the foreground; stop it by PID on exit."""
    out = log_path.open("wb") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=out,
                            stderr=subprocess.STDOUT)  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if log_path and not isinstance(out, int):
            out.close()


def wait_tcp(host: str, port: int, *, timeout_s: float = 10.0) -> None:
    """Wait until something accepts TCP connections on ``host:port``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port}") from None
            time.sleep(0.05)
