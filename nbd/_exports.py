"""The export catalogue: which NBD exports exist, and one handle per opened export.

Owns export naming (`SOURCE@ID/diskN`, `SOURCE@latest/diskN`, `overlay/NAME/diskN`), export
descriptions, sharing of open overlays between connections, and the translation from NBD
operations to store calls. It knows nothing about nbdkit or sockets (`_plugin.py` adapts it),
so it is tested without a server. It must not write to the store: point exports are
read-only; overlay writes go to the overlay's own files through `dedupstore`'s overlay API.

Errors: every method raises `StoreError` subclasses (each carries an errno) for anything a
client can cause or a damaged repository can cause; the adapter turns them into NBD errors.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from dedupstore import (
    DiskReader,
    InvalidArgument,
    NotFound,
    Overlay,
    OverlayDisk,
    Point,
    ReadOnly,
    Repository,
    StoreError,
    disk_readers,
    list_overlays,
    open_overlay,
)

log = logging.getLogger(__name__)

OVERLAY_PREFIX = "overlay/"
MAX_EXTENT_BLOCKS = 64 * 1024
"""Block-status replies describe at most this many blocks (4 GiB at 64 KiB): bounded work per
request; clients ask again from where the reply stopped."""


class Disk(Protocol):
    """What an export reads from: a point's DiskReader or an overlay's OverlayDisk."""

    block_size: int

    def size_bytes(self) -> int: ...
    def pread(self, offset: int, length: int) -> bytes: ...
    def extents(self, offset: int = 0, length: int | None = None
                ) -> Iterator[tuple[int, int, bool]]: ...


def point_export_name(point_name: str, disk: str) -> str:
    return f"{point_name}/{disk}"


def overlay_export_name(overlay: str, disk: str) -> str:
    return f"{OVERLAY_PREFIX}{overlay}/{disk}"


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


@dataclass
class _SharedOverlay:
    overlay: Overlay
    refs: int


class Export:
    """One opened export (one per NBD connection). Thread-safe: nbdkit runs requests of one
    connection in parallel."""

    def __init__(self, name: str, description: str, disk: Disk, *, writable: bool,
                 on_close: object = None) -> None:
        self.name = name
        self.description = description
        self.disk = disk
        self.writable = writable
        self._on_close = on_close
        self._closed = False

    @property
    def block_size(self) -> int:
        return self.disk.block_size

    def size_bytes(self) -> int:
        return self.disk.size_bytes()

    def pread(self, offset: int, length: int) -> bytes:
        data = self.disk.pread(offset, length)
        if len(data) != length:  # the disk stops early only past its end
            raise InvalidArgument(f"read {offset}+{length} beyond the end of {self.name}")
        return data

    def _writer(self) -> OverlayDisk:
        if not self.writable or not isinstance(self.disk, OverlayDisk):
            raise ReadOnly(f"export {self.name} is read-only")
        return self.disk

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._writer().pwrite(offset, data)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._writer().write_zeroes(offset, length)

    def trim(self, offset: int, length: int) -> None:
        self._writer().trim(offset, length)

    def flush(self) -> None:
        if self.writable:
            self._writer().flush()

    def extents(self, offset: int, length: int, *, first_only: bool = False
                ) -> list[tuple[int, int, bool]]:
        """(offset, length, is_zero) runs from `offset`, covering at most `length` bytes.

        Merges runs, stops early after MAX_EXTENT_BLOCKS blocks (or after one run when
        `first_only`): NBD lets a reply cover less than asked, never more.
        """
        bs = self.disk.block_size
        cap = max(bs, (MAX_EXTENT_BLOCKS * bs) - (offset % bs))
        want = min(length, cap)
        out: list[tuple[int, int, bool]] = []
        for off, n, z in self.disk.extents(offset, want):
            if out and out[-1][2] == z and out[-1][0] + out[-1][1] == off:
                out[-1] = (out[-1][0], out[-1][1] + n, z)
            else:
                if first_only and out:
                    break
                out.append((off, n, z))
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if callable(self._on_close):
            self._on_close()


class Catalogue:
    """Every export of one repository: image points (read-only) and overlays (writable).

    Thread-safe. Point readers are cached (so concurrent connections share decompressed
    blocks); an overlay is opened (its lock taken) when its first connection opens and closed
    (flushed, lock released) when its last connection closes, so `overlay commit` can run while
    the server is up but nobody is connected to that overlay.
    """

    def __init__(self, repo: Repository, *, overlays_only: bool = False,
                 reader_cache: int = 16,
                 allow: Callable[[], frozenset[str]] | None = None) -> None:
        """`allow`: if given, called per listing/open; only points whose id (`SOURCE@ID`) and
        overlays whose `overlay/NAME` it returns are exported (a PXE session's one point)."""
        self.repo = repo
        self.overlays_only = overlays_only
        self.allow = allow
        self._lock = threading.Lock()
        self._readers: OrderedDict[tuple[str, str], list[DiskReader]] = OrderedDict()
        self._reader_cache = reader_cache
        self._overlays: dict[str, _SharedOverlay] = {}

    # -- listing ------------------------------------------------------------------------
    def list_exports(self) -> list[tuple[str, str]]:
        """(name, description) of every export, points first (by source, time), then overlays."""
        out: list[tuple[str, str]] = []
        allowed = self.allow() if self.allow is not None else None
        if not self.overlays_only:
            points = [p for p in self.repo.list_points() if p.kind == "image"]
            latest: dict[str, Point] = {}
            for p in points:
                latest[p.source] = p  # list_points is ordered by time within a source
            if allowed is not None:
                points = [p for p in points if p.name in allowed]
                latest = {s: p for s, p in latest.items() if p.name in allowed}
            for p in points:
                for d in p.manifest["disks"]:
                    out.append((point_export_name(p.name, str(d["name"])),
                                self._point_desc(p, d, None)))
            for source, p in sorted(latest.items()):
                for d in p.manifest["disks"]:
                    out.append((point_export_name(f"{source}@latest", str(d["name"])),
                                self._point_desc(p, d, f"{source}@latest")))
        for o in list_overlays(self.repo):
            if allowed is not None and f"{OVERLAY_PREFIX}{o.name}" not in allowed:
                continue
            for d in o.disks:
                out.append((overlay_export_name(o.name, d.name),
                            f"overlay {o.name} on {o.base} {d.name}, {_human(d.size)}, "
                            "writable copy-on-write"))
        return out

    @staticmethod
    def _point_desc(p: Point, d: dict[str, object], alias: str | None) -> str:
        size = int(str(d["size"]))
        what = f"{alias} = {p.name}" if alias else p.name
        label = p.manifest.get("label")
        extra = f", label {label!r}" if label else ""
        return f"{what} {d['name']}, {_human(size)}, {p.mode} image point{extra}, read-only"

    # -- opening ------------------------------------------------------------------------
    def open(self, name: str, *, readonly: bool) -> Export:
        """Open export `name`. Raises NotFound (no such export), InvalidArgument (bad name),
        Locked (overlay open elsewhere), ChunkMissing/ChunkCorrupt (damaged block map)."""
        if not name:
            raise NotFound("no default export: name one (nbdinfo --list shows them)")
        if name.startswith(OVERLAY_PREFIX):
            return self._open_overlay(name, readonly=readonly)
        if self.overlays_only:
            raise NotFound(f"no export {name!r} (this server exports overlays only)")
        ref, sep, disk = name.rpartition("/")
        if not sep or "@" not in ref:
            raise NotFound(f"no export {name!r} (expected SOURCE@ID/diskN or "
                           "overlay/NAME/diskN)")
        try:
            point = self.repo.resolve(ref)
        except InvalidArgument:
            raise NotFound(f"no export {name!r}") from None
        if point.kind != "image":
            raise NotFound(f"{point.name} is a {point.kind} point: nothing to export")
        if self.allow is not None and point.name not in self.allow():
            raise NotFound(f"no export {name!r} (this server exports only assigned points)")
        for reader in self._point_readers(point):
            if reader.name == disk:
                d = next(x for x in point.manifest["disks"] if x["name"] == disk)
                alias = ref if ref.endswith("@latest") else None
                return Export(name, self._point_desc(point, d, alias), reader, writable=False)
        raise NotFound(f"{point.name} has no disk {disk!r}")

    def _point_readers(self, point: Point) -> list[DiskReader]:
        key = (point.name, point.manifest_id.hex())
        with self._lock:
            readers = self._readers.get(key)
            if readers is not None:
                self._readers.move_to_end(key)
                return readers
        readers = disk_readers(self.repo, point)
        with self._lock:
            readers = self._readers.setdefault(key, readers)
            while len(self._readers) > self._reader_cache:
                self._readers.popitem(last=False)
        return readers

    def _open_overlay(self, name: str, *, readonly: bool) -> Export:
        rest = name[len(OVERLAY_PREFIX):]
        ov_name, sep, disk_name = rest.partition("/")
        if not sep or not ov_name or not disk_name:
            raise NotFound(f"no export {name!r} (expected overlay/NAME/diskN)")
        if self.allow is not None and f"{OVERLAY_PREFIX}{ov_name}" not in self.allow():
            raise NotFound(f"no export {name!r} (this server exports only assigned overlays)")
        with self._lock:
            shared = self._overlays.get(ov_name)
            if shared is None:
                shared = _SharedOverlay(open_overlay(self.repo, ov_name, purpose="nbd server"), 0)
                self._overlays[ov_name] = shared
            try:
                disk = shared.overlay.disk(disk_name)
            except NotFound:
                if shared.refs == 0:
                    self._release(ov_name)
                raise
            shared.refs += 1
        info = shared.overlay.info
        desc = (f"overlay {info.name} on {info.base} {disk.name}, {_human(disk.size)}, "
                + ("read-only (server is read-only)" if readonly else "writable copy-on-write"))
        return Export(name, desc, disk, writable=not readonly,
                      on_close=lambda: self._unref(ov_name))

    def _unref(self, ov_name: str) -> None:
        with self._lock:
            shared = self._overlays.get(ov_name)
            if shared is None:
                return
            shared.refs -= 1
            if shared.refs <= 0:
                self._release(ov_name)

    def _release(self, ov_name: str) -> None:
        """Close an overlay (flush + unlock). Caller holds self._lock."""
        shared = self._overlays.pop(ov_name)
        try:
            shared.overlay.close()
        except (StoreError, OSError):
            log.exception("closing overlay %s failed", ov_name)

    def close(self) -> None:
        """Flush and close every open overlay (server shutdown)."""
        with self._lock:
            for name in list(self._overlays):
                self._release(name)
