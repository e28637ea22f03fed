"""File-tree points: back up a directory tree with content-defined chunks, read and restore it.

Owns the item stream format and the FileTree reader. An item is a msgpack map per entry in
depth-first, name-sorted order::

    p path (relative, "" = the root)   k kind (d f l p c b s)   m st_mode   u uid   g gid
    s size   a/t/n atime/mtime/ctime ns   x {xattr: value}   l symlink target   r rdev
    h hard-link target path   c [[chunk id, length], ...]   e [[offset, length], ...] data
    extents of a sparse file (absent = one extent covering the file)

Names are Linux names, i.e. bytes: in memory a path is a str from os.fsdecode (undecodable
bytes as surrogates, `surrogateescape`), so os functions give the original bytes back. In the
item stream `p`, `h`, `l` and xattr names are msgpack str when they are valid UTF-8 (what older
versions wrote, still read unchanged) and msgpack bin (the raw bytes) otherwise; the reader
turns bin back into str with os.fsdecode, so a round trip is byte-exact.

The item stream is cut with FastCDC into TREE chunks, so an unchanged part of a big tree
dedups between points. Regular files are cut with FastCDC (16/64/256 KiB); a files cache
(size, mtime, ctime, inode -> chunk list) lets an incremental skip unchanged files.

A backup never hides what it could not read (restic/rsync semantics): an entry that cannot be
read (lstat, readlink, open or read fails) is left out of the point and listed in the
manifest's `errors` ([{path, error}], count in `stats.errors`, `complete: false`); the CLI
then exits 3. A regular file whose size or mtime differs after it was read from before (a
growing log) is backed up as read and listed in `changed` (count in `stats.changed`): a
warning, like restic and borg, which alone does not make the point incomplete.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import stat
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from pyfastcdc.cy import FastCDC

from ._dest import Dest, DestMeta, UnsafePath, placement, set_fd_meta
from ._imagepoint import worker_count
from ._repo import Point, Repository, validate_source_name
from .errors import ChunkCorrupt, FormatError, InvalidArgument, NotFound
from .formats import ChunkId, Kind

log = logging.getLogger(__name__)

CDC_MIN, CDC_AVG, CDC_MAX = 16 * 1024, 64 * 1024, 256 * 1024
READ_WINDOW = 8 * 1024 * 1024
TREE_CDC = (16 * 1024, 64 * 1024, 256 * 1024)

_KIND_OF_MODE = {
    stat.S_IFDIR: "d",
    stat.S_IFREG: "f",
    stat.S_IFLNK: "l",
    stat.S_IFIFO: "p",
    stat.S_IFCHR: "c",
    stat.S_IFBLK: "b",
    stat.S_IFSOCK: "s",
}
KIND_NAMES = {
    "d": "dir",
    "f": "file",
    "l": "symlink",
    "p": "fifo",
    "c": "chr",
    "b": "blk",
    "s": "sock",
}

Progress = Callable[[int, int], None]


@dataclass
class TreeStats:
    files: int = 0
    dirs: int = 0
    others: int = 0
    logical_bytes: int = 0
    read_bytes: int = 0
    cached_files: int = 0
    new_chunks: int = 0
    new_raw_bytes: int = 0
    stored_bytes: int = 0
    errors: int = 0  # entries left out of the point because they could not be read
    changed: int = 0  # files that changed while they were read (stored as read)

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def _data_extents(fd: int, size: int) -> list[tuple[int, int]] | None:
    """Data extents of a sparse file (SEEK_DATA/SEEK_HOLE); None when it has no holes."""
    extents: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no more data: trailing hole
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append((start, min(end, size) - start))
            pos = end
    except OSError:
        return None
    if len(extents) == 1 and extents[0] == (0, size):
        return None
    return extents


@dataclass
class _Waiting:
    """An item whose chunk ids are still being computed by workers (kept in stream order)."""

    item: dict[str, Any]
    futs: deque[Future[list[tuple[bytes, int, int, bytes | None]]]] = field(default_factory=deque)
    chunks: list[list[Any]] = field(default_factory=list)
    complete: bool = True
    skip: bool = False  # reading failed: the entry is left out of the point


class _TreeBackup:
    """Walks a directory and feeds the writer; one instance per backup run."""

    def __init__(
        self, repo: Repository, root: Path, source: str, use_cache: bool, progress: Progress | None
    ) -> None:
        self.repo = repo
        self.root = root
        self.source = source
        self.use_cache = use_cache
        self.progress = progress
        self.stats = TreeStats()
        self.cdc = FastCDC(CDC_AVG, min_size=CDC_MIN, max_size=CDC_MAX)
        self.items: list[dict[str, Any]] = []
        self.cache: list[tuple[bytes, dict[str, Any], dict[str, Any]]] = []
        self.root_dev = os.lstat(root).st_dev
        self.links: dict[tuple[int, int], str] = {}
        self.pool = ThreadPoolExecutor(worker_count(), thread_name_prefix="files")
        self.waiting: deque[_Waiting] = deque()
        self.inflight = 0
        self.limit = 4 * worker_count()
        self.errors: list[dict[str, str]] = []  # entries left out: {path, error}
        self.changed: list[dict[str, str]] = []  # files that changed while read: {path, change}

    # -- worker side --------------------------------------------------------------------
    def _seal_batch(self, chunks: list[bytes]) -> list[tuple[bytes, int, int, bytes | None]]:
        codec = self.repo.codec
        ids = [codec.chunk_id(c) for c in chunks]
        known = self.repo.index.has_many(ids)
        out: list[tuple[bytes, int, int, bytes | None]] = []
        for cid, data, k in zip(ids, chunks, known, strict=True):
            if k:
                out.append((cid, len(data), 0, None))
            else:
                c, payload = codec.seal(Kind.FILE, cid, data)
                out.append((cid, len(data), int(c), payload))
        return out

    # -- writer side --------------------------------------------------------------------
    def _store(self, results: list[tuple[bytes, int, int, bytes | None]]) -> list[list[Any]]:
        for cid, raw_len, codec, payload in results:
            if payload is not None:
                added = self.repo.put_sealed(Kind.FILE, cid, codec, payload, raw_len)
                if added:
                    self.stats.new_chunks += 1
                    self.stats.new_raw_bytes += raw_len
                    self.stats.stored_bytes += added
        return [[cid, raw_len] for cid, raw_len, _c, _p in results]

    def _drain(self, force: bool = False) -> None:
        """Store finished batches in order; block while too much is in flight."""
        while self.waiting:
            head = self.waiting[0]
            while head.futs and (force or self.inflight > self.limit or head.futs[0].done()):
                head.chunks.extend(self._store(head.futs.popleft().result()))
                self.inflight -= 1
            if head.futs or not head.complete:
                return
            self.waiting.popleft()
            if head.skip:
                continue
            if head.item["k"] == "f" and "c" not in head.item:
                head.item["c"] = head.chunks
            self.items.append(head.item)

    def run(self) -> tuple[list[dict[str, Any]], TreeStats]:
        try:
            self._walk(self.root, "")
            self._drain(force=True)
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
        return self.items, self.stats

    def _walk(self, path: Path, rel: str) -> None:
        try:
            st = os.lstat(path)
            item = self._meta(path, rel, st)
        except OSError as exc:
            self._error(rel, exc)
            return
        kind = item["k"]
        if kind == "f":
            self._file(path, rel, st, item)
        else:
            self._queue(item)
        if kind == "d":
            self.stats.dirs += 1
            if rel and st.st_dev != self.root_dev:
                return  # stay on one filesystem (like borg --one-file-system)
            try:
                names = sorted(os.listdir(path))
            except OSError as exc:
                self._error(rel, exc)
                return
            for name in names:
                self._walk(path / name, f"{rel}/{name}" if rel else name)
        elif kind != "f":
            self.stats.others += 1

    def _queue(self, item: dict[str, Any]) -> None:
        if not self.waiting:
            self.items.append(item)
        else:
            self.waiting.append(_Waiting(item))
            self._drain()

    def _error(self, rel: str, exc: OSError) -> None:
        """Record an entry (or a directory's listing) that is not in the point, and why."""
        why = exc.strerror or str(exc)
        self.stats.errors += 1
        self.errors.append({"path": display_path(rel or "."), "error": why})
        log.warning("skipping %s: %s", display_path(rel or "."), why)

    def _forget_link(self, item: dict[str, Any], st: os.stat_result) -> None:
        """A first hard link that could not be read: the next link is read on its own."""
        if "h" not in item and self.links.get((st.st_dev, st.st_ino)) == item["p"]:
            del self.links[(st.st_dev, st.st_ino)]

    def _meta(self, path: Path, rel: str, st: os.stat_result) -> dict[str, Any]:
        kind = _KIND_OF_MODE.get(stat.S_IFMT(st.st_mode), "f")
        item: dict[str, Any] = {
            "p": rel,
            "k": kind,
            "m": st.st_mode,
            "u": st.st_uid,
            "g": st.st_gid,
            "s": st.st_size if kind == "f" else 0,
            "a": st.st_atime_ns,
            "t": st.st_mtime_ns,
            "n": st.st_ctime_ns,
        }
        try:
            names = os.listxattr(path, follow_symlinks=False)
        except OSError:
            names = []
        if names:
            xattrs = {}
            for name in names:
                try:
                    xattrs[name] = os.getxattr(path, name, follow_symlinks=False)
                except OSError:
                    continue
            item["x"] = xattrs
        if kind == "l":
            item["l"] = os.readlink(path)
        elif kind in "cb":
            item["r"] = st.st_rdev
        if kind != "d" and st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            first = self.links.get(key)
            if first is not None:
                item["h"] = first
            else:
                self.links[key] = rel
        return item

    def _file(self, path: Path, rel: str, st: os.stat_result, item: dict[str, Any]) -> None:
        self.stats.files += 1
        self.stats.logical_bytes += st.st_size
        if "h" in item:  # hard link to an entry already stored
            self._queue(item)
            return
        ckey = self.repo.index.files_key(self.source, rel)
        sig = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        if self.use_cache:
            cached = self.repo.index.files_get(self.source, rel)
            if cached is not None and cached.get("sig") == sig:
                ids = [bytes(c[0]) for c in cached["c"]]
                if all(self.repo.index.has_many(ids)):
                    item["c"] = cached["c"]
                    if cached.get("e") is not None:
                        item["e"] = cached["e"]
                    self.stats.cached_files += 1
                    self.cache.append((ckey, {"sig": sig, "e": cached.get("e")}, item))
                    self._queue(item)
                    return
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOATIME)
        except PermissionError:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as exc:
            self._error(rel, exc)
            self._forget_link(item, st)
            return
        waiting = _Waiting(item, complete=False)
        self.waiting.append(waiting)
        after: os.stat_result | None = None
        consumed = 0
        try:
            extents = None
            if st.st_blocks * 512 < st.st_size:
                extents = _data_extents(fd, st.st_size)
            if extents is not None:
                item["e"] = [list(e) for e in extents]
            consumed = self._chunk_file(fd, extents or [(0, st.st_size)], waiting)
            after = os.fstat(fd)
        except OSError as exc:
            waiting.skip = True  # batches already submitted finish, then the item is dropped
            self._error(rel, exc)
            self._forget_link(item, st)
        finally:
            os.close(fd)
            waiting.complete = True
        if after is not None:
            if extents is None and consumed < st.st_size:
                item["s"] = consumed  # it shrank under us: the point holds what was there
            change = _change(st, after)
            if change:
                self.stats.changed += 1
                self.changed.append({"path": display_path(rel), "change": change})
                log.info("%s changed while it was read (%s)", display_path(rel), change)
            else:  # a torn copy must not be trusted by the next incremental
                self.cache.append((ckey, {"sig": sig, "e": item.get("e")}, item))
        self._drain()
        if self.progress:
            self.progress(self.stats.read_bytes, 0)

    def _submit(self, batch: list[bytes], waiting: _Waiting) -> None:
        waiting.futs.append(self.pool.submit(self._seal_batch, batch))
        self.inflight += 1
        if self.inflight > self.limit:
            self._drain()

    def _chunk_file(self, fd: int, extents: list[tuple[int, int]], waiting: _Waiting) -> int:
        """Cut the file's data extents (as one stream) with FastCDC and submit batches.

        Returns the bytes read (less than the extents hold if the file shrank). Raises OSError
        when a read fails."""
        batch: list[bytes] = []
        batch_bytes = 0
        leftover = b""
        total = sum(n for _o, n in extents)
        consumed = 0
        for start, length in extents:
            pos, end = start, start + length
            while pos < end:
                data = os.pread(fd, min(READ_WINDOW, end - pos), pos)
                if not data:
                    break  # file shrank while we read it
                pos += len(data)
                consumed += len(data)
                self.stats.read_bytes += len(data)
                if self.progress:
                    self.progress(self.stats.read_bytes, 0)
                buf = leftover + data if leftover else data
                view = memoryview(buf)
                cuts = list(self.cdc.cut_buf(view))
                if consumed < total and cuts:
                    # the last cut of a window is not a real boundary: carry it over
                    leftover = bytes(view[cuts[-1].offset :])
                    cuts = cuts[:-1]
                else:
                    leftover = b""
                for c in cuts:
                    batch.append(bytes(view[c.offset : c.offset + c.length]))
                    batch_bytes += c.length
                    if batch_bytes >= 4 * 1024 * 1024:
                        self._submit(batch, waiting)
                        batch, batch_bytes = [], 0
        if leftover:
            batch.append(leftover)
        if batch:
            self._submit(batch, waiting)
        return consumed


def _change(before: os.stat_result, after: os.stat_result) -> str:
    """How a file changed between the lstat before its read and the fstat after ("" if not)."""
    what = []
    if after.st_size != before.st_size:
        what.append(f"size {before.st_size} -> {after.st_size}")
    if after.st_mtime_ns != before.st_mtime_ns:
        what.append("mtime")
    return ", ".join(what)


def display_path(name: str) -> str:
    """A name from os.fsdecode as printable text: non-UTF-8 bytes become `\\xNN` escapes.

    For output only (terminal, JSON, reports); never for opening files.
    """
    return os.fsencode(name).decode("utf-8", "backslashreplace")


# Item fields that hold names or paths (bytes on Linux): str on the wire when valid UTF-8.
_NAME_FIELDS = ("p", "h", "l")


def _wire_name(name: str) -> str | bytes:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(name)  # the original bytes (surrogateescape)
    return name


def _encode_item(item: dict[str, Any]) -> bytes:
    """One item as msgpack; names that are not UTF-8 go as bin (see the module docstring)."""
    out = dict(item)
    for key in _NAME_FIELDS:
        if isinstance(out.get(key), str):
            out[key] = _wire_name(out[key])
    if out.get("x"):
        out["x"] = {_wire_name(k): v for k, v in out["x"].items()}
    return bytes(msgpack.packb(out))


def _name_of(value: Any) -> Any:
    """A name read from the item stream: bin (raw bytes) back to a surrogateescape str."""
    return os.fsdecode(bytes(value)) if isinstance(value, bytes | bytearray) else value


def backup_tree(
    repo: Repository,
    root: Path,
    *,
    source: str,
    mode: str = "incremental",
    progress: Progress | None = None,
    label: str | None = None,
) -> Point:
    """Back up directory `root` as a file-tree point. Writer only."""
    validate_source_name(source)
    root = Path(root)
    if not root.is_dir():
        raise NotFound(f"{root}: not a directory")
    if mode not in ("full", "incremental", "differential"):
        raise InvalidArgument(f"unknown mode {mode!r} (full, incremental, differential)")
    earlier = [p for p in repo.list_points(source) if p.kind == "files"]
    if mode == "differential":
        earlier = [p for p in earlier if p.mode in ("full", "synthetic")]
    base = earlier[-1] if earlier and mode != "full" else None
    started = time.time()
    tb = _TreeBackup(repo, root, source, use_cache=base is not None, progress=progress)
    items, stats = tb.run()
    tree_ids = _store_items(repo, items, stats)
    kept = {id(item) for item in items}
    files_cache: list[tuple[bytes, dict[str, Any] | None]] = [
        (k, {**rec, "c": item["c"]}) for k, rec, item in tb.cache if id(item) in kept
    ]
    now = time.time_ns()
    manifest: dict[str, Any] = {
        "v": 1,
        "kind": "files",
        "source": source,
        "id": repo.new_point_id(source, now),
        "time_ns": now,
        "mode": mode if base is not None else "full",
        "parent": base.id if base is not None else None,
        "tree": tree_ids,
        "root_path": display_path(str(root.resolve())),
        "entries": len(items),
        "label": label,
        "complete": not tb.errors,
        "errors": tb.errors,
        "changed": tb.changed,
        "stats": {**stats.as_dict(), "duration_s": round(time.time() - started, 3)},
    }
    return repo.commit_point(manifest, files=files_cache)


def _store_items(repo: Repository, items: list[dict[str, Any]], stats: TreeStats) -> list[bytes]:
    stream = b"".join(_encode_item(i) for i in items)
    cdc = FastCDC(TREE_CDC[1], min_size=TREE_CDC[0], max_size=TREE_CDC[2])
    ids: list[bytes] = []
    view = memoryview(stream)
    for c in cdc.cut_buf(view) if stream else []:
        res = repo.put(Kind.TREE, bytes(view[c.offset : c.offset + c.length]))
        if not res.duplicate:
            stats.stored_bytes += res.stored_bytes
        ids.append(res.chunk_id)
    return ids


@dataclass(frozen=True, slots=True)
class TreeEntry:
    """One entry of a file-tree point (what a FUSE layer or a restore needs)."""

    path: str
    name: str
    kind: str  # dir, file, symlink, fifo, chr, blk, sock
    mode: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    nlink: int
    ino: int
    target: str | None
    rdev: int
    xattrs: dict[str, bytes] = field(default_factory=dict)


@dataclass
class _FileData:
    chunks: list[tuple[ChunkId, int]]
    starts: list[int]  # data-stream offset of each chunk
    extents: list[tuple[int, int]]  # (file offset, length) of data; the rest are holes


class FileTree:
    """A file-tree point loaded for browsing and reading. Thread-safe."""

    def __init__(self, repo: Repository, point: Point) -> None:
        if point.kind != "files":
            raise InvalidArgument(f"{point.name} is a {point.kind} point, not a file tree")
        self.repo = repo
        self.point = point
        self._entries: dict[str, TreeEntry] = {}
        self._children: dict[str, list[str]] = {}
        self._data: dict[int, _FileData] = {}
        self._chunk_cache: OrderedDict[bytes, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._load()

    def _load(self) -> None:
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=64 * 1024 * 1024)
        raw_items: list[dict[str, Any]] = []
        for cid in self.point.manifest.get("tree", []):
            unpacker.feed(self.repo.get(bytes(cid)))
            for obj in unpacker:
                if not isinstance(obj, dict) or "p" not in obj:
                    raise FormatError(f"{self.point.name}: bad item in tree stream")
                for key in _NAME_FIELDS:
                    if key in obj:
                        obj[key] = _name_of(obj[key])
                if obj.get("x"):
                    obj["x"] = {_name_of(k): v for k, v in obj["x"].items()}
                raw_items.append(obj)
        by_path = {it["p"]: it for it in raw_items}
        ino_of: dict[str, int] = {}
        nlinks: dict[int, int] = {}
        for n, it in enumerate(raw_items, start=1):
            ino = ino_of.get(it["h"], n) if "h" in it else n
            ino_of[it["p"]] = ino
            nlinks[ino] = nlinks.get(ino, 0) + 1
        for it in raw_items:
            path = it["p"]
            ino = ino_of[path]
            src = by_path.get(it["h"], it) if "h" in it else it
            kind = KIND_NAMES.get(it["k"], "file")
            entry = TreeEntry(
                path=path,
                name=path.rsplit("/", 1)[-1],
                kind=kind,
                mode=it["m"],
                uid=it["u"],
                gid=it["g"],
                size=src.get("s", 0),
                atime_ns=it["a"],
                mtime_ns=it["t"],
                ctime_ns=it["n"],
                nlink=nlinks[ino] if kind != "dir" else 2,
                ino=ino,
                target=it.get("l"),
                rdev=it.get("r", 0),
                xattrs={str(k): bytes(v) for k, v in (it.get("x") or {}).items()},
            )
            self._entries[path] = entry
            if path:
                parent = path.rsplit("/", 1)[0] if "/" in path else ""
                self._children.setdefault(parent, []).append(path)
            if kind == "file" and ino not in self._data and "c" in src:
                chunks = [(ChunkId(bytes(c[0])), int(c[1])) for c in src["c"]]
                starts, pos = [], 0
                for _cid, n in chunks:
                    starts.append(pos)
                    pos += n
                ext = (
                    [(int(a), int(b)) for a, b in src["e"]]
                    if src.get("e") is not None
                    else [(0, src.get("s", 0))]
                )
                self._data[ino] = _FileData(chunks, starts, ext)
        if "" not in self._entries:
            raise FormatError(f"{self.point.name}: tree has no root entry")

    @property
    def root(self) -> TreeEntry:
        return self._entries[""]

    def lookup(self, path: str) -> TreeEntry:
        entry = self._entries.get(path.strip("/"))
        if entry is None:
            raise NotFound(f"{self.point.name}: no such path {path!r}")
        return entry

    def children(self, path: str) -> list[TreeEntry]:
        entry = self.lookup(path)
        if entry.kind != "dir":
            raise InvalidArgument(f"{path!r} is not a directory")
        return [self._entries[p] for p in self._children.get(entry.path, [])]

    def walk(self) -> Iterator[TreeEntry]:
        """Every entry, parents before children."""
        yield from self._entries.values()

    def _chunk(self, cid: ChunkId) -> bytes:
        with self._lock:
            data = self._chunk_cache.get(cid)
            if data is not None:
                self._chunk_cache.move_to_end(cid)
                return data
        data = self.repo.get(cid)
        with self._lock:
            self._chunk_cache[cid] = data
            while len(self._chunk_cache) > 64:
                self._chunk_cache.popitem(last=False)
        return data

    def _stream_read(self, fd: _FileData, pos: int, length: int) -> bytes:
        """Bytes [pos, pos+length) of the file's data stream (extents concatenated)."""
        out = []
        i = max(0, bisect.bisect_right(fd.starts, pos) - 1)
        while length > 0 and i < len(fd.chunks):
            cid, n = fd.chunks[i]
            data = self._chunk(cid)
            if len(data) != n:
                raise ChunkCorrupt(f"chunk {cid.hex()[:16]} has {len(data)} bytes, expected {n}")
            start = pos - fd.starts[i]
            piece = data[start : start + length]
            out.append(piece)
            pos += len(piece)
            length -= len(piece)
            i += 1
        return b"".join(out)

    def read(self, entry: TreeEntry, offset: int, length: int) -> bytes:
        if entry.kind != "file":
            raise InvalidArgument(f"{entry.path!r} is not a regular file")
        fdata = self._data.get(entry.ino)
        end = min(entry.size, offset + length)
        if fdata is None or offset >= end:
            return b""
        out = bytearray(end - offset)
        stream_pos = 0
        for ext_off, ext_len in fdata.extents:
            lo, hi = max(offset, ext_off), min(end, ext_off + ext_len)
            if lo < hi:
                piece = self._stream_read(fdata, stream_pos + (lo - ext_off), hi - lo)
                out[lo - offset : lo - offset + len(piece)] = piece
            stream_pos += ext_len
        return bytes(out)

    def data_extents(self, entry: TreeEntry) -> list[tuple[int, int]]:
        fdata = self._data.get(entry.ino)
        return [] if fdata is None else list(fdata.extents)

    def chunk_ids(self) -> Iterator[ChunkId]:
        for fd in self._data.values():
            for cid, _n in fd.chunks:
                yield cid


def open_tree(repo: Repository, point: Point) -> FileTree:
    return FileTree(repo, point)


def restore_tree(
    repo: Repository,
    point: Point,
    dest: Path,
    *,
    subpath: str = "",
    progress: Progress | None = None,
) -> int:
    """Restore a file-tree point (or one path of it) into directory `dest`. Returns the
    number of entries restored.

    A directory is restored into `dest`; a single file or other entry becomes `dest` (or
    `dest/NAME` if `dest` is an existing directory). Everything beneath is written through
    :class:`~dedupstore._dest.Dest`: no symlink in `dest`, nor one this restore creates, is
    ever followed. An entry that cannot be placed safely (a name such as "..", a path through
    a symlink, a non-empty directory in its way) is skipped with a WARNING naming it.
    """
    tree = FileTree(repo, point)
    top = tree.lookup(subpath)
    dest = Path(dest)
    is_root = os.geteuid() == 0
    prefix = top.path
    root, top_rel = placement(dest, is_dir=top.kind == "dir", name=top.name)
    entries = [
        e for e in tree.walk() if e.path == prefix or not prefix or e.path.startswith(prefix + "/")
    ]
    first_path: dict[int, str] = {}
    dirs: list[tuple[str, TreeEntry]] = []
    links: list[tuple[str, int]] = []
    total = sum(e.size for e in entries if e.kind == "file")
    done = 0
    skipped = 0

    def write_file(e: TreeEntry, fd: int) -> int:
        try:
            _restore_file(tree, e, fd)
            set_fd_meta(fd, _dest_meta(e), owner=is_root)
        finally:
            os.close(fd)
        return e.size

    def skip(exc: UnsafePath) -> None:
        nonlocal skipped
        skipped += 1
        log.warning("%s: not restored: %s", point.name, exc)

    # Files are written on a pool (decompression and writes overlap across cores); the
    # namespace (dirs, links, specials, new files' fds) is created in order on this thread.
    with (
        Dest(root) as out,
        ThreadPoolExecutor(worker_count(), thread_name_prefix="restore") as pool,
    ):
        futs: deque[Future[int]] = deque()
        for e in entries:
            sub = e.path[len(prefix) :].lstrip("/") if prefix else e.path
            rel = f"{top_rel}/{sub}" if top_rel and sub else (top_rel or sub)
            try:
                if e.kind == "dir":
                    out.mkdir(rel)
                    dirs.append((rel, e))
                    continue
                if e.ino in first_path:
                    links.append((rel, e.ino))
                    continue
                if e.kind == "file":
                    fd = out.create_file(rel)
                    first_path[e.ino] = rel
                    futs.append(pool.submit(write_file, e, fd))
                    while len(futs) > 8 * worker_count() or (futs and futs[0].done()):
                        done += futs.popleft().result()
                        if progress:
                            progress(done, total)
                    continue
                if e.kind == "symlink":
                    out.symlink(rel, e.target or "")
                elif e.kind == "fifo":
                    out.mkfifo(rel)
                elif e.kind in ("chr", "blk") and is_root:
                    out.mknod(rel, e.mode, e.rdev)
                else:
                    log.info("not restoring %s %s", e.kind, e.path)
                    continue
                first_path[e.ino] = rel
                out.set_meta(rel, _dest_meta(e), owner=is_root)
            except UnsafePath as exc:
                skip(exc)
        while futs:
            done += futs.popleft().result()
            if progress:
                progress(done, total)
        for rel, ino in links:
            try:
                out.link(first_path[ino], rel)
            except UnsafePath as exc:
                skip(exc)
        for rel, e in reversed(dirs):
            out.set_meta(rel, _dest_meta(e), owner=is_root)
    return len(entries) - skipped


def _dest_meta(e: TreeEntry) -> DestMeta:
    return DestMeta(e.mode, e.uid, e.gid, e.atime_ns, e.mtime_ns, e.xattrs)


def _restore_file(tree: FileTree, e: TreeEntry, fd: int) -> None:
    os.ftruncate(fd, e.size)
    for off, length in tree.data_extents(e):
        pos = off
        while pos < off + length:
            n = min(8 * 1024 * 1024, off + length - pos)
            data = tree.read(e, pos, n)
            os.pwrite(fd, data, pos)
            pos += n
