"""nbdkit Python plugin (API v2): the thin adapter between nbdkit and `nbd._exports`.

Runs inside nbdkit's embedded Python (`nbdkit python nbd/_plugin.py repo=DIR ...`), started by
`nbd.server.NbdServer`, which puts the venv's site-packages and the project root first on
PYTHONPATH. nbdkit owns the wire protocol: handshake, option haggling, request validation
(bounds, sizes, flags, writes to read-only exports) and error replies; this module only maps
callbacks to the catalogue and store errors to errnos. It must not crash on client input or
damaged data: every callback turns StoreError/OSError into `nbdkit.set_error(errno)` + an
exception, which nbdkit sends to that client as an NBD error reply while it goes on serving.

Parameters: `repo=DIR` (required), `overlays_only=1`, `verbose=1`, `only=A,B` and
`allow_file=PATH` (export only the points `SOURCE@ID` / overlays `overlay/NAME` named there;
the file, one name per line, is re-read when it changes, and a missing file allows nothing).
The keys of an encrypted repository come over an inherited pipe named by APPLIANCE_KEY_FD
(`dedupstore.KeyHandoff`, as `nbd.NbdServer` starts us), read once and closed; never on the
command line. A passphrase in APPLIANCE_PASSPHRASE is still accepted for a hand-started nbdkit.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import nbdkit  # provided by nbdkit's embedded interpreter

from dedupstore import Repository, StoreError, inherited_keys
from nbd._exports import Catalogue, Export

API_VERSION = 2

log = logging.getLogger("nbd.plugin")

_config: dict[str, str] = {}
_state: dict[str, Any] = {}

F = TypeVar("F", bound=Callable[..., Any])


class NbdRequestError(Exception):
    """Raised back into nbdkit after set_error: nbdkit logs it and replies with the errno."""


def _guard(fn: F) -> F:
    """Store errors -> errno + one-line exception; bugs -> traceback in the log + EIO."""

    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        try:
            return fn(*args)
        except StoreError as exc:
            nbdkit.set_error(exc.errno)
            raise NbdRequestError(f"{type(exc).__name__}: {exc}") from None
        except OSError as exc:
            nbdkit.set_error(exc.errno or errno.EIO)
            raise NbdRequestError(f"{type(exc).__name__}: {exc}") from None
        except Exception:
            log.exception("%s failed", fn.__name__)
            nbdkit.set_error(errno.EIO)
            raise

    return wrapper  # type: ignore[return-value]


# -- configuration --------------------------------------------------------------------------

def config(key: str, value: str) -> None:
    if key not in ("repo", "overlays_only", "verbose", "only", "allow_file"):
        raise ValueError(f"unknown parameter {key!r} "
                         "(repo, overlays_only, verbose, only, allow_file)")
    _config[key] = value


def config_complete() -> None:
    if "repo" not in _config:
        raise ValueError("repo=DIR is required")


def thread_model() -> int:
    # Requests run in parallel: the catalogue, DiskReader and OverlayDisk are thread-safe.
    return int(nbdkit.THREAD_MODEL_PARALLEL)


class _AllowList:
    """`only=` names plus the lines of `allow_file=` (re-read when its mtime/size change)."""

    def __init__(self, only: str, path: str | None) -> None:
        self.only = frozenset(x for x in only.split(",") if x)
        self.path = Path(path) if path else None
        self._stamp: tuple[int, int] | None = None
        self._cached: frozenset[str] = self.only

    def __call__(self) -> frozenset[str]:
        if self.path is None:
            return self.only
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                names = {ln.strip() for ln in self.path.read_text().splitlines() if ln.strip()}
                self._cached, self._stamp = self.only | names, stamp
        except FileNotFoundError:
            self._cached, self._stamp = self.only, None
        return self._cached


def get_ready() -> None:
    """Open the repository once, before any connection (a wrong passphrase fails startup)."""
    verbose = _config.get("verbose") == "1"
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, stream=sys.stderr,
        format="nbdkit-plugin %(levelname)s %(name)s: %(message)s",
    )
    keys = inherited_keys()
    passphrase = os.environ.pop("APPLIANCE_PASSPHRASE", None)
    repo = Repository.open(Path(_config["repo"]), passphrase=passphrase, keys=keys,
                           writable=False)  # fmt: skip
    _state["repo"] = repo
    allow = None
    if "only" in _config or "allow_file" in _config:
        allow = _AllowList(_config.get("only", ""), _config.get("allow_file"))
    _state["catalogue"] = Catalogue(repo, overlays_only=_config.get("overlays_only") == "1",
                                    allow=allow)
    log.debug("serving %s", _config["repo"])


def cleanup() -> None:
    cat: Catalogue | None = _state.pop("catalogue", None)
    if cat is not None:
        cat.close()
    repo: Repository | None = _state.pop("repo", None)
    if repo is not None:
        repo.close()


def _cat() -> Catalogue:
    cat: Catalogue = _state["catalogue"]
    return cat


# -- exports --------------------------------------------------------------------------------

@_guard
def list_exports(readonly: bool, is_tls: bool) -> list[tuple[str, str]]:
    return _cat().list_exports()


def default_export(readonly: bool, is_tls: bool) -> str:
    return ""


@_guard
def open(readonly: bool) -> Export:  # nbdkit looks callbacks up by name: shadows open()
    return _cat().open(nbdkit.export_name(), readonly=readonly)


@_guard
def close(h: Export) -> None:
    h.close()


def export_description(h: Export) -> str:
    return h.description


def get_size(h: Export) -> int:
    return h.size_bytes()


def block_size(h: Export) -> tuple[int, int, int]:
    # any alignment works; whole blocks are cheapest; nbdkit caps requests at 64 MiB itself
    return (1, min(h.block_size, 2 * 1024 * 1024), 0xFFFFFFFF)


def is_rotational(h: Export) -> bool:
    return False


def can_multi_conn(h: Export) -> bool:
    # Read-only: trivially consistent. Overlays: every connection of this process shares one
    # OverlayDisk (same fds, same in-memory map), so a flush on any connection makes all
    # completed writes durable and every connection reads every completed write.
    return True


def can_write(h: Export) -> bool:
    return h.writable


def can_flush(h: Export) -> bool:
    return h.writable


def can_trim(h: Export) -> bool:
    return h.writable


def can_zero(h: Export) -> bool:
    return h.writable


def can_fast_zero(h: Export) -> bool:
    return h.writable  # zeroing is a map update (+ hole punch): never slower than writing


def can_fua(h: Export) -> int:
    return int(nbdkit.FUA_EMULATE if h.writable else nbdkit.FUA_NONE)


def can_extents(h: Export) -> bool:
    return True


def can_cache(h: Export) -> int:
    return int(nbdkit.CACHE_NONE)


# -- data path ------------------------------------------------------------------------------

@_guard
def pread(h: Export, buf: bytearray, offset: int, flags: int) -> None:
    buf[:] = h.pread(offset, len(buf))


@_guard
def pwrite(h: Export, buf: bytes, offset: int, flags: int) -> None:
    h.pwrite(offset, buf)


@_guard
def flush(h: Export, flags: int) -> None:
    h.flush()


@_guard
def trim(h: Export, count: int, offset: int, flags: int) -> None:
    h.trim(offset, count)


@_guard
def zero(h: Export, count: int, offset: int, flags: int) -> None:
    h.write_zeroes(offset, count)


@_guard
def extents(h: Export, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    first_only = bool(flags & nbdkit.FLAG_REQ_ONE)
    hole_zero = int(nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO)
    return [(off, n, hole_zero if z else 0)
            for off, n, z in h.extents(offset, count, first_only=first_only)]
