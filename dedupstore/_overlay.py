"""Overlays: writable copy-on-write sessions on top of an image point.

Owns the on-disk layout of `<repo>/overlays/<name>/`, the per-overlay writer lock, the
read/write/zero/flush/extents semantics of an overlay disk, and turning an overlay into a new
point (`commit_overlay`). It must never modify the base point, its chunks or its block map:
an overlay is pure addition until it is committed, and committing only adds chunks and a point.

Layout of one overlay (`<repo>/overlays/<name>/`)::

    overlay.json    {"v": 1, "name", "base": "SOURCE@ID", "source", "base_id", "created_ns",
                     "state": "active", "disks": [{"name", "size", "block_size"}],
                     "commits": ["SOURCE@ID", ...]}
    lock            flock'ed (exclusive) by the one process that has the overlay open
    <disk>.delta    sparse file as large as the disk; blocks whose map byte is DELTA live here
    <disk>.map      one byte per block: 0 = BASE (read the point), 1 = DELTA, 2 = ZERO

Every file is 0600 and every directory 0700 (guest data is no one else's to read).

Encrypted repositories (overlay.json "v": 2, "cipher": "aes-256-gcm", "salt"): guest writes
never reach the disk in plaintext. Each block has two slots in `<disk>.delta`, slot s of block b
at (2*b + s) * (block_size + 28), each holding nonce (12 B) + AES-256-GCM(block) + tag (16 B)
under a key derived from the repository's data key and the overlay's salt, with the disk name
and block number as associated data (a block cannot be moved to another place). Map byte 1
(DELTA) = slot 0, 3 (DELTA_B) = slot 1. A slot whose nonce is all zeros was never written or
was punched: it reads as zeros, as a punched plain delta does.

Write ordering: a block's data reaches `<disk>.delta` (pwrite) before its map byte changes, so a
killed server (kill -9: the page cache survives) never maps a block to data it did not write.
`flush()` = fdatasync(delta) then fdatasync(map): every write completed before a flush survives
a power loss. A block that changed from BASE to DELTA after the last flush may, after a power loss
(not a process crash), read as zeros: NBD leaves unflushed writes undefined, and clients that
care (file systems, QEMU) flush.

An encrypted block is never rewritten in place (a torn write would fail its tag and turn the
block into an I/O error): a write goes to the slot the current map does not point to, then the
map byte flips. So a killed server leaves the old or the new block, both whole. For power loss
the slot the last flush made durable is kept too: when a block would be written a second time
since the last flush (its other slot is the durable one), the overlay flushes first. The map is
written to its file before memory, so `flush` can record what it made durable from memory.

Concurrency: one process at a time has an overlay open (flock on `lock`; a second opener gets
`Locked`). Inside that process an `Overlay` is thread-safe: requests for different blocks run in
parallel; a partial-block write (read-modify-write from the base) holds a striped lock for the
blocks it touches, so two concurrent partial writes into the same block never lose each other.
Overlapping concurrent requests are ordered arbitrarily, as on any disk.

Creating an overlay needs no writer lock on the repository; committing one does (it stores
chunks and a point). Deleting a point that overlays stand on must be refused: `overlays_on`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ._blockmap import BlockMapBuilder, zero_runs
from ._codec import Keys
from ._imagepoint import DiskReader, disk_readers
from ._lockfile import take_flock
from ._repo import Point, Repository
from .errors import AlreadyExists, InvalidArgument, NotFound, StoreError
from .formats import ZERO_FP, ZERO_ID, ChunkId, Kind

log = logging.getLogger(__name__)

OVERLAYS_DIR = "overlays"
META_FILE = "overlay.json"
LOCK_FILE = "lock"
CATALOGUE_LOCK = ".lock"

# Map byte values (one per block).
BASE = 0
DELTA = 1  # encrypted overlays: slot 0
ZERO = 2
DELTA_B = 3  # encrypted overlays only: slot 1

SEAL_BYTES = 12 + 16  # nonce + GCM tag of an encrypted block slot
_NO_NONCE = bytes(12)
FILE_MODE = 0o600
DIR_MODE = 0o700

_LOCK_STRIPES = 256
"""Partial-block writes lock `block % _LOCK_STRIPES`: enough parallelism for NBD's request
concurrency (nbdkit runs 16 threads) with a fixed, small number of locks."""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def validate_overlay_name(name: str) -> None:
    """Overlay names become directory names and NBD export names: keep them plain."""
    if not _NAME_RE.match(name):
        raise InvalidArgument(
            f"bad overlay name {name!r} (letters, digits, '.', '_', '-'; at most 100; "
            "must start with a letter or digit)"
        )


def _overlays_root(repo: Repository) -> Path:
    return Path(repo.root) / OVERLAYS_DIR


def _overlay_dir(repo: Repository, name: str) -> Path:
    validate_overlay_name(name)
    return _overlays_root(repo) / name


@dataclass(frozen=True, slots=True)
class OverlayDiskInfo:
    name: str
    size: int
    block_size: int


@dataclass(frozen=True, slots=True)
class OverlayInfo:
    """What `overlay.json` says about one overlay, plus live facts (lock, changed blocks)."""

    name: str
    base: str
    """Name of the base point, `SOURCE@ID` (never `@latest`)."""
    source: str
    base_id: str
    created_ns: int
    state: str
    disks: tuple[OverlayDiskInfo, ...]
    commits: tuple[str, ...]
    path: Path
    in_use: bool = False
    changed_blocks: int = 0
    encrypted: bool = False
    """Guest writes are sealed in the delta (overlays of encrypted repositories)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "base": self.base,
            "source": self.source,
            "base_id": self.base_id,
            "created_ns": self.created_ns,
            "state": self.state,
            "disks": [
                {"name": d.name, "size": d.size, "block_size": d.block_size} for d in self.disks
            ],
            "commits": list(self.commits),
            "path": str(self.path),
            "in_use": self.in_use,
            "changed_blocks": self.changed_blocks,
            "encrypted": self.encrypted,
        }


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads((path / META_FILE).read_text())
    except FileNotFoundError:
        raise NotFound(f"no overlay {path.name!r}") from None
    except ValueError as exc:
        raise StoreError(f"overlay {path.name}: damaged {META_FILE}: {exc}") from exc
    if not isinstance(obj, dict):
        raise StoreError(f"overlay {path.name}: {META_FILE} is not an object")
    return obj


def _write_meta(path: Path, meta: dict[str, Any]) -> None:
    """Replace overlay.json atomically (write, fsync, rename)."""
    tmp = path / f".{META_FILE}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    with os.fdopen(fd, "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / META_FILE)


def _info_from(path: Path, meta: dict[str, Any], *, live: bool) -> OverlayInfo:
    disks = tuple(
        OverlayDiskInfo(str(d["name"]), int(d["size"]), int(d["block_size"])) for d in meta["disks"]
    )
    in_use = False
    changed = 0
    if live:
        in_use = _is_locked(path / LOCK_FILE)
        for d in disks:
            try:
                m = (path / f"{d.name}.map").read_bytes()
            except FileNotFoundError:
                continue
            changed += len(m) - m.count(BASE)
    return OverlayInfo(
        name=str(meta["name"]),
        base=str(meta["base"]),
        source=str(meta["source"]),
        base_id=str(meta["base_id"]),
        created_ns=int(meta["created_ns"]),
        state=str(meta.get("state", "active")),
        disks=disks,
        commits=tuple(str(c) for c in meta.get("commits", ())),
        path=path,
        in_use=in_use,
        changed_blocks=changed,
        encrypted="cipher" in meta,
    )


def _is_locked(lock_path: Path) -> bool:
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock we may just have taken
    return False


def _private_dir(path: Path) -> None:
    """mkdir (if missing) with mode 0700 whatever the umask."""
    try:
        path.mkdir(mode=DIR_MODE)
    except FileExistsError:
        return
    os.chmod(path, DIR_MODE)


def _new_private_file(path: Path, size: int) -> None:
    """Create `path` (0600 whatever the umask) with `size` bytes of holes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


class _DeltaCipher:
    """Seals and opens the block slots of one encrypted overlay disk. Thread-safe."""

    def __init__(self, keys: Keys, salt_hex: str, disk: str, block_size: int) -> None:
        self._aead = AESGCM(keys.subkey(f"overlay {salt_hex}"))
        self.stride = block_size + SEAL_BYTES
        self._aad = b"dr-appliance overlay v2\0" + disk.encode() + b"\0"

    def offset(self, block: int, slot: int) -> int:
        return (2 * block + slot) * self.stride

    def seal(self, block: int, data: bytes | bytearray | memoryview) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(
            nonce, bytes(data), self._aad + block.to_bytes(8, "little")
        )

    def open(self, block: int, blob: bytes, length: int) -> bytes:
        if blob[:12] == _NO_NONCE:
            return bytes(length)  # never written, or punched: zeros
        if len(blob) != length + SEAL_BYTES:
            raise StoreError(f"overlay block {block}: delta file is short")
        try:
            return self._aead.decrypt(blob[:12], blob[12:], self._aad + block.to_bytes(8, "little"))
        except InvalidTag:
            raise StoreError(
                f"overlay block {block}: authentication failed (damaged delta)"
            ) from None


def _take_overlay_lock(path: Path, purpose: str) -> int:
    """Exclusive, non-blocking flock on `<overlay>/lock`. Raises Locked with the holder."""
    return take_flock(path / LOCK_FILE, purpose=purpose, busy=f"overlay {path.name} is in use")


@contextlib.contextmanager
def overlay_catalogue_lock(repo: Repository) -> Iterator[None]:
    """Hold the overlay catalogue lock: no overlay is created while it is held.

    A point delete/prune that wants to be race-free does `with overlay_catalogue_lock(repo):
    if overlays_on(repo, name): refuse; else delete`. `create_overlay` takes the same lock
    around resolving its base point and publishing the overlay. Blocks until acquired.
    """
    root = _overlays_root(repo)
    _private_dir(root)
    fd = os.open(root / CATALOGUE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# -- catalogue ------------------------------------------------------------------------------


def create_overlay(repo: Repository, point_ref: str, name: str) -> OverlayInfo:
    """Create overlay `name` on the image point `point_ref` (e.g. `vm1@latest`).

    Does not need the repository writer lock (a read-only `Repository` is fine). The base is
    recorded by its resolved id, so `@latest` moving on later does not move the overlay.
    Raises InvalidArgument (bad name, not an image point), NotFound, AlreadyExists.
    """
    validate_overlay_name(name)
    root = _overlays_root(repo)
    _private_dir(root)
    final = root / name
    if final.exists():
        raise AlreadyExists(f"overlay {name!r} already exists")
    with overlay_catalogue_lock(repo):
        point = repo.resolve(point_ref)
        if point.kind != "image":
            raise InvalidArgument(f"{point.name} is a {point.kind} point: overlays need an image")
        tmp = root / f".new-{name}-{os.getpid()}-{threading.get_ident()}"
        tmp.mkdir(mode=DIR_MODE)
        os.chmod(tmp, DIR_MODE)
        encrypted = repo.keys is not None
        try:
            disks = []
            for d in point.manifest["disks"]:
                size, bs = int(d["size"]), int(d["block_size"])
                n_blocks = (size + bs - 1) // bs
                # sparse: costs nothing until written
                delta_size = 2 * n_blocks * (bs + SEAL_BYTES) if encrypted else size
                _new_private_file(tmp / f"{d['name']}.delta", delta_size)
                _new_private_file(tmp / f"{d['name']}.map", n_blocks)  # all BASE
                disks.append({"name": str(d["name"]), "size": size, "block_size": bs})
            meta: dict[str, Any] = {
                "v": 2 if encrypted else 1,
                "name": name,
                "base": point.name,
                "source": point.source,
                "base_id": point.id,
                "created_ns": time.time_ns(),
                "state": "active",
                "disks": disks,
                "commits": [],
            }
            if encrypted:
                meta["cipher"] = "aes-256-gcm"
                meta["salt"] = os.urandom(16).hex()
            _write_meta(tmp, meta)
            _new_private_file(tmp / LOCK_FILE, 0)
            try:
                os.rename(tmp, final)  # atomic publish; fails if `final` appeared meanwhile
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise AlreadyExists(f"overlay {name!r} already exists") from None
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("created overlay %s on %s", name, point.name)
    return _info_from(final, meta, live=False)


def list_overlays(repo: Repository) -> list[OverlayInfo]:
    """Every overlay, by name. Damaged entries are logged and skipped."""
    root = _overlays_root(repo)
    if not root.is_dir():
        return []
    out = []
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or not path.is_dir():
            continue
        try:
            out.append(_info_from(path, _read_meta(path), live=True))
        except (StoreError, KeyError, TypeError, ValueError) as exc:
            log.warning("skipping damaged overlay %s: %s", path.name, exc)
    return out


def overlay_info(repo: Repository, name: str) -> OverlayInfo:
    path = _overlay_dir(repo, name)
    return _info_from(path, _read_meta(path), live=True)


def overlays_on(repo: Repository, point_name: str) -> list[str]:
    """Names of the overlays whose base is `point_name` (`SOURCE@ID`): it must not be deleted."""
    return [o.name for o in list_overlays(repo) if o.base == point_name]


def drop_overlay(repo: Repository, name: str) -> None:
    """Delete an overlay and its delta. Raises NotFound, Locked (open in a server)."""
    path = _overlay_dir(repo, name)
    if not (path / META_FILE).exists():
        raise NotFound(f"no overlay {name!r}")
    fd = _take_overlay_lock(path, "drop")
    try:
        trash = _overlays_root(repo) / f".drop-{name}-{os.getpid()}-{time.time_ns()}"
        os.rename(path, trash)  # atomic: the overlay is gone for everyone from here on
    finally:
        os.close(fd)
    shutil.rmtree(trash, ignore_errors=True)
    log.info("dropped overlay %s", name)


def sync_overlays(repo_root: Path | str) -> int:
    """fdatasync every overlay's delta, then its map, from any process; returns the count.

    For a server that was killed (SIGKILL) with clients connected: its completed writes are in
    the page cache; this makes them durable as a FLUSH would have. Needs no passphrase and no
    lock (fsync flushes the inode's dirty pages whoever wrote them).
    """
    root = Path(repo_root) / OVERLAYS_DIR
    if not root.is_dir():
        return 0
    n = 0
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or not path.is_dir():
            continue
        for suffix in (".delta", ".map"):  # data before map, as in OverlayDisk.flush
            for f in sorted(path.glob(f"*{suffix}")):
                try:
                    fd = os.open(f, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue  # dropped meanwhile
                try:
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
        n += 1
    return n


# -- open overlays --------------------------------------------------------------------------


class OverlayDisk:
    """One disk of an open overlay: read/write/zero/flush/extents. Thread-safe.

    Offsets and lengths are bytes. Ranges beyond the disk raise InvalidArgument (writes:
    OutOfSpace semantics are the front-end's business: NBD servers check bounds first).
    Reads of damaged base blocks raise ChunkMissing / ChunkCorrupt; never wrong data.
    """

    def __init__(
        self,
        path: Path,
        base: DiskReader,
        info: OverlayDiskInfo,
        cipher: _DeltaCipher | None = None,
    ) -> None:
        self.name = info.name
        self.size = info.size
        self.block_size = info.block_size
        self.n_blocks = (self.size + self.block_size - 1) // self.block_size
        self._base = base
        if base.size != self.size or base.block_size != self.block_size:
            raise StoreError(f"overlay disk {self.name} does not match its base point")
        self._delta_fd = os.open(path / f"{self.name}.delta", os.O_RDWR | os.O_CLOEXEC)
        self._map_fd = os.open(path / f"{self.name}.map", os.O_RDWR | os.O_CLOEXEC)
        self._map = bytearray(os.pread(self._map_fd, self.n_blocks, 0))
        if len(self._map) != self.n_blocks:
            # a crash during create cannot cause this (create publishes by rename): damage
            raise StoreError(
                f"overlay disk {self.name}: map has {len(self._map)} bytes, "
                f"expected {self.n_blocks}"
            )
        self._stripes = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        self._closed = False
        self._cipher = cipher
        if cipher is not None:
            # What a power loss keeps: make it so now, then track it (see the module doc).
            os.fdatasync(self._delta_fd)
            os.fdatasync(self._map_fd)
        self._durable = bytes(self._map)

    # -- helpers ------------------------------------------------------------------------
    def size_bytes(self) -> int:
        return self.size

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidArgument(
                f"range {offset}+{length} is outside disk {self.name} ({self.size} bytes)"
            )

    def _block_len(self, b: int) -> int:
        return min(self.block_size, self.size - b * self.block_size)

    def _read_block(self, b: int, *, locked: bool = False) -> bytes:
        """Block `b` as it reads now. `locked`: the caller holds b's stripe lock."""
        state = self._map[b]
        if self._cipher is not None and state in (DELTA, DELTA_B):
            if locked:
                return self._read_slot(b)
            with self._stripes[b % _LOCK_STRIPES]:  # no writer reuses the slot meanwhile
                return self._read_slot(b)
        if state == DELTA:
            n = self._block_len(b)
            data = os.pread(self._delta_fd, n, b * self.block_size)
            if len(data) != n:
                raise StoreError(f"overlay disk {self.name}: delta file is short at block {b}")
            return data
        if state == ZERO:
            return bytes(self._block_len(b))
        return self._base.block(b)

    def _read_slot(self, b: int) -> bytes:
        """An encrypted block (stripe lock held), or its base/zeros if it changed meanwhile."""
        assert self._cipher is not None
        state = self._map[b]
        if state not in (DELTA, DELTA_B):
            return self._read_block(b, locked=True)
        n = self._block_len(b)
        blob = os.pread(self._delta_fd, n + SEAL_BYTES, self._cipher.offset(b, state // 2))
        return self._cipher.open(b, blob, n)

    def _target_slot(self, b: int) -> int:
        """The slot an encrypted write of block `b` goes to (stripe lock held): never the
        one the map points to, nor the one the last flush made durable (flush first)."""
        cur, dur = self._map[b], self._durable[b]
        cur_slot = cur // 2 if cur in (DELTA, DELTA_B) else None
        dur_slot = dur // 2 if dur in (DELTA, DELTA_B) else None
        if cur_slot is None:
            return 0 if dur_slot is None else 1 - dur_slot
        if 1 - cur_slot == dur_slot:
            self.flush()  # the current slot becomes the durable one
        return 1 - cur_slot

    def _put_blocks(self, first: int, data: memoryview | bytearray) -> None:
        """Write whole blocks starting at `first` (the last may be the short tail), data
        before map. Stripe locks of the blocks are held."""
        bs = self.block_size
        n = (len(data) + bs - 1) // bs
        if self._cipher is None:
            os.pwrite(self._delta_fd, data, first * bs)
            self._set_map(first, bytes([DELTA]) * n)
            return
        states = bytearray(n)
        for i in range(n):
            b = first + i
            slot = self._target_slot(b)
            blob = self._cipher.seal(b, data[i * bs : (i + 1) * bs])
            os.pwrite(self._delta_fd, blob, self._cipher.offset(b, slot))
            states[i] = DELTA_B if slot else DELTA
        self._set_map(first, bytes(states))

    def _set_map(self, first: int, states: bytes) -> None:
        """Publish map bytes for blocks [first, first+len(states)): after their data. The file
        first, then memory: what `flush` sees in memory is in the file's page cache."""
        os.pwrite(self._map_fd, states, first)
        self._map[first : first + len(states)] = states

    @contextlib.contextmanager
    def _locked(self, first: int, last: int) -> Iterator[None]:
        """Lock the stripes of blocks [first, last) in a fixed order (no deadlock)."""
        idx = sorted({b % _LOCK_STRIPES for b in range(first, min(last, first + _LOCK_STRIPES))})
        locks = [self._stripes[i] for i in idx]
        for lk in locks:
            lk.acquire()
        try:
            yield
        finally:
            for lk in reversed(locks):
                lk.release()

    # -- operations ---------------------------------------------------------------------
    def pread(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        if length == 0:
            return b""
        bs = self.block_size
        parts = []
        pos, end = offset, offset + length
        while pos < end:
            b = pos // bs
            start = pos - b * bs
            take = min(end - pos, self._block_len(b) - start)
            if self._map[b] == DELTA and self._cipher is None:
                # read just the slice: no need to fetch the whole block
                data = os.pread(self._delta_fd, take, pos)
                if len(data) != take:
                    raise StoreError(f"overlay disk {self.name}: delta file is short")
                parts.append(data)
            else:
                parts.append(self._read_block(b)[start : start + take])
            pos += take
        return b"".join(parts)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write `data` at `offset`. Partial blocks are completed from the current content."""
        self._write(offset, memoryview(data).cast("B"), len(data))

    def write_zeroes(self, offset: int, length: int) -> None:
        """Zero a range: whole blocks become ZERO (and their delta is punched), edges RMW."""
        self._write(offset, None, length)

    def trim(self, offset: int, length: int) -> None:
        """Discard a range. Implemented as write_zeroes so a trimmed range reads as zeros."""
        self._write(offset, None, length)

    def _write(self, offset: int, data: memoryview | None, length: int) -> None:
        self._check(offset, length)
        if length == 0:
            return
        bs = self.block_size
        end = offset + length
        first, last = offset // bs, (end + bs - 1) // bs
        with self._locked(first, last):
            full_first = (offset + bs - 1) // bs
            full_last = end // bs if end < self.size else last  # the short tail block is whole
            # 1. partial head/tail blocks: read-modify-write into the delta
            for b in sorted({first, last - 1}):
                if full_first <= b < full_last:
                    continue
                old = bytearray(self._read_block(b, locked=True))
                lo = max(offset, b * bs) - b * bs
                hi = min(end, b * bs + len(old)) - b * bs
                if data is None:
                    old[lo:hi] = bytes(hi - lo)
                else:
                    src = max(offset, b * bs) - offset
                    old[lo:hi] = data[src : src + hi - lo]
                if data is None and not any(old):
                    self._zero_blocks(b, b + 1)
                else:
                    self._put_blocks(b, old)
            # 2. whole blocks: one write, then their map bytes
            if full_first < full_last:
                if data is None:
                    self._zero_blocks(full_first, full_last)
                else:
                    lo = full_first * bs - offset
                    hi = min(full_last * bs, self.size) - offset
                    self._put_blocks(full_first, data[lo:hi])

    def _zero_blocks(self, first: int, last: int) -> None:
        """Mark blocks ZERO, then free their delta space (map first: a read racing the punch
        then sees ZERO or still-valid delta data, both zeros)."""
        self._set_map(first, bytes([ZERO]) * (last - first))
        bs = self.block_size
        start, length = first * bs, min(last * bs, self.size) - first * bs
        if self._cipher is not None:  # both slots of each block
            start = self._cipher.offset(first, 0)
            length = self._cipher.offset(last, 0) - start
        try:
            _punch_hole(self._delta_fd, start, length)
        except OSError as exc:  # not fatal: the map already says ZERO
            log.debug("punch hole in %s failed: %s", self.name, exc)

    def flush(self) -> None:
        """Make every completed write durable: fdatasync the delta, then the map."""
        snapshot = bytes(self._map)  # every flip in it is already in the map file
        os.fdatasync(self._delta_fd)
        os.fdatasync(self._map_fd)
        self._durable = snapshot

    def extents(
        self, offset: int = 0, length: int | None = None
    ) -> Iterator[tuple[int, int, bool]]:
        """Runs of (offset, length, is_zero) covering [offset, offset+length)."""
        end = self.size if length is None else min(self.size, offset + length)
        bs = self.block_size
        first, last = offset // bs, (end + bs - 1) // bs
        states = self._map
        flags = (
            states[first + i] == ZERO or (states[first + i] == BASE and cid == ZERO_ID)
            for i, (cid, _fp) in enumerate(self._base.map.entries(first, last))
        )
        yield from zero_runs(offset, end, bs, flags)

    def states(self) -> bytes:
        """A copy of the block map (BASE/DELTA/ZERO per block)."""
        return bytes(self._map)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        os.close(self._delta_fd)
        os.close(self._map_fd)


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02  # linux/falloc.h; Python's os module has no fallocate(2)
_libc: ctypes.CDLL | None = None


def _punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the delta space of zeroed blocks (the file keeps its size)."""
    global _libc
    if length <= 0:
        return
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    rc = _libc.fallocate(
        ctypes.c_int(fd),
        ctypes.c_int(_FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE),
        ctypes.c_long(offset),
        ctypes.c_long(length),
    )
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class Overlay:
    """An open overlay: holds its lock until `close()`. Use as a context manager.

    `disks` are in the base point's order; `disk(name)` finds one. Thread-safe.
    """

    def __init__(self, repo: Repository, info: OverlayInfo, base: Point, lock_fd: int) -> None:
        self.repo = repo
        self.info = info
        self.base = base
        self._lock_fd: int | None = lock_fd
        self.disks: list[OverlayDisk] = []
        try:
            meta = _read_meta(info.path)
            salt = meta.get("salt") if meta.get("cipher") == "aes-256-gcm" else None
            if meta.get("cipher") is not None and (salt is None or repo.keys is None):
                raise StoreError(f"overlay {info.name}: encrypted, and this repository is not")
            readers = {r.name: r for r in disk_readers(repo, base)}
            for d in info.disks:
                reader = readers.get(d.name)
                if reader is None:
                    raise StoreError(f"overlay {info.name}: base {base.name} has no {d.name}")
                cipher = None
                if salt is not None and repo.keys is not None:
                    cipher = _DeltaCipher(repo.keys, str(salt), d.name, d.block_size)
                self.disks.append(OverlayDisk(info.path, reader, d, cipher))
        except BaseException:
            self.close()
            raise

    @property
    def name(self) -> str:
        return self.info.name

    def disk(self, name: str) -> OverlayDisk:
        for d in self.disks:
            if d.name == name:
                return d
        raise NotFound(f"overlay {self.info.name} has no disk {name!r}")

    def flush(self) -> None:
        for d in self.disks:
            d.flush()

    def close(self) -> None:
        """Flush and release the lock. Idempotent."""
        if self._lock_fd is None:
            return
        try:
            for d in self.disks:
                try:
                    d.flush()
                finally:
                    d.close()
        finally:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Overlay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_overlay(repo: Repository, name: str, *, purpose: str = "open") -> Overlay:
    """Open overlay `name` for reading and writing; takes its lock (raises Locked if another
    process or another `Overlay` object has it). `repo` may be read-only. Raises NotFound
    (no overlay, or its base point is gone)."""
    path = _overlay_dir(repo, name)
    meta = _read_meta(path)
    info = _info_from(path, meta, live=False)
    fd = _take_overlay_lock(path, purpose)
    try:
        try:
            base = repo.resolve(info.base)
        except NotFound:
            raise NotFound(f"overlay {name}: its base point {info.base} is gone") from None
    except BaseException:
        os.close(fd)
        raise
    return Overlay(repo, info, base, fd)


# -- commit ---------------------------------------------------------------------------------


def commit_overlay(repo: Repository, name: str, *, label: str | None = None) -> Point:
    """Turn the overlay's current disks into a new point of the base's source.

    The new point has `mode` "overlay-commit" and `parent` = the base point id. Unchanged
    blocks reuse the base block-map entries without reading them; DELTA blocks are hashed and
    stored (all-zero ones become the zero id); ZERO blocks cost nothing. The overlay stays as
    it is (still on its base) and records the commit; drop it when done. Needs a writable
    repository (the writer lock) and the overlay lock (raises Locked while a server has it
    open). Raises ReadOnly, NotFound, Locked, ChunkMissing/ChunkCorrupt (damaged base pages).
    """
    if not repo.writable:
        from .errors import ReadOnly

        raise ReadOnly("committing an overlay needs the repository writer")
    started = time.time()
    with open_overlay(repo, name, purpose="commit") as ov:
        disks: list[dict[str, Any]] = []
        stats = {
            "logical_bytes": 0,
            "reused_blocks": 0,
            "zero_blocks": 0,
            "hashed_blocks": 0,
            "new_chunks": 0,
            "stored_bytes": 0,
        }
        base_disks = {str(d["name"]): d for d in ov.base.manifest["disks"]}

        def put_page(page: bytes) -> ChunkId:
            res = repo.put(Kind.PAGE, page)
            stats["stored_bytes"] += res.stored_bytes
            return res.chunk_id

        for disk in ov.disks:
            builder = BlockMapBuilder(disk.n_blocks, put_page)
            states = disk.states()
            bs = disk.block_size
            for b, (cid, fp) in enumerate(disk._base.map.entries(0, disk.n_blocks)):
                state = states[b]
                if state == BASE:
                    builder.add(cid, fp)
                    stats["zero_blocks" if cid == ZERO_ID else "reused_blocks"] += 1
                    continue
                if state == ZERO:
                    builder.add(ZERO_ID, ZERO_FP)
                    stats["zero_blocks"] += 1
                    continue
                blk = disk._read_block(b)
                if not any(blk):
                    builder.add(ZERO_ID, ZERO_FP)
                    stats["zero_blocks"] += 1
                    continue
                res = repo.put(Kind.BLOCK, blk)
                stats["hashed_blocks"] += 1
                if not res.duplicate:
                    stats["new_chunks"] += 1
                    stats["stored_bytes"] += res.stored_bytes
                builder.add(res.chunk_id, xxhash.xxh3_128_digest(blk))
            root = builder.finish()
            stats["logical_bytes"] += disk.size
            bd = base_disks.get(disk.name, {})
            disks.append(
                {
                    "name": disk.name,
                    "size": disk.size,
                    "block_size": bs,
                    "root": root,
                    "depth": builder.depth,
                    **({"path": bd["path"]} if "path" in bd else {}),
                }
            )
        now = time.time_ns()
        manifest: dict[str, Any] = {
            "v": 1,
            "kind": "image",
            "source": ov.base.source,
            "id": repo.new_point_id(ov.base.source, now),
            "time_ns": now,
            "mode": "overlay-commit",
            "parent": ov.base.id,
            "disks": disks,
            "used_only": False,
            "host": socket.gethostname(),
            "label": label if label is not None else f"overlay {name}",
            "overlay": name,
            "stats": {**stats, "duration_s": round(time.time() - started, 3)},
        }
        point = repo.commit_point(manifest)
        meta = _read_meta(ov.info.path)
        meta["commits"] = [*meta.get("commits", []), point.name]
        _write_meta(ov.info.path, meta)
    log.info("committed overlay %s as %s", name, point.name)
    return point


__all__ = [
    "Overlay",
    "OverlayDisk",
    "OverlayDiskInfo",
    "OverlayInfo",
    "commit_overlay",
    "create_overlay",
    "drop_overlay",
    "list_overlays",
    "open_overlay",
    "overlay_catalogue_lock",
    "overlay_info",
    "overlays_on",
    "sync_overlays",
    "validate_overlay_name",
]
