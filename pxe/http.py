"""The appliance's boot HTTP server: per-machine iPXE scripts and the rescue kernel/initramfs.

Routes::

    GET  /boot.ipxe               the chain script (for DHCP setups that hand out an HTTP URL)
    GET  /boot/<mac>.ipxe         this machine's script, from the ``script_for`` callback
    GET  /rescue/vmlinuz          files of the rescue directory, with single-range ``Range``
    GET  /rescue/initrd.img       support (206 / 416), as iPXE's ``sanboot http://`` needs
    POST /rescue/<token>/done     the rescue system reports success / failure of its restore
    POST /rescue/<token>/failed   (``report`` callback; 200 if the token is armed, else 403)

HEAD works for the static routes only: a machine's script is answered to GET alone (405 to
HEAD), so a HEAD has no side effect and reveals nothing. ``tls=(cert, key)`` serves HTTPS
(for iPXE builds with HTTPS; Debian's iPXE has none).

A ``ThreadingHTTPServer`` (one thread per connection) rather than trio: every request does
blocking work (file reads via ``sendfile``, and the ``script_for`` callback, which may create an
overlay and an iSCSI target through subprocesses and LMDB), the request rate is a handful per
booting machine, and the server runs in its own ``appliance pxe serve`` process. A trio server
would push every one of those calls through ``to_thread`` for no gain.

It knows nothing of assignments, the store or iSCSI: ``appliance/`` passes ``script_for`` and
``report``. The callbacks' exceptions are logged and answered with 500, never crash the server.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import ssl
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from pxe.assignments import AssignmentError, normalize_mac
from pxe.ipxe import RESCUE_INITRD, RESCUE_KERNEL, chain_script

log = logging.getLogger(__name__)

#: script_for(mac, host_as_seen_by_client) -> iPXE script text
ScriptProvider = Callable[[str, str], str]
#: report(token, ok, message) -> True if ``token`` is an armed assignment's (accepted)
ReportHandler = Callable[[str, bool, str], bool]

_REPORT_RE = re.compile(r"^/rescue/([0-9a-f]{16,64})/(done|failed)$")
MAX_REPORT_BYTES = 4096

_BOOT_RE = re.compile(r"^/boot/([0-9A-Fa-f:.-]{12,17})\.ipxe$")
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
RESCUE_FILES = (RESCUE_KERNEL, RESCUE_INITRD)


class RangeError(ValueError):
    """An unsatisfiable or malformed Range header."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``Range`` header -> (first, last) inclusive, or None for the whole file.

    One range only (iPXE and curl ask for one); a multi-range or garbled header is ignored as
    RFC 9110 allows, an unsatisfiable one raises RangeError (-> 416).
    """
    if not header:
        return None
    m = _RANGE_RE.match(header.strip())
    if m is None:
        return None
    first_s, last_s = m.groups()
    if not first_s and not last_s:
        return None
    if not first_s:  # suffix range: the last N bytes
        n = int(last_s)
        if n == 0 or size == 0:
            raise RangeError(header)
        return max(0, size - n), size - 1
    first = int(first_s)
    last = int(last_s) if last_s else size - 1
    if first >= size or last < first:
        raise RangeError(header)
    return first, min(last, size - 1)


class _Handler(BaseHTTPRequestHandler):
    server: BootHttpServer
    protocol_version = "HTTP/1.1"
    server_version = "DRApplianceBoot/1"

    def log_message(self, format: str, *args: object) -> None:
        log.info("%s %s", self.client_address[0], format % args)

    def do_GET(self) -> None:
        self._dispatch(body=True)

    def do_HEAD(self) -> None:
        path = unquote(self.path.split("?", 1)[0])
        if _BOOT_RE.match(path):  # a script is made (and spent) by GET only
            self.send_response(HTTPStatus.METHOD_NOT_ALLOWED)
            self.send_header("Allow", "GET")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._dispatch(body=False)

    def do_POST(self) -> None:
        path = unquote(self.path.split("?", 1)[0])
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_REPORT_BYTES:
            self.send_error(HTTPStatus.BAD_REQUEST, "bad Content-Length")
            return
        message = self.rfile.read(length).decode(errors="replace") if length else ""
        m = _REPORT_RE.match(path)
        if m is None:
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        try:
            accepted = self.server.report(m.group(1), m.group(2) == "done", message)
        except Exception:
            log.exception("rescue report %s failed", m.group(2))
            with contextlib.suppress(OSError):
                self.send_error(HTTPStatus.INTERNAL_SERVER_ERROR)
            return
        if accepted:
            self._text("ok\n", body=True)
        else:
            self.send_error(HTTPStatus.FORBIDDEN, "unknown or spent token")

    def _client_host(self) -> str:
        host = self.headers.get("Host") or self.server.default_host
        if host.startswith("["):
            return host[1 : host.index("]")] if "]" in host else host
        return host.rsplit(":", 1)[0] if host.count(":") == 1 else host

    def _dispatch(self, *, body: bool) -> None:
        path = unquote(self.path.split("?", 1)[0])  # iPXE sends ":" as %3A
        try:
            if path == "/boot.ipxe":
                host = self.headers.get("Host") or self.server.default_host
                base = f"{self.server.scheme}://{host}"
                self._text(chain_script(base), body=body)
                return
            m = _BOOT_RE.match(path)
            if m:
                try:
                    mac = normalize_mac(m.group(1))
                except AssignmentError:
                    self.send_error(HTTPStatus.BAD_REQUEST, "bad MAC address")
                    return
                self._text(self.server.script_for(mac, self._client_host()), body=body)
                return
            if path.startswith("/rescue/") and path[len("/rescue/") :] in RESCUE_FILES:
                self._file(self.server.rescue_dir / path[len("/rescue/") :], body=body)
                return
            self.send_error(HTTPStatus.NOT_FOUND)
        except (BrokenPipeError, ConnectionResetError):
            log.info("%s went away during %s", self.client_address[0], path)
        except Exception:
            log.exception("boot HTTP request %s failed", path)
            with contextlib.suppress(OSError):
                self.send_error(HTTPStatus.INTERNAL_SERVER_ERROR)

    def _text(self, text: str, *, body: bool) -> None:
        data = text.encode()
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _file(self, path: Path, *, body: bool) -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            self.send_error(HTTPStatus.NOT_FOUND, f"{path.name} not built (appliance build rescue)")
            return
        try:
            size = os.fstat(fd).st_size
            try:
                rng = parse_range(self.headers.get("Range"), size)
            except RangeError:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            first, last = rng if rng else (0, size - 1)
            length = max(0, last - first + 1)
            self.send_response(HTTPStatus.PARTIAL_CONTENT if rng else HTTPStatus.OK)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(length))
            if rng:
                self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
            self.end_headers()
            if body and self.server.scheme == "https":  # sendfile would bypass TLS
                os.lseek(fd, first, os.SEEK_SET)
                left = length
                while left > 0:
                    chunk = os.read(fd, min(left, 1 << 20))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    left -= len(chunk)
            elif body:
                self.wfile.flush()
                offset, left = first, length
                while left > 0:
                    sent = os.sendfile(self.connection.fileno(), fd, offset, min(left, 1 << 20))
                    if sent == 0:
                        break
                    offset += sent
                    left -= sent
        finally:
            os.close(fd)


class BootHttpServer(ThreadingHTTPServer):
    """The boot HTTP server. ``start()`` serves in a daemon thread; ``stop()`` shuts it down.

    ``listen`` is (host, port); port 0 picks a free port (see ``port`` after construction).
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        listen: tuple[str, int],
        *,
        rescue_dir: Path,
        script_for: ScriptProvider,
        report: ReportHandler | None = None,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        """``tls`` = (certificate, key) PEM files: serve HTTPS. Raises OSError (bind) and
        ssl.SSLError / OSError (unreadable or mismatched certificate and key)."""
        ctx: ssl.SSLContext | None = None
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(tls[0]), str(tls[1]))
        super().__init__(listen, _Handler)
        self._tls = ctx
        self.scheme = "https" if ctx is not None else "http"
        self.rescue_dir = Path(rescue_dir)
        self.script_for = script_for
        self.report: ReportHandler = report or (lambda token, ok, message: False)
        self.port = int(self.server_address[1])
        host = str(self.server_address[0])
        if host == "0.0.0.0":  # noqa: S104 - a comparison, not a bind
            host = "127.0.0.1"
        #: Host for answers to clients that send no Host header (HTTP/1.0)
        self.default_host = f"{host}:{self.port}"
        self._thread: threading.Thread | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        """TLS handshake in the connection's own thread (never in the accept loop)."""
        if self._tls is not None:
            request.settimeout(30)
            try:
                request = self._tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                log.info("%s: TLS handshake failed: %s", client_address[0], exc)
                return
        super().finish_request(request, client_address)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="pxe-http", daemon=True)
        self._thread.start()
        log.info("boot HTTP server on %s:%d", self.server_address[0], self.port)

    def stop(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join(5)
            self._thread = None
        self.server_close()
