"""The protocol-free namespace a mount shows: inodes, attributes, lookup, readdir, read.

Owns the layout of a mounted repository (or of one point) and the inode table. It must not
import pyfuse3 or trio: every method here is synchronous and thread-safe, so the adapter in
`vfs/fuse.py` can run the blocking ones on worker threads, and tests can drive it directly.

Layout, whole repository (`RepoRoot`)::

    <source>/                      one directory per source, listed live from the catalogue
    <source>/latest -> <point-id>  symlink to the newest point
    <source>/<point-id>/           the point's content (below)

Point content (`PointDir`), image point::

    disk0.img                      raw bytes of the disk (a DiskReader)
    disk0/p1/ ...                  files of partition 1 (image.open_filesystem)
    disk0/fs/ ...                  a disk without a partition table but with a filesystem

and file-tree point::

    files/ ...                     the tree with its modes, owners, times, links and xattrs

Inode numbers: a node has a hashable `key`; the table hands out one number per key while the
kernel remembers it (lookup count > 0, FUSE `forget` semantics) and never reuses a number, so
`generation` can stay 0. Hard links share a key (point, tree inode), hence a number.

Errors: missing names raise `OSError(ENOENT)` and friends; `dedupstore.StoreError` and
`image.ImageError` propagate unchanged for the adapter to map. A filesystem inside an image
that cannot be opened shows as an empty directory and is logged once.
"""

from __future__ import annotations

import errno
import logging
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import image
from dedupstore import InvalidArgument, Point, Repository, disk_readers, valid_name
from dedupstore import NotFound as StoreNotFound

log = logging.getLogger(__name__)

#: Attribute/entry cache time for point content, which never changes once committed.
IMMUTABLE_TIMEOUT_S = 3600.0
#: Cache time for the live parts of the namespace (sources, point lists, `latest`).
LIVE_TIMEOUT_S = 1.0
#: Points whose readers, partition tables and opened filesystems are kept warm.
POINT_CACHE_SIZE = 8  # each disk reader keeps up to 16 MiB of blocks

DIR_MODE = stat.S_IFDIR | 0o555
FILE_MODE = stat.S_IFREG | 0o444
LINK_MODE = stat.S_IFLNK | 0o777

# st_mode type bits of the file-tree kinds (TreeEntry.mode normally carries them already).
_TREE_TYPE_BITS = {
    "dir": stat.S_IFDIR,
    "file": stat.S_IFREG,
    "symlink": stat.S_IFLNK,
    "fifo": stat.S_IFIFO,
    "chr": stat.S_IFCHR,
    "blk": stat.S_IFBLK,
    "sock": stat.S_IFSOCK,
}


def _err(code: int, what: str) -> OSError:
    return OSError(code, f"{what}: {errno.errorcode.get(code, code)}")


@dataclass(frozen=True, slots=True)
class Attr:
    """What `stat` shows for a node. `live` nodes get short kernel cache timeouts."""

    mode: int
    size: int = 0
    uid: int = 0
    gid: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    nlink: int = 1
    rdev: int = 0
    live: bool = False

    @property
    def timeout_s(self) -> float:
        return LIVE_TIMEOUT_S if self.live else IMMUTABLE_TIMEOUT_S


def _dir_attr(time_ns: int, *, live: bool = False) -> Attr:
    return Attr(DIR_MODE, 0, 0, 0, time_ns, time_ns, time_ns, 2, 0, live)


# -- nodes -----------------------------------------------------------------------------------


class Node:
    """One name in the namespace. Subclasses override what their kind supports.

    `key` identifies the node across lookups (same key -> same inode number). `attr` is
    computed when the node is built (on a worker thread), so `getattr` never blocks.
    """

    key: Hashable
    attr: Attr

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.attr.mode)

    def lookup(self, name: str) -> Node:
        """The child called `name`; raises OSError(ENOENT/ENOTDIR). May block."""
        for child_name, child in self.children():
            if child_name == name:
                return child
        raise _err(errno.ENOENT, name)

    def children(self) -> list[tuple[str, Node]]:
        """(name, node) pairs, sorted by name. May block."""
        raise _err(errno.ENOTDIR, repr(self.key))

    def read(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes at `offset` (short only at end of file). May block."""
        raise _err(errno.EISDIR if self.is_dir else errno.EINVAL, repr(self.key))

    def readlink(self) -> str:
        raise _err(errno.EINVAL, repr(self.key))

    def xattrs(self) -> dict[str, bytes]:
        return {}


class EmptyDir(Node):
    """A directory with nothing in it (a partition whose filesystem could not be opened)."""

    def __init__(self, key: Hashable, time_ns: int) -> None:
        self.key = key
        self.attr = _dir_attr(time_ns)

    def children(self) -> list[tuple[str, Node]]:
        return []


class ByteSource(Protocol):
    """Random access to the bytes of a disk (dedupstore.DiskReader is one)."""

    def size_bytes(self) -> int: ...

    def pread(self, offset: int, length: int) -> bytes: ...


class RawFile(Node):
    """A read-only regular file over a ByteSource: the raw view of a disk."""

    def __init__(self, key: Hashable, src: ByteSource, time_ns: int) -> None:
        self.key = key
        self.src = src
        size = src.size_bytes()
        self.attr = Attr(FILE_MODE, size, 0, 0, time_ns, time_ns, time_ns, 1)

    def read(self, offset: int, length: int) -> bytes:
        return self.src.pread(offset, length)


class DirCache:
    """A bounded LRU of directory listings inside image filesystems, by (scope, inode).

    image.Filesystem has no child lookup cheaper than a directory scan, so a lookup reuses
    the scan a readdir (or an earlier lookup) made. Listings of a point never change.
    """

    def __init__(self, max_dirs: int = 1024) -> None:
        self.max_dirs = max_dirs
        self._lock = threading.Lock()
        self._dirs: OrderedDict[Hashable, dict[str, image.Node]] = OrderedDict()

    def listing(self, key: Hashable, node: image.Node) -> dict[str, image.Node]:
        with self._lock:
            hit = self._dirs.get(key)
            if hit is not None:
                self._dirs.move_to_end(key)
                return hit
        # Blocking scan outside the lock; two racing scans of one directory are harmless.
        kids = {n.name: n for n in sorted(node.listdir(), key=lambda n: n.name)
                if _valid_name(n.name)}
        with self._lock:
            self._dirs[key] = kids
            while len(self._dirs) > self.max_dirs:
                self._dirs.popitem(last=False)
        return kids


class FsNode(Node):
    """A file, directory or symlink of a filesystem inside a disk image (image.Node)."""

    def __init__(self, scope: Hashable, node: image.Node, dirs: DirCache) -> None:
        # Hard links inside the image share an inode, hence a key and a FUSE inode number.
        self.key = (scope, node.inode)
        self.scope = scope
        self.node = node
        self.dirs = dirs
        self.attr = Attr(
            node.mode, node.size, node.uid, node.gid, node.atime_ns, node.mtime_ns,
            node.ctime_ns, max(1, node.nlink),
        )

    def _listing(self) -> dict[str, image.Node]:
        if self.node.kind != "dir":
            raise _err(errno.ENOTDIR, self.node.name)
        return self.dirs.listing(self.key, self.node)

    def lookup(self, name: str) -> Node:
        child = self._listing().get(name)
        if child is None:
            raise _err(errno.ENOENT, name)
        return FsNode(self.scope, child, self.dirs)

    def children(self) -> list[tuple[str, Node]]:
        return [(name, FsNode(self.scope, n, self.dirs)) for name, n in self._listing().items()]

    def read(self, offset: int, length: int) -> bytes:
        if self.node.kind == "dir":
            raise _err(errno.EISDIR, self.node.name)
        if self.node.kind != "file":
            raise _err(errno.EINVAL, self.node.name)
        return self.node.read(offset, length)

    def readlink(self) -> str:
        if self.node.kind != "symlink":
            raise _err(errno.EINVAL, self.node.name)
        return self.node.readlink()


class FileTree(Protocol):
    """What `dedupstore.open_tree` returns (typed structurally: vfs reads, never builds)."""

    def lookup(self, path: str) -> Any: ...

    def children(self, path: str) -> Sequence[Any]: ...

    def read(self, entry: Any, offset: int, length: int) -> bytes: ...


class TreeNode(Node):
    """An entry of a file-tree point (dedupstore TreeEntry)."""

    def __init__(self, scope: Hashable, tree: FileTree, entry: Any) -> None:
        # entry.ino is stable within the point and shared by hard links.
        self.key = (scope, entry.ino)
        self.scope = scope
        self.tree = tree
        self.entry = entry
        mode = int(entry.mode)
        if stat.S_IFMT(mode) == 0:
            mode |= _TREE_TYPE_BITS.get(entry.kind, stat.S_IFREG)
        size = int(entry.size)
        if entry.kind == "symlink" and entry.target is not None:
            size = len(str(entry.target).encode("utf-8", "surrogateescape"))
        self.attr = Attr(
            mode, size, int(entry.uid), int(entry.gid), int(entry.atime_ns),
            int(entry.mtime_ns), int(entry.ctime_ns), max(1, int(entry.nlink)),
            int(entry.rdev or 0),
        )

    def lookup(self, name: str) -> Node:
        if self.entry.kind != "dir":
            raise _err(errno.ENOTDIR, self.entry.path)
        path = f"{self.entry.path}/{name}" if self.entry.path else name
        try:
            child = self.tree.lookup(path)
        except StoreNotFound:
            raise _err(errno.ENOENT, path) from None
        return TreeNode(self.scope, self.tree, child)

    def children(self) -> list[tuple[str, Node]]:
        if self.entry.kind != "dir":
            raise _err(errno.ENOTDIR, self.entry.path)
        return [
            (e.name, TreeNode(self.scope, self.tree, e))
            for e in self.tree.children(self.entry.path)
            if _valid_name(e.name)
        ]

    def read(self, offset: int, length: int) -> bytes:
        if self.entry.kind == "dir":
            raise _err(errno.EISDIR, self.entry.path)
        if self.entry.kind != "file":
            raise _err(errno.EINVAL, self.entry.path)
        return self.tree.read(self.entry, offset, length)

    def readlink(self) -> str:
        if self.entry.kind != "symlink" or self.entry.target is None:
            raise _err(errno.EINVAL, self.entry.path)
        return str(self.entry.target)

    def xattrs(self) -> dict[str, bytes]:
        return dict(self.entry.xattrs or {})


# A damaged filesystem may hold names the kernel would reject or misinterpret; restores skip
# the same names (one filter: dedupstore.valid_name).
_valid_name = valid_name


# -- points ----------------------------------------------------------------------------------


class PointContext:
    """Everything opened for one point: disk readers, partition tables, filesystems, tree.

    Opened lazily, once, under a per-point lock (a second reader waits for the first instead
    of parsing the same filesystem twice). Thread-safe.
    """

    def __init__(self, repo: Repository, point: Point,
                 open_tree: Callable[[Repository, Point], FileTree] | None) -> None:
        self.repo = repo
        self.point = point
        self._open_tree = open_tree
        self._lock = threading.RLock()
        self._readers: dict[str, ByteSource] | None = None
        self._layouts: dict[str, dict[str, tuple[ByteSource, str | None]]] = {}
        self._filesystems: dict[tuple[str, str], image.Filesystem | None] = {}
        self._tree: FileTree | None = None
        self.dirs = DirCache()

    def readers(self) -> dict[str, ByteSource]:
        with self._lock:
            if self._readers is None:
                self._readers = {r.name: r for r in disk_readers(self.repo, self.point)}
            return self._readers

    def volumes(self, disk: str) -> dict[str, tuple[ByteSource, str | None]]:
        """Browsable volumes of a disk: {"p1": (source, fs_type), ...} or {"fs": ...}."""
        with self._lock:
            vols = self._layouts.get(disk)
            if vols is not None:
                return vols
            src = self.readers()[disk]
            vols = {}
            try:
                layout = image.open_disk(src)
            except image.ImageError as exc:
                log.warning("%s %s: partition table unreadable, showing no volumes: %s",
                            self.point.name, disk, exc)
            else:
                for part in layout.partitions:
                    vols[part.name] = (part.source, part.fs_type)
                if layout.scheme == "none" and layout.fs_type is not None:
                    vols["fs"] = (src, layout.fs_type)
            self._layouts[disk] = vols
            return vols

    def filesystem(self, disk: str, volume: str) -> image.Filesystem | None:
        """The opened filesystem of a volume, or None (logged once) if it cannot be opened."""
        with self._lock:
            if (disk, volume) in self._filesystems:
                return self._filesystems[(disk, volume)]
            src, fs_type = self.volumes(disk)[volume]
            fs: image.Filesystem | None = None
            if fs_type is None:
                log.info("%s %s/%s: no filesystem recognised", self.point.name, disk, volume)
            else:
                try:
                    fs = image.open_filesystem(src, fs_type)
                except image.ImageError as exc:
                    log.warning("%s %s/%s: %s filesystem cannot be opened, shown empty: %s",
                                self.point.name, disk, volume, fs_type, exc)
            self._filesystems[(disk, volume)] = fs
            return fs

    def tree(self) -> FileTree:
        with self._lock:
            if self._tree is None:
                if self._open_tree is None:
                    raise _err(errno.ENOSYS, "file-tree points are not supported by this store")
                self._tree = self._open_tree(self.repo, self.point)
            return self._tree


class PointDir(Node):
    """The content of one point: disk images and their volumes, or the `files` tree."""

    def __init__(self, ctx: PointContext, *, live: bool = False) -> None:
        self.ctx = ctx
        self.key = ("point", ctx.point.name)
        self.attr = _dir_attr(ctx.point.time_ns, live=live)

    def children(self) -> list[tuple[str, Node]]:
        point = self.ctx.point
        out: list[tuple[str, Node]] = []
        if point.kind == "image":
            for name, reader in self.ctx.readers().items():
                out.append((f"{name}.img", RawFile((point.name, name, "img"), reader,
                                                   point.time_ns)))
                out.append((name, DiskDir(self.ctx, name)))
        elif point.kind == "files":
            tree = self.ctx.tree()
            out.append(("files", TreeNode((point.name, "files"), tree, tree.lookup(""))))
        else:
            log.info("%s: point kind %r has no view", point.name, point.kind)
        return sorted(out, key=lambda kv: kv[0])


class DiskDir(Node):
    """`disk0/`: one directory per browsable volume of a disk."""

    def __init__(self, ctx: PointContext, disk: str) -> None:
        self.ctx = ctx
        self.disk = disk
        self.key = (ctx.point.name, disk, "dir")
        self.attr = _dir_attr(ctx.point.time_ns)

    def children(self) -> list[tuple[str, Node]]:
        return [(vol, self._volume(vol)) for vol in sorted(self.ctx.volumes(self.disk))]

    def lookup(self, name: str) -> Node:
        if name not in self.ctx.volumes(self.disk):
            raise _err(errno.ENOENT, name)
        return self._volume(name)

    def _volume(self, vol: str) -> Node:
        scope = (self.ctx.point.name, self.disk, vol)
        fs = self.ctx.filesystem(self.disk, vol)
        if fs is None:
            return EmptyDir((scope, "empty"), self.ctx.point.time_ns)
        return FsNode(scope, fs.root, self.ctx.dirs)


# -- the live catalogue -----------------------------------------------------------------------


class LatestLink(Node):
    """`<source>/latest`, a symlink to the id of the newest point, re-read on every use."""

    def __init__(self, source: str, target: str, time_ns: int) -> None:
        self.key = ("latest", source)
        self.target = target
        self.attr = Attr(LINK_MODE, len(target.encode()), 0, 0, time_ns, time_ns, time_ns,
                         1, 0, live=True)

    def readlink(self) -> str:
        return self.target


class Catalogue:
    """Shared state of a mount: the repository and an LRU of opened points. Thread-safe."""

    def __init__(self, repo: Repository,
                 open_tree: Callable[[Repository, Point], FileTree] | None = None,
                 cache_size: int = POINT_CACHE_SIZE) -> None:
        self.repo = repo
        self.open_tree = open_tree
        self.cache_size = cache_size
        self._lock = threading.Lock()
        self._contexts: OrderedDict[str, PointContext] = OrderedDict()

    def context(self, point: Point) -> PointContext:
        with self._lock:
            ctx = self._contexts.get(point.name)
            if ctx is not None and ctx.point.manifest_id == point.manifest_id:
                self._contexts.move_to_end(point.name)
                return ctx
            ctx = PointContext(self.repo, point, self.open_tree)
            self._contexts[point.name] = ctx
            while len(self._contexts) > self.cache_size:
                self._contexts.popitem(last=False)
            return ctx


class SourceDir(Node):
    """`<source>/`: the points of one source plus `latest`, listed live."""

    def __init__(self, cat: Catalogue, source: str, time_ns: int) -> None:
        self.cat = cat
        self.source = source
        self.key = ("source", source)
        self.attr = _dir_attr(time_ns, live=True)

    def children(self) -> list[tuple[str, Node]]:
        points = self.cat.repo.list_points(self.source)
        out: list[tuple[str, Node]] = [
            (p.id, PointDir(self.cat.context(p))) for p in points if _valid_name(p.id)
        ]
        if points:
            out.append(("latest", LatestLink(self.source, points[-1].id, points[-1].time_ns)))
        return sorted(out, key=lambda kv: kv[0])

    def lookup(self, name: str) -> Node:
        try:
            point = self.cat.repo.resolve(f"{self.source}@{name}")
        except (StoreNotFound, InvalidArgument):
            raise _err(errno.ENOENT, name) from None
        if name == "latest":
            return LatestLink(self.source, point.id, point.time_ns)
        return PointDir(self.cat.context(point))


class RepoRoot(Node):
    """The mount root in whole-repository mode: one directory per source, listed live.

    Listing decodes no manifests (a repository may hold thousands of points); a source
    directory's times are those of its newest point once it has been looked up.
    """

    def __init__(self, cat: Catalogue) -> None:
        self.cat = cat
        self.key = "root"
        self.mount_time_ns = time.time_ns()
        self.attr = _dir_attr(self.mount_time_ns, live=True)

    def children(self) -> list[tuple[str, Node]]:
        return [(source, SourceDir(self.cat, source, self.mount_time_ns))
                for source in self.cat.repo.sources() if _valid_name(source)]

    def lookup(self, name: str) -> Node:
        if not _valid_name(name):
            raise _err(errno.ENOENT, name)
        try:
            latest = self.cat.repo.resolve(f"{name}@latest")
        except (StoreNotFound, InvalidArgument):
            raise _err(errno.ENOENT, name) from None
        return SourceDir(self.cat, name, latest.time_ns)


# -- the inode table ---------------------------------------------------------------------------


ROOT_INO = 1


class _Slot:
    __slots__ = ("lookups", "node")

    def __init__(self, node: Node, lookups: int) -> None:
        self.node = node
        self.lookups = lookups


class Namespace:
    """Inode numbers over a tree of nodes, with FUSE lookup-count semantics. Thread-safe.

    Methods marked "blocks" may read the store or parse images: call them off the event loop.
    The others only touch the table (a short lock) and are safe on the event loop.
    """

    def __init__(self, root: Node) -> None:
        self._lock = threading.Lock()
        self._slots: dict[int, _Slot] = {ROOT_INO: _Slot(root, 1)}
        self._inos: dict[Hashable, int] = {root.key: ROOT_INO}
        self._next_ino = ROOT_INO + 1

    # table (non-blocking) ------------------------------------------------------------------
    def node(self, ino: int) -> Node:
        """The node of a known inode; raises OSError(ESTALE) for an unknown one."""
        with self._lock:
            slot = self._slots.get(ino)
        if slot is None:
            raise _err(errno.ESTALE, f"inode {ino}")
        return slot.node

    def remember(self, node: Node) -> int:
        """The inode number of `node`, its lookup count raised by one."""
        with self._lock:
            ino = self._inos.get(node.key)
            if ino is None:
                ino = self._next_ino
                self._next_ino += 1
                self._inos[node.key] = ino
                self._slots[ino] = _Slot(node, 1)
            else:
                slot = self._slots[ino]
                slot.lookups += 1
                if node.attr.live:
                    slot.node = node  # live nodes carry fresh attributes / targets
            return ino

    def forget(self, ino: int, count: int) -> None:
        """Drop `count` lookups; the number is released at zero. Never raises."""
        if ino == ROOT_INO:
            return
        with self._lock:
            slot = self._slots.get(ino)
            if slot is None:
                return
            slot.lookups -= count
            if slot.lookups <= 0:
                del self._slots[ino]
                if self._inos.get(slot.node.key) == ino:
                    del self._inos[slot.node.key]

    def getattr(self, ino: int) -> Attr:
        return self.node(ino).attr

    def __len__(self) -> int:
        with self._lock:
            return len(self._slots)

    # operations that may block ------------------------------------------------------------
    def lookup(self, parent: int, name: str) -> tuple[int, Attr]:
        """Blocks. Resolve `name` in directory `parent` and remember the child."""
        node = self.node(parent)
        if not node.is_dir:
            raise _err(errno.ENOTDIR, name)
        if name == ".":
            child = node
        elif name == "..":
            raise _err(errno.ENOENT, name)  # the kernel resolves ".." itself
        else:
            child = node.lookup(name)
        return self.remember(child), child.attr

    def listdir(self, ino: int) -> list[tuple[str, Node]]:
        """Blocks. The entries of a directory (not yet remembered: see `remember`)."""
        node = self.node(ino)
        if not node.is_dir:
            raise _err(errno.ENOTDIR, f"inode {ino}")
        return node.children()

    def read(self, ino: int, offset: int, length: int) -> bytes:
        """Blocks. File content; store and image errors propagate."""
        return self.node(ino).read(offset, length)

    def readlink(self, ino: int) -> str:
        return self.node(ino).readlink()

    def xattrs(self, ino: int) -> dict[str, bytes]:
        return self.node(ino).xattrs()


def repository_namespace(repo: Repository,
                         open_tree: Callable[[Repository, Point], FileTree] | None = None
                         ) -> Namespace:
    """The whole repository, refreshed live as points are committed."""
    return Namespace(RepoRoot(Catalogue(repo, open_tree)))


def point_namespace(repo: Repository, point: Point,
                    open_tree: Callable[[Repository, Point], FileTree] | None = None
                    ) -> Namespace:
    """One point's content at the root of the mount."""
    cat = Catalogue(repo, open_tree)
    return Namespace(PointDir(cat.context(point)))
