"""NbdServer: runs nbdkit with the store plugin as a child process and manages its life.

Owns the listening socket (bound here, handed to nbdkit by systemd-style socket activation, so
port 0 works and there is no bind race), the nbdkit command line (TLS-PSK, read-only, thread
count), the plugin's environment (PYTHONPATH with the venv first), the repository keys (handed
over an inherited pipe, `dedupstore.KeyHandoff`: never a passphrase in nbdkit's environment,
where /proc/<pid>/environ would show it as long as nbdkit runs), readiness
(nbdkit writes its PID file once it accepts connections) and shutdown (SIGTERM, then SIGKILL).
It must not serve NBD itself (nbdkit does) nor touch the store (the plugin does).

Safe by default: a TCP address that is not loopback is refused without TLS (`tls_psk`) unless
the caller says `insecure=True` (the CLI's `--insecure`): an NBD export is the whole disk of a
backup, decrypted. `only` / `allow_file` narrow what is exported (see `_plugin.py`).

Not thread-safe: one thread starts and stops a server. `exit_with_parent` (default: only when
started from the main thread) makes nbdkit die with the thread that started it (Linux
PR_SET_PDEATHSIG): do not use it from short-lived worker threads.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from typing import IO
from urllib.parse import quote

from dedupstore import KEY_FD_ENV, KeyHandoff, Keys, StoreError, sync_overlays, unlock_keys

log = logging.getLogger(__name__)

PLUGIN = Path(__file__).resolve().with_name("_plugin.py")
DEFAULT_LISTEN = "127.0.0.1:10809"

# Runs in the child between fork and nbdkit: puts the listening socket on fd 3 and sets
# LISTEN_PID to its own pid (exec keeps it), as socket activation requires.
_TRAMPOLINE = """\
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid())
os.execvp(sys.argv[2], sys.argv[2:])
"""


class NbdServerError(Exception):
    """nbdkit could not start or died (the message carries its stderr tail)."""


def is_loopback(host: str) -> bool:
    """Every address `host` resolves to is a loopback address (127.0.0.0/8, ::1)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    addrs = {str(info[4][0]).split("%", 1)[0] for info in infos}
    return bool(addrs) and all(ipaddress.ip_address(a).is_loopback for a in addrs)


def parse_listen(listen: str) -> tuple[str, int]:
    """'127.0.0.1:10809', '[::1]:10809', ':10809' (all of IPv4), 'host:0' (any free port)."""
    host, sep, port = listen.rpartition(":")
    if not sep:
        raise ValueError(f"bad listen address {listen!r} (expected HOST:PORT)")
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104 - only when the user asks for it
    try:
        port_no = int(port)
    except ValueError:
        raise ValueError(f"bad port in {listen!r}") from None
    if not 0 <= port_no <= 65535:
        raise ValueError(f"bad port in {listen!r}")
    return host, port_no


def _plugin_pythonpath() -> str:
    """The venv's site-packages and the project root, ahead of Debian's dist-packages."""
    paths = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
             str(Path(__file__).resolve().parent.parent)]
    import dedupstore  # where the plugin's imports must resolve

    paths.append(str(Path(dedupstore.__file__).resolve().parent.parent))
    old = os.environ.get("PYTHONPATH")
    if old:
        paths.extend(old.split(os.pathsep))
    seen: list[str] = []
    for p in paths:
        if p and p not in seen:
            seen.append(p)
    return os.pathsep.join(seen)


class NbdServer:
    """One nbdkit process exporting a repository's points and overlays.

    ``with NbdServer(root, listen="127.0.0.1:0") as srv: srv.uri("vm1@latest/disk0")``.
    Exactly one of `listen` / `socket` (default: `listen=127.0.0.1:10809`).
    `stderr`: where nbdkit's messages go; default a log file in the server's run directory
    (`self.log_path`), `None` inherits ours (the CLI does that).
    """

    def __init__(
        self,
        repo_root: Path | str,
        *,
        listen: str | None = None,
        socket: Path | str | None = None,
        passphrase: str | None = None,
        keys: Keys | None = None,
        tls_psk: Path | str | None = None,
        insecure: bool = False,
        only: list[str] | None = None,
        allow_file: Path | str | None = None,
        overlays_only: bool = False,
        readonly: bool = False,
        threads: int | None = None,
        verbose: bool = False,
        exit_with_parent: bool | None = None,
        stderr: int | IO[bytes] | str | None = "file",
        nbdkit: str = "nbdkit",
    ) -> None:
        if listen is not None and socket is not None:
            raise ValueError("give listen or socket, not both")
        self.repo_root = Path(repo_root).resolve()
        self.socket_path = None if socket is None else Path(socket).resolve()
        self.listen = None if self.socket_path else (listen or DEFAULT_LISTEN)
        self.passphrase = passphrase
        self.keys = keys
        self.tls_psk = None if tls_psk is None else Path(tls_psk).resolve()
        self.insecure = insecure
        self.only = list(only or [])
        for name in self.only:
            if not name or "," in name or any(c.isspace() for c in name):
                raise ValueError(f"bad export restriction {name!r}")
        self.allow_file = None if allow_file is None else Path(allow_file).resolve()
        self.overlays_only = overlays_only
        self.readonly = readonly
        self.threads = threads
        self.verbose = verbose
        self.exit_with_parent = exit_with_parent
        self._stderr_choice = stderr
        self.nbdkit = nbdkit
        self.host: str | None = None
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.run_dir: Path | None = None
        self.log_path: Path | None = None
        self._log_file: IO[bytes] | None = None
        self.log_text = ""
        """nbdkit's stderr after stop() (when it went to the default log file)."""

    # -- addresses ------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def uri(self, export: str = "") -> str:
        """NBD URI of an export (libnbd/qemu syntax), e.g. nbd://127.0.0.1:10809/vm1@latest/disk0.

        TLS servers give nbds:// URIs; add `?tls-psk-file=...` and a user for libnbd clients.
        """
        path = quote(export, safe="/@:")
        scheme = "nbds" if self.tls_psk else "nbd"
        if self.socket_path is not None:
            return f"{scheme}+unix:///{path}?socket={self.socket_path}"
        if self.host is None or self.port is None:
            raise NbdServerError("server not started")
        host = self.host
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(host).version == 6:
                host = f"[{host}]"
        return f"{scheme}://{host}:{self.port}/{path}"

    # -- lifecycle --------------------------------------------------------------------------
    def _bind(self) -> socket.socket:
        if self.socket_path is not None:
            path = self.socket_path
            if path.exists() or path.is_symlink():
                if not path.is_socket():
                    raise NbdServerError(f"{path} exists and is not a socket")
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    probe.connect(str(path))
                except OSError:
                    log.info("removing stale socket %s", path)
                    path.unlink()
                else:
                    raise NbdServerError(f"{path}: another server is listening there")
                finally:
                    probe.close()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(str(path))
        else:
            assert self.listen is not None
            host, port = parse_listen(self.listen)
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
            family, _t, _p, _c, addr = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(addr)
            except OSError as exc:
                sock.close()
                raise NbdServerError(f"cannot listen on {self.listen}: {exc.strerror}") from exc
            self.host, self.port = sock.getsockname()[:2]
        sock.listen(128)
        return sock

    def command(self, pidfile: Path) -> list[str]:
        cmd = [self.nbdkit, "--foreground", "-P", str(pidfile)]
        ewp = self.exit_with_parent
        if ewp is None:
            ewp = threading.current_thread() is threading.main_thread()
        if ewp:
            cmd.append("--exit-with-parent")
        if self.tls_psk is not None:
            cmd += ["--tls=require", f"--tls-psk={self.tls_psk}"]
        if self.readonly:
            cmd.append("--readonly")
        # nbdkit's --threads is per connection. The plugin's Python work runs under one GIL,
        # so more threads than cores only add contention: measured with nbdcopy (4
        # connections) on a 2 GiB point, 2 threads per connection copied in 1.65 s, 16 in 3.1 s.
        threads = self.threads or max(2, os.cpu_count() or 2)
        cmd += ["--threads", str(threads)]
        if self.verbose:
            cmd.append("--verbose")
        cmd += ["python", str(PLUGIN), f"repo={self.repo_root}"]
        if self.overlays_only:
            cmd.append("overlays_only=1")
        if self.only:
            cmd.append(f"only={','.join(self.only)}")
        if self.allow_file is not None:
            cmd.append(f"allow_file={self.allow_file}")
        if self.verbose:
            cmd.append("verbose=1")
        return cmd

    def check_exposure(self) -> None:
        """Refuse a non-loopback TCP address without TLS unless `insecure`.

        Raises NbdServerError naming both ways out (`--tls-psk`, `--insecure`)."""
        if self.listen is None or self.tls_psk is not None or self.insecure:
            return
        try:
            host, _port = parse_listen(self.listen)
        except ValueError as exc:
            raise NbdServerError(str(exc)) from None
        if not is_loopback(host):
            raise NbdServerError(
                f"refusing to serve NBD on {self.listen} without TLS: every machine that "
                "reaches it could read the backups decrypted. Give --tls-psk FILE (lines "
                "'user:hexkey'), or --insecure to serve in clear anyway"
            )

    def start(self, timeout_s: float = 30.0) -> None:
        """Start nbdkit; return once it accepts connections. Raises NbdServerError."""
        if self.proc is not None:
            raise NbdServerError("already started")
        self.check_exposure()
        if self.tls_psk is not None and not self.tls_psk.is_file():
            raise NbdServerError(f"TLS PSK file {self.tls_psk} does not exist")
        if shutil.which(self.nbdkit) is None:
            raise NbdServerError(f"{self.nbdkit} not found (apt-get install nbdkit "
                                 "nbdkit-plugin-python)")
        keys = self.keys
        if keys is None and self.passphrase is not None:
            try:
                keys = unlock_keys(self.repo_root, self.passphrase)
            except StoreError as exc:  # wrong passphrase, no repository: nbdkit never starts
                raise NbdServerError(str(exc)) from None
        self.run_dir = Path(tempfile.mkdtemp(prefix="appliance-nbd-"))
        pidfile = self.run_dir / "nbdkit.pid"
        env = dict(os.environ)
        env["PYTHONPATH"] = _plugin_pythonpath()
        env["PYTHONNOUSERSITE"] = "1"
        env.pop("APPLIANCE_PASSPHRASE", None)  # the keys go over a pipe (KeyHandoff)
        env.pop(KEY_FD_ENV, None)
        handoff = KeyHandoff(keys)
        env.update(handoff.env)
        stderr: int | IO[bytes] | None
        if self._stderr_choice == "file":
            self.log_path = self.run_dir / "nbdkit.log"
            self._log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
            stderr = self._log_file
        else:
            stderr = self._stderr_choice  # type: ignore[assignment]
        try:
            sock = self._bind()
        except BaseException:
            handoff.close()
            raise
        try:
            cmd = [sys.executable, "-S", "-c", _TRAMPOLINE, str(sock.fileno()),
                   *self.command(pidfile)]
            self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                                         stderr=stderr, pass_fds=(sock.fileno(), *handoff.fds),
                                         start_new_session=False)
        finally:
            sock.close()  # nbdkit has its own copy: when it dies, connections are refused
            handoff.close()  # nbdkit has its own end of the key pipe
        deadline = time.monotonic() + timeout_s
        while True:
            rc = self.proc.poll()
            if rc is not None:
                tail = self._log_tail()
                self._cleanup_files()
                self.proc = None
                raise NbdServerError(f"nbdkit exited with status {rc} during startup"
                                     + (f": {tail}" if tail else ""))
            if pidfile.exists() and pidfile.read_text().strip():
                break
            if time.monotonic() > deadline:
                self.stop()
                raise NbdServerError(f"nbdkit did not become ready in {timeout_s} s")
            time.sleep(0.01)
        log.info("nbdkit pid %d serving %s on %s", self.proc.pid, self.repo_root,
                 self.socket_path or f"{self.host}:{self.port}")

    def wait(self, timeout_s: float | None = None) -> int:
        """Wait for nbdkit to exit; its exit status."""
        if self.proc is None:
            raise NbdServerError("not started")
        return self.proc.wait(timeout_s)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 3.0) -> int | None:
        """SIGTERM nbdkit; SIGKILL it if clients keep it alive for `timeout_s`; then sync.

        nbdkit 1.32 does not exit on SIGTERM while a client stays connected (measured: an idle
        libnbd client keeps it up indefinitely), so a grace period ends in SIGKILL. Completed
        overlay writes are in the page cache either way; `sync_overlays` then makes them
        durable as a FLUSH would. Idempotent; returns nbdkit's exit status (None if never
        started).
        """
        proc, self.proc = self.proc, None
        rc: int | None = None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    rc = proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    log.info("nbdkit pid %d still has clients after %.1f s: killing it",
                             proc.pid, timeout_s)
                    proc.kill()
                    rc = proc.wait()
            else:
                rc = proc.returncode
            try:
                sync_overlays(self.repo_root)
            except OSError as exc:
                log.warning("syncing overlays of %s failed: %s", self.repo_root, exc)
        self._cleanup_files()
        return rc

    def _log_tail(self, n_bytes: int = 2000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_bytes()[-n_bytes:].decode(errors="replace").strip()

    def _cleanup_files(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
        if self.run_dir is not None:
            if self.log_path is not None and self.log_path.exists():
                self.log_text = self.log_path.read_bytes().decode(errors="replace")
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None
            self.log_path = None

    def __enter__(self) -> NbdServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port (racy; prefer listen='HOST:0')."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def write_psk_file(path: Path, user: str = "dr-appliance") -> tuple[str, str]:
    """A PSK file for `tls_psk` (0600, `user:hexkey`, 32 random bytes); an existing one is
    reused. Returns (user, hex key) of its first line. Raises NbdServerError if unreadable."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{user}:{os.urandom(32).hex()}\n")
    first = path.read_text().strip().splitlines()[:1]
    u, sep, key = first[0].partition(":") if first else ("", "", "")
    if not sep or not u or not key:
        raise NbdServerError(f"{path}: not a PSK file (expected a line 'user:hexkey')")
    return u, key


__all__ = ["DEFAULT_LISTEN", "NbdServer", "NbdServerError", "free_port", "is_loopback",
           "parse_listen", "write_psk_file"]
