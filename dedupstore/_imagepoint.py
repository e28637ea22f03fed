"""Image points: backing up disks/image files as fixed-size blocks, reading and restoring them.

Owns the ingest pipeline (read -> fingerprint -> hash -> dedup -> compress/encrypt on worker
threads -> ordered pack appends on the writer thread), `DiskReader` (random access to one
disk of a point, the ByteSource every front-end reads through) and image restore.

A source that cannot be read whole (a read fails, or returns fewer bytes than the size
measured at the start) aborts the backup with an OSError naming the disk and the offset; no
point is committed, so nothing partial can pass for a whole disk (chunks already stored are
unreferenced and go at the next gc).

Change detection: each leaf entry keeps an xxh3-128 fingerprint of its block. An incremental
or differential point hashes a block with the (slow) content hash only when its fingerprint
differs from the base point's entry for the same block; unchanged blocks reuse the base's id,
but only while the index holds that id and has not marked it bad (else the block is hashed
and stored again: that is how a damaged chunk heals). A base whose block map cannot be read
turns the rest of the pass into a full one (a WARNING, and a note in the point's manifest).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from ._blockmap import BlockMap, BlockMapBuilder, zero_runs
from ._repo import Point, Repository, validate_source_name
from .errors import ChunkCorrupt, ChunkMissing, InvalidArgument, Locked, NotFound, StoreError
from .formats import ZERO_FP, ZERO_ID, ChunkId, Kind

log = logging.getLogger(__name__)

BATCH_BLOCKS = 64
Progress = Callable[[int, int], None]
"""progress(done_bytes, total_bytes)"""

Ranges = Sequence[tuple[int, int]]


def _device_size(fd: int) -> int:
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    return os.lseek(fd, 0, os.SEEK_END)


def worker_count() -> int:
    return max(1, min(4, os.cpu_count() or 1))


@dataclass
class ImageStats:
    logical_bytes: int = 0
    read_bytes: int = 0
    zero_blocks: int = 0
    reused_blocks: int = 0
    hashed_blocks: int = 0
    new_chunks: int = 0
    new_raw_bytes: int = 0
    stored_bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(frozen=True, slots=True)
class _BlockResult:
    cid: bytes
    fp: bytes
    codec: int
    payload: bytes | None
    raw_len: int
    reused: bool


def _used_mask(ranges: Ranges | None, n_blocks: int, block_size: int) -> bytearray | None:
    if ranges is None:
        return None
    mask = bytearray(n_blocks)
    for off, length in ranges:
        if length <= 0:
            continue
        first = off // block_size
        last = min(n_blocks, (off + length + block_size - 1) // block_size)
        mask[first:last] = b"\x01" * max(0, last - first)
    return mask


class _Ingest:
    """Backs up one disk into a block map. Runs on the writer thread; uses a worker pool."""

    def __init__(
        self,
        repo: Repository,
        pool: ThreadPoolExecutor,
        stats: ImageStats,
        progress: Progress | None,
        total: int,
        done_before: int,
    ) -> None:
        self.repo = repo
        self.pool = pool
        self.stats = stats
        self.progress = progress
        self.total = total
        self.done_before = done_before
        self.bs = repo.block_size
        self.zero_block = bytes(self.bs)
        self.notes: list[str] = []

    def _read_and_work(
        self,
        fd: int,
        length: int,
        offset: int,
        prev: Sequence[tuple[bytes, bytes]] | None,
        used: bytes | None,
    ) -> list[_BlockResult]:
        return self._work(_read_full(fd, length, offset, used, self.bs), prev, used)

    def _work(
        self, data: bytes, prev: Sequence[tuple[bytes, bytes]] | None, used: bytes | None
    ) -> list[_BlockResult]:
        """Worker thread: fingerprint, hash, dedup-check, seal one batch of blocks."""
        bs = self.bs
        codec = self.repo.codec
        out: list[_BlockResult | None] = []
        todo: list[tuple[int, bytes, bytes]] = []
        reuse: list[tuple[int, bytes, bytes]] = []
        view = memoryview(data)
        for i in range(0, len(data), bs):
            blk = view[i : i + bs]
            k = i // bs
            if (used is not None and not used[k]) or blk == self.zero_block[: len(blk)]:
                out.append(_BlockResult(ZERO_ID, ZERO_FP, 0, None, len(blk), False))
                continue
            fp = xxhash.xxh3_128_digest(blk)
            out.append(None)
            if prev is not None and k < len(prev) and prev[k][1] == fp and prev[k][0] != ZERO_ID:
                reuse.append((len(out) - 1, prev[k][0], fp))
            else:
                todo.append((len(out) - 1, b"", fp))
        if reuse:
            # Reuse the base's id only if the index holds it and it is not marked bad: an id
            # that is gone or damaged is hashed and stored again below.
            ok = self.repo.index.has_many([c for _i, c, _f in reuse])
            for (pos, rcid, rfp), is_ok in zip(reuse, ok, strict=True):
                if is_ok:
                    n = len(view[pos * bs : pos * bs + bs])
                    out[pos] = _BlockResult(rcid, rfp, 0, None, n, True)
                else:
                    todo.append((pos, b"", rfp))
        if todo:
            todo = [
                (pos, codec.chunk_id(view[pos * bs : pos * bs + bs]), tfp) for pos, _c, tfp in todo
            ]
            known = self.repo.index.has_many([c for _i, c, _f in todo])
            for (pos, tcid, tfp), is_known in zip(todo, known, strict=True):
                blk = view[pos * bs : pos * bs + bs]
                if is_known:
                    out[pos] = _BlockResult(tcid, tfp, 0, None, len(blk), False)
                else:
                    c, payload = codec.seal(Kind.BLOCK, ChunkId(tcid), bytes(blk))
                    out[pos] = _BlockResult(tcid, tfp, int(c), payload, len(blk), False)
        return [r for r in out if r is not None]

    def run(
        self, name: str, path: Path, base: BlockMap | None, used: Ranges | None
    ) -> tuple[int, ChunkId, int, int]:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        inflight: deque[Future[list[_BlockResult]]] = deque()
        try:
            size = _device_size(fd)
            bs = self.bs
            n_blocks = (size + bs - 1) // bs
            mask = _used_mask(used, n_blocks, bs)
            builder = BlockMapBuilder(n_blocks, self._put_page)
            base_iter: Iterator[tuple[ChunkId, bytes]] | None = None
            if base is not None:
                base_iter = base.entries(0, min(base.n_blocks, n_blocks))
            base_iter = self._guarded(base_iter, path)
            window = 3 * worker_count()
            done = 0
            for first in range(0, n_blocks, BATCH_BLOCKS):
                count = min(BATCH_BLOCKS, n_blocks - first)
                bmask = None if mask is None else bytes(mask[first : first + count])
                if bmask is not None and not any(bmask):
                    results = [
                        _BlockResult(
                            ZERO_ID, ZERO_FP, 0, None, min(bs, size - (first + j) * bs), False
                        )
                        for j in range(count)
                    ]
                    if base_iter is not None:
                        for _ in range(count):
                            next(base_iter, None)
                    fut: Future[list[_BlockResult]] = Future()
                    fut.set_result(results)
                    inflight.append(fut)
                else:
                    offset = first * bs
                    want = min(count * bs, size - offset)
                    self.stats.read_bytes += want if bmask is None else sum(bmask) * bs
                    prev = None
                    if base_iter is not None:
                        prev = [e for _, e in zip(range(count), base_iter, strict=False)]
                    # the worker reads its own batch: reads overlap with hashing on all cores
                    inflight.append(
                        self.pool.submit(self._read_and_work, fd, want, offset, prev, bmask)
                    )
                while len(inflight) >= window or (inflight and inflight[0].done()):
                    done += self._consume(inflight.popleft().result(), builder)
                    self._report(done)
            while inflight:
                done += self._consume(inflight.popleft().result(), builder)
                self._report(done)
            root = builder.finish()
            self.stats.logical_bytes += size
            return size, root, builder.depth, n_blocks
        except SourceReadError as exc:
            raise OSError(
                exc.errno,
                f"{name}: {exc.strerror}; backup aborted, no point committed",
                str(path),
            ) from exc
        finally:
            # Workers may still pread this fd: never close it under them.
            for fut in inflight:
                fut.cancel()
            wait(inflight)
            os.close(fd)

    def _guarded(
        self, it: Iterator[tuple[ChunkId, bytes]] | None, path: Path
    ) -> Iterator[tuple[ChunkId, bytes]] | None:
        """The base's entries, ending early (the rest of the pass hashes every block) when
        a page of the base's block map cannot be read: a damaged base never fails a chain."""
        if it is None:
            return None

        def gen() -> Iterator[tuple[ChunkId, bytes]]:
            n = 0
            try:
                for entry in it:
                    yield entry
                    n += 1
            except (ChunkMissing, ChunkCorrupt) as exc:
                note = f"base block map of {path} unreadable from block {n} ({exc}): full pass"
                log.warning("%s", note)
                self.notes.append(note)
                self._mark_page_bad(getattr(exc, "page_id", None), str(exc))

        return gen()

    def _mark_page_bad(self, page_id: bytes | None, reason: str) -> None:
        """Mark the base's unreadable page bad, so this point's identical page is stored
        afresh instead of deduplicating onto the damaged copy."""
        if page_id is None:
            return
        loc = self.repo.index.lookup(page_id)
        if loc is not None:
            self.repo.index.mark_bad([(page_id, loc, reason, [])])

    def _report(self, done: int) -> None:
        if self.progress is not None:
            self.progress(self.done_before + done, self.total)

    def _consume(self, results: list[_BlockResult], builder: BlockMapBuilder) -> int:
        s = self.stats
        n = 0
        for r in results:
            n += r.raw_len
            if r.cid == ZERO_ID:
                s.zero_blocks += 1
            elif r.reused:
                s.reused_blocks += 1
            else:
                s.hashed_blocks += 1
                if r.payload is not None:
                    added = self.repo.put_sealed(Kind.BLOCK, r.cid, r.codec, r.payload, r.raw_len)
                    if added:
                        s.new_chunks += 1
                        s.new_raw_bytes += r.raw_len
                        s.stored_bytes += added
            builder.add(r.cid, r.fp)
        return n

    def _put_page(self, page: bytes) -> ChunkId:
        res = self.repo.put(Kind.PAGE, page)
        if not res.duplicate:
            self.stats.stored_bytes += res.stored_bytes
        return res.chunk_id


class SourceReadError(OSError):
    """A read of a backup source failed or came back short; the message names the offset."""


def _pread_exact(fd: int, length: int, offset: int, bs: int) -> bytes:
    """Exactly `length` bytes at `offset`, or SourceReadError naming where it failed.

    A failing read is retried block by block (`bs`) to name the first block that fails.
    """
    parts = []
    pos, end = offset, offset + length
    while pos < end:
        try:
            data = os.pread(fd, end - pos, pos)
        except OSError as exc:
            bad, n, err = pos, end - pos, exc
            for off in range(pos, end, bs):
                try:
                    os.pread(fd, min(bs, end - off), off)
                except OSError as exc2:
                    bad, n, err = off, min(bs, end - off), exc2
                    break
            why = err.strerror or str(err)
            raise SourceReadError(
                err.errno or errno.EIO, f"read failed at offset {bad} ({n} bytes): {why}"
            ) from exc
        if not data:  # the source shrank (or a device reported less than it has)
            raise SourceReadError(
                errno.EIO,
                f"short read at offset {pos}: the source ends {end - pos} bytes early "
                f"(it shrank while being read?)",
            )
        parts.append(data)
        pos += len(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _read_full(fd: int, length: int, offset: int, mask: bytes | None, bs: int) -> bytes:
    """Read `length` bytes at `offset`; with a mask, unused blocks are left as zeros.

    Raises SourceReadError (an OSError naming the offset) when a needed byte cannot be read.
    """
    if mask is None or all(mask):
        return _pread_exact(fd, length, offset, bs)
    buf = bytearray(length)
    for k, used in enumerate(mask):
        if used:
            start = k * bs
            chunk = _pread_exact(fd, min(bs, length - start), offset + start, bs)
            buf[start : start + len(chunk)] = chunk
    return bytes(buf)


def choose_base(repo: Repository, source: str, mode: str) -> Point | None:
    """The point an incremental (latest) or differential (latest full) compares with."""
    if mode == "full":
        return None
    points = [p for p in repo.list_points(source) if p.kind == "image"]
    if mode == "differential":
        points = [p for p in points if p.mode in ("full", "synthetic")]
    elif mode != "incremental":
        raise InvalidArgument(f"unknown mode {mode!r} (full, incremental, differential)")
    return points[-1] if points else None


def block_map(repo: Repository, disk: dict[str, Any]) -> BlockMap:
    n_blocks = (int(disk["size"]) + int(disk["block_size"]) - 1) // int(disk["block_size"])
    return BlockMap(
        ChunkId(bytes(disk["root"])), int(disk["depth"]), n_blocks, lambda cid: repo.get(cid)
    )


def backup_image(
    repo: Repository,
    paths: Sequence[Path],
    *,
    source: str,
    mode: str = "incremental",
    used: Sequence[Ranges | None] | None = None,
    progress: Progress | None = None,
    label: str | None = None,
) -> Point:
    """Back up disks (image files or block devices) as one point `source@<new id>`.

    `used[i]` optionally restricts disk i to byte ranges (everything else is stored as
    zeros: the used-blocks backup). Writer only. Raises StoreError / OSError.
    """
    validate_source_name(source)
    if not paths:
        raise InvalidArgument("no disks given")
    base = choose_base(repo, source, mode)
    if mode != "full" and base is None:
        log.info("no earlier point of %s to compare with: taking a full point", source)
    started = time.time()
    sizes = []
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"{p}: no such file or device") from None
        try:
            sizes.append(_device_size(fd))
        finally:
            os.close(fd)
    total = sum(sizes)
    stats = ImageStats()
    disks: list[dict[str, Any]] = []
    base_disks = {d["name"]: d for d in base.manifest["disks"]} if base else {}
    with ThreadPoolExecutor(worker_count(), thread_name_prefix="ingest") as pool:
        ingest = _Ingest(repo, pool, stats, progress, total, 0)
        for i, path in enumerate(paths):
            name = f"disk{i}"
            bdisk = base_disks.get(name)
            bmap = None
            if bdisk is not None and int(bdisk["block_size"]) == repo.block_size:
                bmap = block_map(repo, bdisk)
            ingest.done_before = sum(sizes[:i])
            size, root, depth, _n = ingest.run(name, Path(path), bmap, used[i] if used else None)
            disks.append(
                {
                    "name": name,
                    "size": size,
                    "block_size": repo.block_size,
                    "root": root,
                    "depth": depth,
                    "path": str(path),
                }
            )
    now = time.time_ns()
    manifest: dict[str, Any] = {
        "v": 1,
        "kind": "image",
        "source": source,
        "id": repo.new_point_id(source, now),
        "time_ns": now,
        "mode": mode if base is not None else "full",
        "parent": base.id if base is not None else None,
        "disks": disks,
        "used_only": used is not None,
        "host": socket.gethostname(),
        "label": label,
        "stats": {**stats.as_dict(), "duration_s": round(time.time() - started, 3)},
    }
    if ingest.notes:
        manifest["notes"] = ingest.notes  # and in the stats: the job's result shows them
        manifest["stats"]["notes"] = ingest.notes
    return repo.commit_point(manifest)


def synthesize(repo: Repository, source: str) -> Point:
    """A new full point from the latest of a chain: copies the block-map roots (free)."""
    latest = repo.resolve(f"{source}@latest")
    now = time.time_ns()
    manifest = dict(latest.manifest)
    manifest.update(
        {
            "id": repo.new_point_id(source, now),
            "time_ns": now,
            "mode": "synthetic",
            "parent": latest.id,
            "stats": {
                "logical_bytes": latest.manifest.get("stats", {}).get("logical_bytes", 0),
                "stored_bytes": 0,
                "synthesized_from": latest.id,
            },
        }
    )
    return repo.commit_point(manifest)


class DiskReader:
    """Random access to one disk of an image point: the store's ByteSource.

    Thread-safe. Reads decompress whole blocks and keep the most recent ones in an LRU,
    so 4 KiB or 128 KiB reads do not decompress the same block again. Raises ChunkMissing /
    ChunkCorrupt for damaged blocks; never returns wrong data.
    """

    def __init__(self, repo: Repository, disk: dict[str, Any], cache_blocks: int = 256) -> None:
        self.repo = repo
        self.name = str(disk["name"])
        self.size = int(disk["size"])
        self.block_size = int(disk["block_size"])
        self.map = block_map(repo, disk)
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_blocks = cache_blocks
        self._lock = threading.Lock()

    def size_bytes(self) -> int:
        return self.size

    def block(self, index: int) -> bytes:
        """Block `index` (short at the end of the disk)."""
        with self._lock:
            data = self._cache.get(index)
            if data is not None:
                self._cache.move_to_end(index)
                return data
        cid, _fp = self.map.entry(index)
        length = min(self.block_size, self.size - index * self.block_size)
        data = bytes(length) if cid == ZERO_ID else self.repo.get(cid)
        if len(data) != length:
            raise StoreError(
                f"block {index} of {self.name} has {len(data)} bytes, expected {length}"
            )
        with self._lock:
            self._cache[index] = data
            while len(self._cache) > self._cache_blocks:
                self._cache.popitem(last=False)
        return data

    def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise InvalidArgument("negative offset or length")
        end = min(self.size, offset + length)
        if offset >= end:
            return b""
        bs = self.block_size
        parts = []
        pos = offset
        while pos < end:
            b = pos // bs
            blk = self.block(b)
            start = pos - b * bs
            take = min(end - pos, len(blk) - start)
            parts.append(blk[start : start + take])
            pos += take
        return b"".join(parts) if len(parts) > 1 else parts[0]

    def extents(
        self, offset: int = 0, length: int | None = None
    ) -> Iterator[tuple[int, int, bool]]:
        """Runs of (offset, length, is_zero) covering [offset, offset+length)."""
        end = self.size if length is None else min(self.size, offset + length)
        bs = self.block_size
        first, last = offset // bs, (end + bs - 1) // bs
        flags = (cid == ZERO_ID for cid, _fp in self.map.entries(first, last))
        yield from zero_runs(offset, end, bs, flags)


def disk_readers(repo: Repository, point: Point) -> list[DiskReader]:
    if point.kind != "image":
        raise InvalidArgument(f"{point.name} is a {point.kind} point, not an image")
    return [DiskReader(repo, d) for d in point.manifest["disks"]]


def restore_image(
    repo: Repository,
    point: Point,
    dest: Path,
    *,
    disk: str | None = None,
    progress: Progress | None = None,
    check: Callable[[Path], None] | None = None,
) -> list[Path]:
    """Write a point's disks to `dest` (a file or device for one disk, else a directory).

    `check(target)` is called for every target before anything is written (a caller's
    veto: it raises to refuse). A block device is opened O_EXCL: Locked if it is in use."""
    readers = disk_readers(repo, point)
    if disk is not None:
        readers = [r for r in readers if r.name == disk]
        if not readers:
            raise NotFound(f"{point.name} has no disk {disk}")
    targets: list[Path]
    if len(readers) == 1 and not dest.is_dir():
        targets = [dest]
    else:
        dest.mkdir(parents=True, exist_ok=True)
        targets = [dest / f"{r.name}.img" for r in readers]
    if check is not None:
        for target in targets:
            check(target)
    total = sum(r.size for r in readers)
    done = 0
    for reader, target in zip(readers, targets, strict=True):
        done = _restore_disk(reader, target, progress, done, total)
    return targets


def _restore_disk(
    reader: DiskReader, target: Path, progress: Progress | None, done: int, total: int
) -> int:
    is_dev = target.exists() and stat.S_ISBLK(target.stat().st_mode)
    # O_EXCL on a block device is the kernel's exclusive claim: it fails (EBUSY) while the
    # device or one of its partitions is mounted or held, and keeps anyone from mounting it
    # while it is being written.
    flags = os.O_WRONLY | os.O_CLOEXEC | (os.O_EXCL if is_dev else os.O_CREAT | os.O_TRUNC)
    try:
        fd = os.open(target, flags, 0o644)
    except OSError as exc:
        if is_dev and exc.errno == errno.EBUSY:
            raise Locked(f"{target} is in use (mounted or held by another program)") from None
        raise
    repo = reader.repo
    bs = reader.block_size
    try:
        if not is_dev:
            os.ftruncate(fd, reader.size)
        else:
            dev_size = _device_size(fd)
            if dev_size < reader.size:
                raise InvalidArgument(
                    f"{target} holds {dev_size} bytes; the disk needs {reader.size}"
                )
        zero = bytes(bs)

        def work(first: int, entries: list[tuple[ChunkId, bytes]]) -> int:
            last_cid: bytes | None = None
            last_data = b""
            written = 0
            for j, (cid, _fp) in enumerate(entries):
                off = (first + j) * bs
                length = min(bs, reader.size - off)
                if cid == ZERO_ID:
                    if is_dev:
                        os.pwrite(fd, zero[:length], off)
                    written += length
                    continue
                if cid != last_cid:
                    last_data = repo.get(cid)
                    last_cid = cid
                os.pwrite(fd, last_data, off)
                written += length
            return written

        with ThreadPoolExecutor(worker_count(), thread_name_prefix="restore") as pool:
            futs: deque[Future[int]] = deque()
            batch: list[tuple[ChunkId, bytes]] = []
            first = 0
            for i, entry in enumerate(reader.map.entries()):
                if not batch:
                    first = i
                batch.append(entry)
                if len(batch) == BATCH_BLOCKS:
                    futs.append(pool.submit(work, first, batch))
                    batch = []
                while len(futs) > 4 * worker_count() or (futs and futs[0].done()):
                    done += futs.popleft().result()
                    if progress:
                        progress(done, total)
            if batch:
                futs.append(pool.submit(work, first, batch))
            while futs:
                done += futs.popleft().result()
                if progress:
                    progress(done, total)
        os.fsync(fd)
    finally:
        os.close(fd)
    return done
