"""The repository: config + keys + packs + index, behind one synchronous object.

Owns the chunk layer (put/get/has), the writer lock, crash recovery of unsealed packs, and
the point catalogue. Reads are thread-safe; writes happen on the one writer thread of the
one writer process (an flock on `lock` enforces the process part).

Durability protocol: chunk payloads go to the open pack; `flush` seals the pack (table,
footer, fsync) and only then commits its entries to the index. A point becomes visible in
the same commit that indexes the pack holding its manifest, after every pack it references
was sealed. A killed writer leaves an unsealed pack: the next writer salvages every intact
entry into the index (so a re-run of the same backup finds those chunks), and a reader never
sees a point whose chunks are not durable.

Healing: a chunk that `verify` found damaged is marked bad in the index and counts as
absent to `has`/`has_many`, so the next backup that produces it stores a fresh copy, and
indexing that copy clears the mark. Every read-only open holds a reader lease
(_readers.py) that GC and `rebuild_index` honour. Deleted points keep their record (in the
index's `deleted` table) until GC purges it after the grace period.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from ._codec import ChunkCodec, Keys, parse_compression
from ._config import (
    DIR_MODE,
    RepoConfig,
    check_keys,
    new_config,
    read_config,
    unwrap_keys,
    write_config,
)
from ._index import Index, Loc, point_key
from ._lockfile import take_flock
from ._pack import PackWriter, pack_path, scan_pack
from ._readers import ReaderLease
from .errors import (
    ChunkCorrupt,
    ChunkMissing,
    FormatError,
    InvalidArgument,
    Locked,
    NotFound,
    OutOfSpace,
    ReadOnly,
    StoreError,
)
from .formats import (
    ENTRY_HEADER,
    ENTRY_HEADER_CRC_SPAN,
    ENTRY_TAG,
    PACK_HEADER,
    PACK_SUFFIX,
    ZERO_ID,
    ChunkId,
    Kind,
)

log = logging.getLogger(__name__)

DEFAULT_TIER = "capacity"
POINT_ID_FORMAT = "%Y%m%dT%H%M%SZ"


@dataclass(frozen=True, slots=True)
class PutResult:
    chunk_id: ChunkId
    stored_bytes: int
    duplicate: bool


@dataclass(frozen=True, slots=True)
class Point:
    """A backup point as listed in the catalogue. `manifest` is the decoded manifest."""

    source: str
    id: str
    manifest: dict[str, Any]
    manifest_id: ChunkId
    locked_until: float | None = None

    @property
    def name(self) -> str:
        return f"{self.source}@{self.id}"

    @property
    def kind(self) -> str:
        return str(self.manifest["kind"])

    @property
    def mode(self) -> str:
        return str(self.manifest.get("mode", "full"))

    @property
    def time_ns(self) -> int:
        return int(self.manifest["time_ns"])

    @property
    def parent(self) -> str | None:
        p = self.manifest.get("parent")
        return None if p is None else str(p)


@dataclass
class _Pending:
    """Entries written to the open pack but not yet committed to the index."""

    writer: PackWriter
    ids: dict[bytes, Loc] = field(default_factory=dict)


def split_ref(ref: str) -> tuple[str, str]:
    """'vm1@latest' -> ('vm1', 'latest'); a bare name means latest."""
    source, sep, pid = ref.partition("@")
    if not source:
        raise InvalidArgument(f"bad point reference {ref!r} (expected NAME@ID or NAME@latest)")
    return source, (pid if sep else "latest")


def validate_source_name(name: str) -> None:
    if not name or "/" in name or "@" in name or "\0" in name or name in (".", ".."):
        raise InvalidArgument(f"bad source name {name!r} (no '/', '@', NUL; not empty)")


class Repository:
    """One open repository. Use `Repository.open(...)` or `Repository.create(...)`."""

    def __init__(
        self,
        root: Path,
        cfg: RepoConfig,
        codec: ChunkCodec,
        index: Index,
        lock_fd: int | None,
        lease: ReaderLease | None = None,
    ) -> None:
        self.root = root
        self.config = cfg
        self.codec = codec
        self.index = index
        self.block_size = cfg.block_size
        self._lock_fd = lock_fd
        self._pending: _Pending | None = None
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._fd_lock = threading.Lock()
        self._closed = False
        self._lease = lease

    # -- lifecycle ----------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        root: Path,
        *,
        block_size: int = 65536,
        hash_name: str = "sha256",
        compression: str = "zstd",
        encryption: str = "none",
        passphrase: str | None = None,
        immutable: bool = False,
    ) -> None:
        """Create an empty repository at `root` (absent or empty). Every directory is made
        0700 and every file 0600, whatever the umask: packs and the index are no one else's
        to read. `immutable` (Veeam's hardened repository): a lock can only be extended and a
        locked point never deleted, not even with force; it can never be turned off."""
        root = Path(root)
        if (root / "config.json").exists():
            raise InvalidArgument(f"a repository already exists at {root}")
        if root.exists() and any(p.name not in ("lost+found",) for p in root.iterdir()):
            raise InvalidArgument(f"{root} exists and is not empty")
        codec, level = parse_compression(compression)
        cfg, _keys = new_config(
            block_size=block_size,
            hash_name=hash_name,
            compression=f"{codec.name.lower()},{level}",
            encryption=encryption,
            passphrase=passphrase,
            immutable=immutable,
        )
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, DIR_MODE)
        (root / "packs").mkdir(mode=DIR_MODE, exist_ok=True)
        os.chmod(root / "packs", DIR_MODE)
        Index(root / "index", readonly=False).close()
        write_config(root, cfg)

    @classmethod
    def open(
        cls,
        root: Path,
        *,
        passphrase: str | None = None,
        writable: bool = False,
        keys: Keys | None = None,
    ) -> Repository:
        """Open the repository at `root`. An encrypted one needs its `passphrase`, or its
        already unwrapped `keys` (handed over by a parent: `inherited_keys`). Raises NotFound,
        WrongPassphrase, FormatError, Locked (writable: another writer runs)."""
        root = Path(root)
        cfg = read_config(root)
        if keys is not None and cfg.key is not None:
            check_keys(cfg, keys)
        else:
            keys = unwrap_keys(cfg, passphrase)
        codec_id, level = parse_compression(cfg.compression)
        codec = ChunkCodec(cfg.hash, codec_id, level, keys)
        lock_fd = _take_writer_lock(root) if writable else None
        # A reader's lease is taken before it reads the catalogue: GC keeps every point
        # deleted after the lease started (the reader may have seen it).
        lease = None if writable else ReaderLease.take(root)
        try:
            index = Index(root / "index", readonly=not writable, keys=keys)
        except Exception:
            if lock_fd is not None:
                os.close(lock_fd)
            if lease is not None:
                lease.release()
            raise
        repo = cls(root, cfg, codec, index, lock_fd, lease)
        if writable:
            repo._recover()
        return repo

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._pending is not None:
                self._pending.writer.abort()
                self._pending = None
        finally:
            with self._fd_lock:
                for fd in self._fds.values():
                    os.close(fd)
                self._fds.clear()
            self.index.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
            if self._lease is not None:
                self._lease.release()
                self._lease = None

    @property
    def keys(self) -> Keys | None:
        """The unwrapped keys (None: unencrypted), e.g. to hand to a child: KeyHandoff."""
        return self.codec.keys

    @property
    def writable(self) -> bool:
        return self._lock_fd is not None

    def _need_writer(self) -> None:
        if not self.writable:
            raise ReadOnly("repository opened read-only")

    # -- crash recovery -----------------------------------------------------------------
    def _recover(self) -> None:
        """Finish deletions of a crashed GC; salvage packs the index does not know."""
        pending = self.index.get_meta("pending_delete") or []
        known = self.index.all_packs()
        for pid, tier in pending:
            if pid in known:
                continue  # still referenced: the GC commit did not happen
            with contextlib.suppress(FileNotFoundError):
                pack_path(self.root, tier, pid).unlink()
        if pending:
            self.index.commit(meta=[("pending_delete", None)])
        max_id = max(known, default=0)
        for path in sorted((self.root / "packs").glob(f"*/*/*{PACK_SUFFIX}")):
            try:
                pid = int(path.stem, 16)
            except ValueError:
                continue
            max_id = max(max_id, pid)
            if pid in known:
                continue
            try:
                self._salvage(path)
            except OutOfSpace:
                log.warning(
                    "disk full: cannot index the unfinished pack %s; "
                    "'appliance gc' deletes it to free space",
                    path.name,
                )
        next_id = self.index.get_meta("next_pack") or 1
        if next_id <= max_id:
            self.index.commit(meta=[("next_pack", max_id + 1)])

    def _salvage(self, path: Path) -> None:
        try:
            if path.stat().st_size < PACK_HEADER.size:  # killed between create and header
                log.info("removing unsealed pack %s that has no header yet", path)
                path.unlink()
                return
            scan = scan_pack(path)
        except (FormatError, OSError) as exc:
            log.warning(
                "ignoring unreadable pack %s: %s (gc moves it to quarantine/; "
                "appliance repair --rebuild-index salvages its intact entries)",
                path,
                exc,
            )
            return
        if not scan.entries:
            log.info("removing empty unsealed pack %s", path)
            path.unlink()
            return
        log.info(
            "salvaged %d chunks from %s pack %s",
            len(scan.entries),
            "sealed" if scan.sealed else "unsealed",
            path.name,
        )
        self.index.commit(
            chunks=[
                (e.chunk_id, (scan.pack_id, e.offset, e.stored_len, e.raw_len, e.kind, e.codec))
                for e in scan.entries
            ],
            packs=[
                (scan.pack_id, {"tier": scan.tier, "size": scan.valid_end, "sealed": scan.sealed})
            ],
            meta=self._writing_without(scan.pack_id),
            only_new_chunks=True,
        )

    # -- packs being written ------------------------------------------------------------
    def writing_packs(self) -> set[int]:
        """Packs this repository's writer created and has not indexed yet (meta `writing`).

        Only these (and provably empty packs) may GC delete unindexed: they hold nothing a
        committed point references.
        """
        return {int(x) for x in self.index.get_meta("writing") or []}

    def open_pack_id(self) -> int | None:
        """The pack being written now (not indexed until the next flush), if any."""
        return self._pending.writer.pack_id if self._pending is not None else None

    def _writing_without(self, pack_id: int) -> list[tuple[str, Any]]:
        writing = self.writing_packs()
        if pack_id not in writing:
            return []
        writing.discard(pack_id)
        return [("writing", sorted(writing) or None)]

    # -- chunk layer --------------------------------------------------------------------
    def chunk_id(self, data: bytes | memoryview) -> ChunkId:
        return self.codec.chunk_id(data)

    def has(self, cid: bytes) -> bool:
        """Whether the chunk is stored and not marked bad (a bad one counts as absent)."""
        if cid == ZERO_ID:
            return True
        if self._pending is not None and cid in self._pending.ids:
            return True
        return self.index.has_many([cid])[0]

    def has_many(self, cids: list[bytes]) -> list[bool]:
        """`has` for a batch, in one index transaction."""
        out = self.index.has_many(cids)
        pend = self._pending.ids if self._pending is not None else {}
        return [known or c == ZERO_ID or c in pend for c, known in zip(cids, out, strict=True)]

    def bad_chunks(self) -> dict[ChunkId, dict[str, Any]]:
        """Chunks `verify` marked damaged: id -> {loc, reason, time_ns, points}."""
        return self.index.bad_chunks()

    def put(self, kind: Kind, data: bytes, cid: ChunkId | None = None) -> PutResult:
        """Store one chunk unless present. Writer thread only."""
        if cid is None:
            cid = self.codec.chunk_id(data)
        if self.has(cid):
            return PutResult(cid, 0, True)
        codec, payload = self.codec.seal(kind, cid, data)
        return PutResult(cid, self.put_sealed(kind, cid, codec, payload, len(data)), False)

    def put_sealed(self, kind: int, cid: bytes, codec: int, payload: bytes, raw_len: int) -> int:
        """Append an already sealed payload (pipeline path). Returns bytes added, 0 if dup."""
        self._need_writer()
        if self._pending is not None and cid in self._pending.ids:
            return 0
        if self._pending is None:
            self._pending = _Pending(self._new_pack_writer())
        w = self._pending.writer
        added = w.add(ChunkId(cid), kind, codec, payload, raw_len)
        e = w.entries[-1]
        self._pending.ids[cid] = (w.pack_id, e.offset, e.stored_len, e.raw_len, kind, codec)
        if w.size >= self.config.pack_target_bytes:
            self.flush()
        return added

    def _new_pack_writer(self, tier: str = DEFAULT_TIER) -> PackWriter:
        pid = int(self.index.get_meta("next_pack") or 1)
        # recorded before the file exists: GC may delete an unindexed pack only if we wrote it
        writing = sorted(self.writing_packs() | {pid})
        self.index.commit(meta=[("next_pack", pid + 1), ("writing", writing)])
        return PackWriter(self.root, tier, pid)

    def flush(
        self,
        *,
        points: list[tuple[bytes, dict[str, Any] | None]] | None = None,
        files: list[tuple[bytes, dict[str, Any] | None]] | None = None,
        meta: list[tuple[str, Any]] | None = None,
        deleted: list[tuple[bytes, dict[str, Any] | None]] | None = None,
    ) -> None:
        """Seal the open pack, then commit its entries (and catalogue changes) durably."""
        chunks: list[tuple[bytes, Loc]] = []
        packs: list[tuple[int, dict[str, Any]]] = []
        meta = list(meta or ())
        if self._pending is not None:
            p, self._pending = self._pending, None
            try:
                p.writer.seal()
            except BaseException:
                p.writer.abort()  # the unsealed pack stays for the next writer to salvage
                raise
            chunks = list(p.ids.items())
            packs = [
                (p.writer.pack_id, {"tier": p.writer.tier, "size": p.writer.size, "sealed": True})
            ]
            meta += self._writing_without(p.writer.pack_id)
        if chunks or points or files or meta or deleted:
            self.index.commit(
                chunks=chunks,
                packs=packs,
                points=points or (),
                files=files or (),
                meta=meta,
                deleted=deleted or (),
            )

    def _pack_fd(self, pack_id: int) -> int:
        with self._fd_lock:
            fd = self._fds.get(pack_id)
            if fd is not None:
                self._fds.move_to_end(pack_id)
                return fd
        info = self.index.pack_info(pack_id)
        if info is None:
            raise ChunkMissing(f"pack {pack_id:016x} is not in the index")
        path = pack_path(self.root, str(info["tier"]), pack_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ChunkMissing(f"pack file {path} is missing") from None
        with self._fd_lock:
            old = self._fds.get(pack_id)
            if old is not None:
                os.close(fd)
                return old
            self._fds[pack_id] = fd
            while len(self._fds) > 256:
                _pid, ofd = self._fds.popitem(last=False)
                os.close(ofd)
        return fd

    def orphan_packs(self) -> list[Path]:
        """Pack files on disk that the index does not know (not even the open one)."""
        known = self.index.all_packs()
        current = self._pending.writer.pack_id if self._pending is not None else None
        out = []
        for path in (self.root / "packs").glob(f"*/*/*{PACK_SUFFIX}"):
            try:
                pid = int(path.stem, 16)
            except ValueError:
                continue
            if pid not in known and pid != current:
                out.append(path)
        return out

    def forget_pack_fd(self, pack_id: int) -> None:
        with self._fd_lock:
            fd = self._fds.pop(pack_id, None)
        if fd is not None:
            os.close(fd)

    def read_raw(self, cid: bytes, loc: Loc) -> bytes:
        """The stored payload of a chunk; its entry header (crc, id, lengths) is checked."""
        pack_id, offset, stored_len, raw_len, kind, codec = loc
        fd = self._pack_fd(pack_id)
        head_off = offset - ENTRY_HEADER.size
        blob = os.pread(fd, ENTRY_HEADER.size + stored_len, head_off)
        if len(blob) != ENTRY_HEADER.size + stored_len:
            raise ChunkCorrupt(f"chunk {cid.hex()[:16]}: pack {pack_id:016x} is truncated")
        fields = ENTRY_HEADER.unpack_from(blob)
        payload = blob[ENTRY_HEADER.size :]
        tag, h_kind, h_codec, _flags, h_id, h_stored, h_raw, _crc, h_crc = fields
        if (
            tag != ENTRY_TAG
            or h_id != cid
            or zlib.crc32(blob[:ENTRY_HEADER_CRC_SPAN]) != h_crc
            or (h_kind, h_codec, h_stored, h_raw) != (kind, codec, stored_len, raw_len)
        ):
            raise ChunkCorrupt(
                f"chunk {cid.hex()[:16]}: entry header damaged in pack {pack_id:016x}"
            )
        if zlib.crc32(payload) != fields[7]:
            raise ChunkCorrupt(f"chunk {cid.hex()[:16]}: checksum mismatch in pack {pack_id:016x}")
        return payload

    def get(self, cid: bytes, *, verify_id: bool = False) -> bytes:
        """Plaintext of a chunk. Raises ChunkMissing / ChunkCorrupt, never returns bad data.

        Thread-safe. Payload crc (and the GCM tag when encrypted) is always checked;
        `verify_id` also re-hashes the plaintext against the id (what `verify` does).
        """
        if cid == ZERO_ID:
            raise InvalidArgument("the zero id has no stored chunk")
        loc = self.index.lookup(cid)
        if loc is None and self._pending is not None:
            loc = self._pending.ids.get(cid)
            if loc is not None:
                self._pending.writer._drain()
        if loc is None:
            raise ChunkMissing(f"chunk {cid.hex()[:16]} is not in the repository")
        try:
            payload = self.read_raw(cid, loc)
        except ChunkMissing:
            # A concurrent GC may have moved it: look once more.
            loc2 = self.index.lookup(cid)
            if loc2 is None or loc2 == loc:
                raise
            self.forget_pack_fd(loc[0])
            loc = loc2
            payload = self.read_raw(cid, loc)
        data = self.codec.open_payload(loc[4], loc[5], cid, payload, loc[3])
        if verify_id and self.codec.chunk_id(data) != cid:
            raise ChunkCorrupt(f"chunk {cid.hex()[:16]}: content does not match its id")
        return data

    # -- catalogue ----------------------------------------------------------------------
    def encode_record(self, kind: Kind, obj: Any) -> tuple[ChunkId, bytes]:
        data = msgpack.packb(obj)
        return self.codec.chunk_id(data), data

    def _decode_record(self, rec: dict[str, Any], name: str = "?") -> dict[str, Any]:
        """The manifest of a catalogue record, checked against its chunk id before use.

        Raises ChunkCorrupt naming the record when it is damaged (never returns wrong data).
        """
        try:
            cid = bytes(rec["c"])
            data = self.codec.open_payload(
                Kind.POINT, int(rec["codec"]), cid, bytes(rec["m"]), int(rec["raw"])
            )
        except (KeyError, TypeError, ValueError, StoreError) as exc:
            raise ChunkCorrupt(
                f"catalogue record of {name} is damaged ({exc}); "
                "appliance repair --rebuild-index recreates it from the packs"
            ) from exc
        if self.codec.chunk_id(data) != cid:
            raise ChunkCorrupt(
                f"catalogue record of {name} is damaged (manifest does not match its id "
                f"{cid.hex()[:16]}); appliance repair --rebuild-index recreates it from the packs"
            )
        try:
            obj = msgpack.unpackb(data)
        except Exception as exc:  # msgpack raises several unrelated types on garbage
            raise FormatError(f"manifest of {name} does not decode: {exc}") from exc
        if not isinstance(obj, dict):
            raise FormatError(f"manifest of {name} is not a map")
        return obj

    def _point_from(self, source: str, pid: str, rec: dict[str, Any]) -> Point:
        manifest = self._decode_record(rec, f"{source}@{pid}")
        return Point(source, pid, manifest, ChunkId(bytes(rec["c"])), rec.get("lock"))

    def deleted_points(self) -> list[tuple[Point, int]]:
        """Deleted points still in the GC grace period, with their deletion time (ns)."""
        out = []
        for s, p, r in self.index.deleted_records():
            out.append((self._point_from(s, p, r), int(r.get("deleted_ns", 0))))
        return out

    def list_points(self, source: str | None = None) -> list[Point]:
        """Points ordered by source, then time (point ids sort chronologically)."""
        return [self._point_from(s, p, r) for s, p, r in self.index.point_records(source)]

    def sources(self) -> list[str]:
        return sorted({s for s, _p, _r in self.index.point_records()})

    def resolve(self, ref: str) -> Point:
        """The point `ref` names; a reader's lease then names it too (GC keeps it)."""
        point = self._resolve(ref)
        if self._lease is not None:
            self._lease.add_point(point.name)
        return point

    def _resolve(self, ref: str) -> Point:
        source, pid = split_ref(ref)
        if pid == "latest":
            recs = self.index.point_records(source)
            if not recs:
                raise NotFound(f"no points for source {source!r}")
            s, p, r = recs[-1]
            return self._point_from(s, p, r)
        rec = self.index.point_record(source, pid)
        if rec is None:
            raise NotFound(f"no point {source}@{pid}")
        return self._point_from(source, pid, rec)

    def new_point_id(self, source: str, when_ns: int) -> str:
        """A time-based id that sorts after every id the source ever had (deleted ones too).

        Ids are never reused, so a tombstone of a deleted point can never hide a new one.
        """
        pid = time.strftime(POINT_ID_FORMAT, time.gmtime(when_ns / 1e9))
        recs = self.index.point_records(source)
        last = max(
            [str(self.index.get_meta(f"last_id:{source}") or ""), recs[-1][1] if recs else ""]
        )
        if last and pid <= last:
            # same second, or the clock went back: count on from the latest id
            base, _, n = last.partition("-")
            pid = f"{base}-{int(n or 1) + 1:03d}"
        return pid

    def commit_point(self, manifest: dict[str, Any], *, files: list[Any] | None = None) -> Point:
        """Make a point visible: manifest into a pack, seal, one index commit. Writer only."""
        self._need_writer()
        validate_source_name(str(manifest["source"]))
        cid, data = self.encode_record(Kind.POINT, manifest)
        codec, payload = self.codec.seal(Kind.POINT, cid, data)
        self.put_sealed(Kind.POINT, cid, codec, payload, len(data))
        rec = {"c": cid, "m": payload, "codec": int(codec), "raw": len(data), "lock": None}
        key = point_key(str(manifest["source"]), str(manifest["id"]))
        self.flush(
            points=[(key, rec)],
            files=files,
            meta=[(f"last_id:{manifest['source']}", str(manifest["id"]))],
        )
        return Point(str(manifest["source"]), str(manifest["id"]), manifest, cid, None)

    def delete_point(self, point: Point, *, force: bool = False) -> None:
        self._need_writer()
        self._check_unlocked(point, force=force)
        tomb = {"tombstone": point.name, "time_ns": time.time_ns()}
        self.put(Kind.TOMBSTONE, msgpack.packb(tomb))
        key = point_key(point.source, point.id)
        rec = self.index.point_record(point.source, point.id)
        # the record stays in `deleted` until GC's grace period is over (readers may hold it)
        moved: list[tuple[bytes, dict[str, Any] | None]] = []
        if rec is not None:
            moved.append((key, {**rec, "deleted_ns": tomb["time_ns"]}))
        self.flush(points=[(key, None)], deleted=moved)

    def _check_unlocked(self, point: Point, *, force: bool) -> None:
        """Refuse to delete a locked point: always in an immutable repository, else unless
        `force`. The lock is read from the index, not from a possibly stale `point`."""
        rec = self.index.point_record(point.source, point.id)
        until = rec.get("lock") if rec is not None else point.locked_until
        if not until or until <= time.time():
            return
        day = _day(until)
        if self.config.immutable:
            raise Locked(f"{point.name} is locked until {day} in an immutable repository: "
                         "it cannot be deleted before then")  # fmt: skip
        if not force:
            raise Locked(f"{point.name} is locked until {day}")

    def lock_point(self, point: Point, until: float | None, *, force: bool = False) -> Point:
        """Lock `point` until `until` (unix s), or remove its lock (`until=None`).

        A lock only ever extends: shortening or removing a lock that has not expired needs
        `force`, and is refused outright in an immutable repository. A date in the past
        without a current lock is a mistake (InvalidArgument). Every change is recorded: a
        LOCKREC chunk (what `rebuild_index` restores from) and the point's lock history in
        the index (`lock_history`). Raises Locked, InvalidArgument, NotFound. Writer only.
        """
        self._need_writer()
        rec = self.index.point_record(point.source, point.id)
        if rec is None:
            raise NotFound(f"no point {point.name}")
        now = time.time()
        current = rec.get("lock")
        shortens = current is not None and current > now and (until is None or until < current)
        if shortens:
            what = "remove it" if until is None else f"shorten it to {_day(until)}"
            if self.config.immutable:
                raise Locked(
                    f"{point.name} is locked until {_day(current)} in an immutable "
                    "repository: a lock can only be extended"
                )
            if not force:
                raise Locked(
                    f"{point.name} is locked until {_day(current)}: a lock can only be "
                    f"extended (to {what} anyway: --force)"
                )
        elif until is not None and until <= now and not force:
            raise InvalidArgument(f"{_day(until)} is in the past: a lock must end in the future")
        now_ns = time.time_ns()
        entry = {"until": until, "prev": current, "time_ns": now_ns, "forced": shortens}
        rec["lock"] = until
        rec["locks"] = [*rec.get("locks", []), entry]
        lockrec = {"lock": point.name, **entry}
        self.put(Kind.LOCKREC, msgpack.packb(lockrec))
        self.flush(points=[(point_key(point.source, point.id), rec)])
        if shortens:
            log.warning("lock of %s changed by force: %s -> %s", point.name, _day(current),
                        _day(until))  # fmt: skip
        else:
            log.info("lock of %s: %s -> %s", point.name, _day(current), _day(until))
        return Point(point.source, point.id, point.manifest, point.manifest_id, until)

    def lock_history(self, point: Point) -> list[dict[str, Any]]:
        """Every recorded lock change of `point`, oldest first: {until, prev, time_ns, forced}
        (until/prev: unix s or None)."""
        rec = self.index.point_record(point.source, point.id)
        if rec is None:
            raise NotFound(f"no point {point.name}")
        return [dict(e) for e in rec.get("locks", [])]


def _day(until: float | None) -> str:
    if until is None:
        return "none"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(until))


def restored_lock(
    records: list[dict[str, Any]], *, immutable: bool
) -> tuple[float | None, list[dict[str, Any]]]:
    """The lock and history `rebuild_index` restores from a point's LOCKREC records.

    The newest record wins; in an immutable repository, where locks only extend, the latest
    end date of any record wins instead (a forged or replayed older record cannot shorten).
    """
    recs = sorted(records, key=lambda r: int(r.get("time_ns", 0)))
    history = [
        {"until": r.get("until"), "prev": r.get("prev"), "time_ns": int(r.get("time_ns", 0)),
         "forced": bool(r.get("forced", False))}
        for r in recs
    ]  # fmt: skip
    if not recs:
        return None, history
    if immutable:
        ends = [float(r["until"]) for r in recs if r.get("until") is not None]
        return (max(ends) if ends else None), history
    last = recs[-1].get("until")
    return (None if last is None else float(last)), history


def _take_writer_lock(root: Path) -> int:
    return take_flock(
        root / "lock", purpose="writer", busy=f"repository {root} is busy: a writer is running"
    )


__all__ = ["Point", "PutResult", "Repository", "StoreError", "split_ref"]
