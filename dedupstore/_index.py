"""The LMDB index and catalogue: chunk locations, packs, points, caches.

Owns the LMDB environment and the meaning of each sub-database. Every transaction begins
and ends inside one method call (never held across an await or a callback).

    chunks   chunk id (32 B)            -> CHUNK_LOC (pack id, offset, lengths, kind, codec)
    packs    pack id (8 B big-endian)   -> msgpack {tier, size, sealed}
    points   b"<source>\\0<point id>"     -> msgpack {c: manifest chunk id, m: sealed manifest,
                                                     codec, raw, lock: until (unix s) | None}
    meta     name                       -> value (next pack id, pending pack deletions, packs
                                           being written)
    files    Index.files_key(source, path) -> files-cache record (size, mtime, inode, chunks)
    bad      chunk id (32 B)            -> msgpack {loc, reason, time_ns, points}: the indexed copy
                                           at `loc` failed verify; the chunk counts as absent
    deleted  b"<source>\\0<point id>"     -> msgpack point record + deleted_ns (GC grace period)

Every msgpack value is written as CHECKED_PREFIX + xxh3-64 + msgpack and checked when read
back: a damaged value raises StoreError naming the record, never decodes into wrong data.
Values written before the prefix existed (no 0xc1 first byte: msgpack never uses it) are
read unchecked.

The files cache is the one place plain paths, sizes and times would sit outside the sealed
chunks. In an encrypted repository its keys are HMAC-SHA256(files key, source NUL path) and its
values AES-256-GCM sealed (nonce + ciphertext of the checked value, the hashed key as associated
data), both under subkeys of the repository keys; in a plain repository the key is
b"<source>\\0<path>" and the value the checked msgpack. The index directory is 0700, its files 0600.
"""

from __future__ import annotations

import hmac
import logging
import os
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import lmdb
import msgpack
import xxhash
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ._codec import Keys
from .errors import FormatError, OutOfSpace, StoreError
from .formats import CHUNK_LOC, ChunkId

log = logging.getLogger(__name__)

MAP_SIZE = 1 << 40  # virtual; the file grows only as needed
_FILES_FORMAT_META = "files_cache"
_FILES_KEYED = "hmac-sha256+aes-256-gcm v1"
_U64 = struct.Struct(">Q")


def pack_key(pack_id: int) -> bytes:
    return _U64.pack(pack_id)


def point_key(source: str, point_id: str) -> bytes:
    return source.encode() + b"\0" + point_id.encode()


Loc = tuple[int, int, int, int, int, int]  # pack id, offset, stored_len, raw_len, kind, codec

CHECKED_PREFIX = b"\xc1"
"""First byte of a checked index value. 0xc1 is the one byte msgpack never emits."""


def encode_value(obj: Any) -> bytes:
    """msgpack + an xxh3-64 of it, so a damaged LMDB value is detected when read back."""
    body: bytes = msgpack.packb(obj)
    return CHECKED_PREFIX + xxhash.xxh3_64_digest(body) + body


def decode_value(raw: bytes | memoryview, what: str) -> Any:
    """Inverse of `encode_value`. Raises FormatError naming `what` for a damaged value."""
    raw = bytes(raw)
    if raw[:1] == CHECKED_PREFIX:
        digest, body = raw[1:9], raw[9:]
        if xxhash.xxh3_64_digest(body) != digest:
            raise FormatError(
                f"index record {what} is damaged (checksum mismatch; "
                "appliance repair --rebuild-index recreates the index from the packs)"
            )
    else:
        body = raw  # written before checked values existed
    try:
        return msgpack.unpackb(body)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise FormatError(f"index record {what} does not decode: {exc}") from exc


def _put_or_delete(
    txn: lmdb.Transaction, db: lmdb._Database, rows: Iterable[tuple[bytes, Any]]
) -> None:
    """Write each (key, value) checked; a None value deletes the key."""
    for key, rec in rows:
        if rec is None:
            txn.delete(key, db=db)
        else:
            txn.put(key, encode_value(rec), db=db)


def _key_name(key: bytes) -> str:
    return key.replace(b"\0", b"@").decode(errors="backslashreplace")


_ENVS: dict[str, tuple[lmdb.Environment, int]] = {}
_ENVS_LOCK = threading.Lock()


def _acquire_env(path: Path) -> lmdb.Environment:
    """One LMDB environment per path per process (LMDB forbids opening one twice)."""
    key = str(path.resolve())
    with _ENVS_LOCK:
        env, refs = _ENVS.get(key, (None, 0))
        if env is None:
            try:
                env = _open_env(path)
            except lmdb.Error as exc:
                raise StoreError(
                    f"cannot open the index at {path}: {exc} "
                    "(appliance repair --rebuild-index recreates it from the packs)"
                ) from exc
        _ENVS[key] = (env, refs + 1)
        return env


def _release_env(path: Path) -> None:
    key = str(path.resolve())
    with _ENVS_LOCK:
        env, refs = _ENVS[key]
        if refs <= 1:
            del _ENVS[key]
            env.close()
        else:
            _ENVS[key] = (env, refs - 1)


def _open_env(path: Path) -> lmdb.Environment:
    return lmdb.open(
        str(path),
        map_size=MAP_SIZE,
        max_dbs=16,
        subdir=True,
        readonly=False,  # readers still need the lock table; writes are gated above
        lock=True,
        readahead=False,
        max_readers=1024,
        mode=0o600,  # data.mdb, lock.mdb when created: the owner's only (a umask only removes)
    )


class Index:
    """Thin typed layer over the LMDB environment. Thread-safe (py-lmdb, MDB_NOTLS)."""

    def __init__(self, path: Path, *, readonly: bool, keys: Keys | None = None) -> None:
        """`keys`: the repository's keys in an encrypted repository (the files cache is
        keyed and sealed with them). Anyone who opens the index of an open repository again
        (an index rebuild) passes `repo.keys`."""
        if not path.exists():
            path.mkdir(parents=True, mode=0o700, exist_ok=True)
            os.chmod(path, 0o700)
        self.path = path
        self.env = _acquire_env(path)
        self._open = True
        self.readonly = readonly
        self.chunks = self.env.open_db(b"chunks")
        self.packs = self.env.open_db(b"packs")
        self.points = self.env.open_db(b"points")
        self.meta = self.env.open_db(b"meta")
        self.files = self.env.open_db(b"files")
        self.bad = self.env.open_db(b"bad")
        self.deleted = self.env.open_db(b"deleted")
        self._files_mac: bytes | None = None
        self._files_aead: AESGCM | None = None
        if keys is not None:
            self._files_mac = keys.subkey("files-cache mac")
            self._files_aead = AESGCM(keys.subkey("files-cache"))
            if not readonly and self.get_meta(_FILES_FORMAT_META) != _FILES_KEYED:
                self._drop_plain_files_cache()

    def close(self) -> None:
        if self._open:
            self._open = False
            _release_env(self.path)

    # -- chunks -------------------------------------------------------------------------
    def lookup(self, cid: bytes) -> Loc | None:
        with self.env.begin(db=self.chunks) as txn:
            raw = txn.get(cid)
        return None if raw is None else CHUNK_LOC.unpack(raw)

    def has_many(self, cids: Iterable[bytes]) -> list[bool]:
        """Whether each chunk is indexed and not marked bad (a bad chunk counts as absent,
        so the next backup that produces it stores a fresh copy)."""
        with self.env.begin() as txn:
            return [
                txn.get(c, db=self.chunks) is not None and txn.get(c, db=self.bad) is None
                for c in cids
            ]

    # -- bad chunks ---------------------------------------------------------------------
    def is_bad(self, cid: bytes) -> bool:
        with self.env.begin(db=self.bad) as txn:
            return txn.get(cid) is not None

    def bad_chunks(self) -> dict[ChunkId, dict[str, Any]]:
        """Every chunk marked bad: id -> {loc, reason, time_ns, points}."""
        with self.env.begin(db=self.bad) as txn:
            return {
                ChunkId(bytes(k)): decode_value(v, f"bad:{bytes(k).hex()[:16]}")
                for k, v in txn.cursor().iternext()
            }

    def mark_bad(self, marks: Iterable[tuple[bytes, Loc, str, list[str]]]) -> int:
        """Mark chunks bad in one transaction; returns how many were marked.

        A mark is written only while the index still points at the copy found bad (`loc`):
        a writer that stored a fresh copy meanwhile wins. Readers may call this (one atomic
        LMDB transaction, like any commit); it changes no chunk location.
        """
        now = time.time_ns()
        n = 0
        try:
            with self.env.begin(write=True) as txn:
                for cid, loc, reason, points in marks:
                    cur = txn.get(cid, db=self.chunks)
                    if cur is None or CHUNK_LOC.unpack(cur) != tuple(loc):
                        continue
                    rec = {"loc": list(loc), "reason": reason, "time_ns": now, "points": points}
                    txn.put(cid, encode_value(rec), db=self.bad)
                    n += 1
        except lmdb.Error as exc:
            raise StoreError(f"cannot record damaged chunks in the index: {exc}") from exc
        return n

    def iter_chunks(self) -> Iterator[tuple[ChunkId, Loc]]:
        """Snapshot iteration in one read txn (materialised in slices to keep it short)."""
        last: bytes | None = None
        while True:
            batch: list[tuple[ChunkId, Loc]] = []
            with self.env.begin(db=self.chunks) as txn:
                cur = txn.cursor()
                ok = cur.set_range(last) if last is not None else cur.first()
                if ok and last is not None and cur.key() == last:
                    ok = cur.next()
                while ok and len(batch) < 50_000:
                    batch.append((ChunkId(bytes(cur.key())), CHUNK_LOC.unpack(cur.value())))
                    ok = cur.next()
            if not batch:
                return
            yield from batch
            last = batch[-1][0]

    def chunk_count(self) -> int:
        with self.env.begin(db=self.chunks) as txn:
            return int(txn.stat(self.chunks)["entries"])

    # -- packs --------------------------------------------------------------------------
    def pack_info(self, pack_id: int) -> dict[str, Any] | None:
        with self.env.begin(db=self.packs) as txn:
            raw = txn.get(pack_key(pack_id))
        return None if raw is None else decode_value(raw, f"pack:{pack_id:016x}")

    def all_packs(self) -> dict[int, dict[str, Any]]:
        with self.env.begin(db=self.packs) as txn:
            out = {}
            for k, v in txn.cursor().iternext():
                pid = _U64.unpack(bytes(k))[0]
                out[pid] = decode_value(v, f"pack:{pid:016x}")
            return out

    # -- meta ---------------------------------------------------------------------------
    def get_meta(self, name: str) -> Any:
        with self.env.begin(db=self.meta) as txn:
            raw = txn.get(name.encode())
        return None if raw is None else decode_value(raw, f"meta:{name}")

    # -- points -------------------------------------------------------------------------
    def point_records(self, source: str | None = None) -> list[tuple[str, str, dict[str, Any]]]:
        prefix = b"" if source is None else source.encode() + b"\0"
        out: list[tuple[str, str, dict[str, Any]]] = []
        with self.env.begin(db=self.points) as txn:
            cur = txn.cursor()
            ok = cur.set_range(prefix) if prefix else cur.first()
            while ok:
                key = bytes(cur.key())
                if prefix and not key.startswith(prefix):
                    break
                src, _, pid = key.partition(b"\0")
                rec = decode_value(cur.value(), f"point:{_key_name(key)}")
                out.append((src.decode(), pid.decode(), rec))
                ok = cur.next()
        return out

    def point_record(self, source: str, point_id: str) -> dict[str, Any] | None:
        key = point_key(source, point_id)
        with self.env.begin(db=self.points) as txn:
            raw = txn.get(key)
        return None if raw is None else decode_value(raw, f"point:{_key_name(key)}")

    def deleted_records(self) -> list[tuple[str, str, dict[str, Any]]]:
        """Records of deleted points still in their GC grace period (with `deleted_ns`)."""
        out: list[tuple[str, str, dict[str, Any]]] = []
        with self.env.begin(db=self.deleted) as txn:
            for k, v in txn.cursor().iternext():
                key = bytes(k)
                src, _, pid = key.partition(b"\0")
                rec = decode_value(v, f"deleted:{_key_name(key)}")
                out.append((src.decode(), pid.decode(), rec))
        return out

    # -- files cache --------------------------------------------------------------------
    def files_key(self, source: str, path: str | bytes) -> bytes:
        """The files-cache key of `path` (str, or the raw bytes of a non-UTF-8 name) in
        `source`: keyed-hashed in an encrypted repository, plain otherwise."""
        raw = source.encode() + b"\0" + (path if isinstance(path, bytes) else os.fsencode(path))
        if self._files_mac is None:
            return raw
        return hmac.digest(self._files_mac, raw, "sha256")

    def files_get(self, source: str, path: str | bytes) -> dict[str, Any] | None:
        key = self.files_key(source, path)
        with self.env.begin(db=self.files) as txn:
            raw = txn.get(key)
        return None if raw is None else self._files_open(key, bytes(raw))

    def _files_seal(self, key: bytes, rec: dict[str, Any]) -> bytes:
        data = encode_value(rec)
        if self._files_aead is None:
            return data
        nonce = os.urandom(12)
        return nonce + self._files_aead.encrypt(nonce, data, key)

    def _files_open(self, key: bytes, raw: bytes) -> dict[str, Any] | None:
        """Decode a files-cache value. A damaged one is a cache miss (the file is read again and
        its record rewritten), logged as a WARNING: never wrong data."""
        try:
            if self._files_aead is not None:
                raw = self._files_aead.decrypt(raw[:12], raw[12:], key)
            rec = decode_value(raw, f"files:{_key_name(key)}")
        except (InvalidTag, FormatError) as exc:
            log.warning("files cache record %s: ignoring it, the file is read again",
                        exc if isinstance(exc, FormatError) else "fails authentication")
            return None
        return rec if isinstance(rec, dict) else None

    def _drop_plain_files_cache(self) -> None:
        """An encrypted repository written before the files cache was sealed holds plain
        paths there: drop them (it is only a cache) and mark the cache as keyed."""
        with self.env.begin(write=True) as txn:
            txn.drop(self.files, delete=False)
            txn.put(_FILES_FORMAT_META.encode(), encode_value(_FILES_KEYED), db=self.meta)

    # -- writes -------------------------------------------------------------------------
    def commit(
        self,
        *,
        chunks: Iterable[tuple[bytes, Loc]] = (),
        packs: Iterable[tuple[int, dict[str, Any]]] = (),
        points: Iterable[tuple[bytes, dict[str, Any] | None]] = (),
        meta: Iterable[tuple[str, Any]] = (),
        files: Iterable[tuple[bytes, dict[str, Any] | None]] = (),
        delete_chunks: Iterable[bytes] = (),
        delete_packs: Iterable[int] = (),
        only_new_chunks: bool = False,
        bad: Iterable[tuple[bytes, dict[str, Any] | None]] = (),
        deleted: Iterable[tuple[bytes, dict[str, Any] | None]] = (),
    ) -> None:
        """Apply one atomic, durable change (LMDB commit with fsync).

        Indexing a chunk location (without `only_new_chunks`) or deleting a chunk clears
        its bad mark: the index then points at a fresh copy, or at nothing.

        Raises OutOfSpace when the disk is full, StoreError for other LMDB failures; the
        transaction is then aborted and nothing of it is visible.
        """
        try:
            self._commit(
                chunks,
                packs,
                points,
                meta,
                files,
                delete_chunks,
                delete_packs,
                only_new_chunks,
                bad,
                deleted,
            )
        except lmdb.Error as exc:
            if isinstance(exc, lmdb.MapFullError) or "No space" in str(exc):
                raise OutOfSpace(f"index: no space left on device ({exc})") from exc
            raise StoreError(f"index write failed: {exc}") from exc

    def _commit(
        self,
        chunks: Iterable[tuple[bytes, Loc]],
        packs: Iterable[tuple[int, dict[str, Any]]],
        points: Iterable[tuple[bytes, dict[str, Any] | None]],
        meta: Iterable[tuple[str, Any]],
        files: Iterable[tuple[bytes, dict[str, Any] | None]],
        delete_chunks: Iterable[bytes],
        delete_packs: Iterable[int],
        only_new_chunks: bool,
        bad: Iterable[tuple[bytes, dict[str, Any] | None]],
        deleted: Iterable[tuple[bytes, dict[str, Any] | None]],
    ) -> None:
        with self.env.begin(write=True) as txn:
            for cid, loc in chunks:
                if (
                    txn.put(
                        cid, CHUNK_LOC.pack(*loc), db=self.chunks, overwrite=not only_new_chunks
                    )
                    and not only_new_chunks
                ):
                    txn.delete(cid, db=self.bad)  # a fresh copy replaces a damaged one
            for cid in delete_chunks:
                txn.delete(cid, db=self.chunks)
                txn.delete(cid, db=self.bad)
            _put_or_delete(txn, self.bad, bad)
            _put_or_delete(txn, self.deleted, deleted)
            for pid, info in packs:
                txn.put(pack_key(pid), encode_value(info), db=self.packs)
            for pid in delete_packs:
                txn.delete(pack_key(pid), db=self.packs)
            _put_or_delete(txn, self.points, points)
            for name, value in meta:
                if value is None:
                    txn.delete(name.encode(), db=self.meta)
                else:
                    txn.put(name.encode(), encode_value(value), db=self.meta)
            for key, rec in files:
                if rec is None:
                    txn.delete(key, db=self.files)
                else:
                    txn.put(key, self._files_seal(key, rec), db=self.files)

    def clear_all(self) -> None:
        with self.env.begin(write=True) as txn:
            for db in (
                self.chunks,
                self.packs,
                self.points,
                self.meta,
                self.files,
                self.bad,
                self.deleted,
            ):
                txn.drop(db, delete=False)
