"""Read-only filesystems inside images: ext2/3/4, XFS, NTFS, FAT12/16/32.

Owns :func:`open_filesystem`, :class:`Filesystem` and :class:`Node`: a protocol-free tree a FUSE
layer or a restore command sits on. It must not know about FUSE, trio or the store.

Parsing is delegated to the ``dissect.*`` packages (Fox-IT; pure Python, actively maintained,
used in forensics on hostile images): they read all four families from any seekable file
object, so a :class:`~image._source.ByteSource` is enough and no kernel mount, loop device or
FUSE helper is involved. NOTE the licence: dissect.extfs/xfs/ntfs/fat are AGPL-3.0-or-later
(dissect.util/cstruct are Apache-2.0); shipping them inside a product needs a decision. Their
gaps are patched here rather than forked:

* they keep a file position on one shared handle and cache lazily, so they are not thread-safe:
  every :class:`Filesystem` serialises all calls through one lock (reads of separate files do
  not run in parallel; each read only touches the blocks it needs, so a big file is never
  loaded whole);
* they raise arbitrary exceptions (``EOFError``, ``struct`` errors, ``KeyError``...) on garbage:
  every entry point translates anything unexpected into :class:`CorruptFilesystem`;
* ``dissect.fat`` follows cluster chains without loop detection, ``dissect.xfs`` reads
  unwritten (preallocated) extents as data, and ``dissect.extfs`` walks a block-mapped (ext2/3)
  inode's indirect blocks eagerly (minutes for a garbage size; block 0 read as pointers for a
  hole): all three are replaced by local, bounded code;
* directory listings are capped (:data:`MAX_DIR_ENTRIES`) so a cyclic index cannot hang a reader.
"""

from __future__ import annotations

import calendar
import datetime
import io
import logging
import stat
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol, TypeVar, cast

from dissect.extfs import ExtFS
from dissect.fat import fat as dfat
from dissect.ntfs import NTFS
from dissect.ntfs.c_ntfs import ATTRIBUTE_TYPE_CODE
from dissect.ntfs.util import segment_reference
from dissect.util.stream import RunlistStream
from dissect.xfs import XFS
from dissect.xfs.xfs import fsb_to_bb

from image._detect import detect_fs
from image._errors import CorruptFilesystem, ImageError, NotFound, UnsupportedFilesystem
from image._source import ByteSource, SourceIO

__all__ = ["MAX_DIR_ENTRIES", "Filesystem", "Node", "open_filesystem"]

log = logging.getLogger(__name__)


class _DissectLogFilter(logging.Filter):
    """dissect logs content problems (e.g. zero-length dirents) at CRITICAL; they surface here
    as exceptions instead, so its records are demoted to DEBUG under this module's logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        log.debug("dissect: %s", record.getMessage())
        return False


# Filters apply where a record is created, so each dissect module logger gets one (they all
# exist by now: the parsers are imported above).
for _name in [n for n in logging.Logger.manager.loggerDict if n.startswith("dissect")]:
    logging.getLogger(_name).addFilter(_DissectLogFilter())

#: More entries than this in one directory is treated as corruption (cyclic index, garbage).
MAX_DIR_ENTRIES = 1_000_000

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True, eq=False)
class Node:
    """One file, directory, symlink or special file.

    Attributes are a snapshot taken when the node was looked up. ``mode`` carries the full
    ``st_mode`` (type bits included); ``inode`` is unique within the filesystem (for FAT, which
    has no inodes, it is assigned per path and stable for the life of the Filesystem object).
    Methods are thread-safe and raise only :class:`~image.ImageError` subclasses.
    """

    name: str
    kind: str
    size: int
    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    nlink: int
    inode: int
    fs: Filesystem = field(repr=False)
    ref: object = field(repr=False)

    def listdir(self) -> list[Node]:
        """Children without "." and ".."; raises CorruptFilesystem if this is not a directory."""
        return self.fs.listdir(self)

    def readlink(self) -> str:
        """Symlink target; raises CorruptFilesystem if this is not a symlink."""
        return self.fs.readlink(self)

    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (short only at end of file)."""
        return self.fs.read(self, offset, length)


class _Backend(Protocol):
    """What each filesystem family implements. Called with the Filesystem lock held."""

    def root(self, fs: Filesystem) -> Node: ...

    def children(self, fs: Filesystem, node: Node) -> Iterator[Node]: ...

    def child(self, fs: Filesystem, node: Node, name: str) -> Node: ...

    def open(self, node: Node) -> BinaryIO: ...

    def readlink(self, node: Node) -> str: ...


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


# ---------------------------------------------------------------------------------------------
# ext2/3/4


_EXT4_EXTENTS_FL = 0x80000
_EXT4_INLINE_DATA_FL = 0x10000000
# Directories and symlinks are read through dissect, which materialises their whole runlist.
_EXT_MAX_MAPPED_METADATA_BYTES = 256 * 1024 * 1024


class _ExtBlockMap:
    """Logical -> physical block lookup for ext2/3-style (indirect block) inodes.

    Replaces dissect's eager walk, which enumerates every pointer of a file up front (minutes
    for a garbage size on a 4 KiB-block fs) and reads block 0 as pointers for a hole in a
    double/triple indirect range. Lookups here are lazy, holes read as zeros, and indirect
    blocks are cached per inode.
    """

    def __init__(self, fh: BinaryIO, block_size: int, blocks_count: int, i_block: bytes) -> None:
        self.fh = fh
        self.bs = block_size
        self.blocks_count = blocks_count
        self.direct = struct.unpack("<15I", i_block[:60])
        self.per_block = block_size // 4
        self._cache: dict[int, tuple[int, ...]] = {}

    def _pointers(self, block: int) -> tuple[int, ...]:
        cached = self._cache.get(block)
        if cached is None:
            if block >= self.blocks_count:
                raise CorruptFilesystem(f"indirect block {block} beyond the filesystem")
            self.fh.seek(block * self.bs)
            data = self.fh.read(self.bs)
            if len(data) != self.bs:
                raise CorruptFilesystem(f"indirect block {block} is truncated")
            if len(self._cache) >= 256:
                self._cache.clear()
            cached = struct.unpack(f"<{self.per_block}I", data)
            self._cache[block] = cached
        return cached

    def lookup(self, logical: int) -> int:
        """Physical block of logical block ``logical``; 0 for a hole."""
        k = self.per_block
        if logical < 12:
            return int(self.direct[logical])
        logical -= 12
        for level, slot in ((1, 12), (2, 13), (3, 14)):
            span = k**level
            if logical < span:
                block = self.direct[slot]
                for depth in range(level - 1, -1, -1):
                    if block == 0:
                        return 0
                    index, logical = divmod(logical, k**depth)
                    block = self._pointers(block)[index]
                return int(block)
            logical -= span
        raise CorruptFilesystem("file is larger than indirect blocks can address")

    def runs(self, size: int) -> list[tuple[int | None, int]]:
        """The whole runlist (for dissect), for small objects such as directories."""
        if size > _EXT_MAX_MAPPED_METADATA_BYTES:
            raise CorruptFilesystem(f"directory or symlink of {size} bytes is implausible")
        runs: list[tuple[int | None, int]] = []
        for logical in range((size + self.bs - 1) // self.bs):
            phys: int | None = self.lookup(logical) or None
            last = runs[-1] if runs else None
            if last is not None and (
                (phys is None and last[0] is None)
                or (phys is not None and last[0] is not None and last[0] + last[1] == phys)
            ):
                runs[-1] = (last[0], last[1] + 1)
            else:
                runs.append((phys, 1))
        return runs

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray()
        end = offset + length
        pos = offset
        while pos < end:
            logical, within = divmod(pos, self.bs)
            phys = self.lookup(logical)
            # Extend over physically contiguous blocks to issue one read.
            count = 1
            limit = (end - pos + within + self.bs - 1) // self.bs
            while count < limit and phys and self.lookup(logical + count) == phys + count:
                count += 1
            take = min(count * self.bs - within, end - pos)
            if phys == 0:
                out += bytes(take)
            else:
                if phys + count > self.blocks_count:
                    raise CorruptFilesystem(f"data block {phys} beyond the filesystem")
                self.fh.seek(phys * self.bs + within)
                chunk = self.fh.read(take)
                if len(chunk) != take:
                    raise CorruptFilesystem(f"data block {phys} is truncated")
                out += chunk
            pos += take
        return bytes(out)


class _BytesReader:
    """Minimal seek/read adapter so every backend hands Filesystem.read the same shape."""

    def __init__(self, read: Callable[[int, int], bytes]) -> None:
        self._read = read
        self._pos = 0

    def seek(self, pos: int) -> int:
        self._pos = pos
        return pos

    def read(self, length: int) -> bytes:
        data = self._read(self._pos, length)
        self._pos += len(data)
        return data


class _ExtBackend:
    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.ext = ExtFS(fh)
        if self.ext.block_size > 65536:
            raise CorruptFilesystem(f"ext block size {self.ext.block_size} is impossible")

    def _node(self, fs: Filesystem, name: str, ino: object) -> Node:
        raw = ino.inode  # type: ignore[attr-defined]
        mode = int(raw.i_mode)
        return Node(
            name=name,
            kind=_kind(mode),
            size=int(ino.size),  # type: ignore[attr-defined]
            mode=mode,
            uid=int(raw.i_uid) | (int(raw.i_uid_high) << 16),
            gid=int(raw.i_gid) | (int(raw.i_gid_high) << 16),
            atime_ns=int(ino.atime_ns),  # type: ignore[attr-defined]
            mtime_ns=int(ino.mtime_ns),  # type: ignore[attr-defined]
            ctime_ns=int(ino.ctime_ns),  # type: ignore[attr-defined]
            nlink=int(raw.i_links_count),
            inode=int(ino.inum),  # type: ignore[attr-defined]
            fs=fs,
            ref=ino,
        )

    def _block_map(self, ino: object) -> _ExtBlockMap | None:
        """The indirect-block map of an inode, or None when dissect's path is safe."""
        raw = ino.inode  # type: ignore[attr-defined]
        if int(raw.i_flags) & (_EXT4_EXTENTS_FL | _EXT4_INLINE_DATA_FL):
            return None
        size = int(ino.size)  # type: ignore[attr-defined]
        if stat.S_ISLNK(int(raw.i_mode)) and size < 60:
            return None  # fast symlink: target stored in i_block
        return _ExtBlockMap(self.fh, self.ext.block_size, self.ext.block_count, bytes(raw.i_block))

    def _prepare(self, ino: object) -> None:
        """Give dissect a runlist built lazily and bounded, before it walks indirect blocks."""
        if ino._runlist is None:  # type: ignore[attr-defined]
            block_map = self._block_map(ino)
            if block_map is not None:
                ino._runlist = block_map.runs(int(ino.size))  # type: ignore[attr-defined]

    def root(self, fs: Filesystem) -> Node:
        return self._node(fs, "", self.ext.root)

    def children(self, fs: Filesystem, node: Node) -> Iterator[Node]:
        self._prepare(node.ref)
        for entry in node.ref.iterdir():  # type: ignore[attr-defined]
            if entry.filename in (".", ".."):
                continue
            # A fresh INode: the lru-cached one from iterdir carries the parent's filename.
            yield self._node(fs, entry.filename, self.ext.get_inode(entry.inum))

    def child(self, fs: Filesystem, node: Node, name: str) -> Node:
        # Compare names first: building a Node reads the child's inode.
        self._prepare(node.ref)
        for entry in node.ref.iterdir():  # type: ignore[attr-defined]
            if entry.filename == name and name not in (".", ".."):
                return self._node(fs, name, self.ext.get_inode(entry.inum))
        raise NotFound(name)

    def open(self, node: Node) -> BinaryIO:
        block_map = self._block_map(node.ref)
        if block_map is not None:
            return cast(BinaryIO, _BytesReader(block_map.read))
        return node.ref.open()  # type: ignore[attr-defined,no-any-return]

    def readlink(self, node: Node) -> str:
        self._prepare(node.ref)
        return str(node.ref.link)  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# XFS


class _XfsBackend:
    def __init__(self, fh: BinaryIO) -> None:
        self.xfs = XFS(fh)
        self._runs: dict[int, list[tuple[int | None, int]]] = {}

    def _node(self, fs: Filesystem, name: str, ino: object) -> Node:
        raw = ino.inode  # type: ignore[attr-defined]
        mode = int(raw.di_mode)
        nlink = int(raw.di_nlink) if int(raw.di_version) >= 2 else int(raw.di_onlink)
        return Node(
            name=name,
            kind=_kind(mode),
            size=int(raw.di_size),
            mode=mode,
            uid=int(raw.di_uid),
            gid=int(raw.di_gid),
            atime_ns=int(ino.atime_ns),  # type: ignore[attr-defined]
            mtime_ns=int(ino.mtime_ns),  # type: ignore[attr-defined]
            ctime_ns=int(ino.ctime_ns),  # type: ignore[attr-defined]
            nlink=nlink,
            inode=int(ino.inum),  # type: ignore[attr-defined]
            fs=fs,
            ref=ino,
        )

    def root(self, fs: Filesystem) -> Node:
        return self._node(fs, "", self.xfs.root)

    def children(self, fs: Filesystem, node: Node) -> Iterator[Node]:
        for entry in node.ref.iterdir():  # type: ignore[attr-defined]
            if entry.filename in (".", ".."):
                continue
            yield self._node(fs, entry.filename, entry)

    def child(self, fs: Filesystem, node: Node, name: str) -> Node:
        for entry in node.ref.iterdir():  # type: ignore[attr-defined]
            if entry.filename == name and name not in (".", ".."):
                return self._node(fs, name, entry)
        raise NotFound(name)

    def _dataruns(self, ino: object) -> list[tuple[int | None, int]]:
        """Like dissect's runlist, but unwritten extents read as zeros (holes)."""
        inum = int(ino.inum)  # type: ignore[attr-defined]
        cached = self._runs.get(inum)
        if cached is not None:
            return cached
        sb = self.xfs.sb
        runs: list[tuple[int | None, int]] = []
        pos = 0
        for offset, block, count, unwritten in ino._iter_blocks():  # type: ignore[attr-defined]
            if offset < pos:
                raise CorruptFilesystem(f"XFS inode {inum} has overlapping extents")
            if offset > pos:
                runs.append((None, offset - pos))
            agnum, agblock = fsb_to_bb(block, sb.sb_agblklog)
            runs.append((None if unwritten else agnum * sb.sb_agblocks + agblock, count))
            pos = offset + count
        if len(self._runs) > 4096:
            self._runs.clear()
        self._runs[inum] = runs
        return runs

    def open(self, node: Node) -> BinaryIO:
        ino = node.ref
        raw = ino.inode  # type: ignore[attr-defined]
        if node.kind == "file" and int(raw.di_format) in (2, 3):  # EXTENTS, BTREE
            bs = self.xfs.block_size
            return RunlistStream(self.xfs.fh, self._dataruns(ino), node.size, bs)  # type: ignore[no-any-return]
        return ino.open()  # type: ignore[attr-defined,no-any-return]

    def readlink(self, node: Node) -> str:
        return str(node.ref.link)  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# NTFS

# MFT records 0-15 are the metadata files ($MFT, $Bitmap, ...); 16-23 are reserved.
_NTFS_FIRST_USER_RECORD = 24
_FILE_ATTRIBUTE_SYSTEM = 0x4
# ntfs-3g (and SFU/Interix) store a symlink as a system file: magic + UTF-16LE target.
_INTERIX_LINK = b"IntxLNK\x01"
_INTERIX_MAX = 8 + 2 * 4096


def _wintime_ns(value: int) -> int:
    # FILETIME: 100 ns ticks since 1601-01-01.
    return (int(value) - 116444736000000000) * 100


class _NtfsBackend:
    def __init__(self, fh: BinaryIO) -> None:
        self.ntfs = NTFS(fh)
        if self.ntfs.mft is None:
            raise CorruptFilesystem("NTFS without a usable $MFT")
        self.mft = self.ntfs.mft
        self._links: dict[int, str] = {}

    def _node(self, fs: Filesystem, name: str, record: object, segment: int) -> Node:
        rec = record
        si = rec.attributes[ATTRIBUTE_TYPE_CODE.STANDARD_INFORMATION]  # type: ignore[attr-defined]
        if si:
            attr = si[0].attr
            atime, mtime = _wintime_ns(attr.LastAccessTime), _wintime_ns(attr.LastModificationTime)
            ctime, readonly = _wintime_ns(attr.LastChangeTime), bool(attr.FileAttributes & 1)
        else:
            atime = mtime = ctime = 0
            readonly = False
        target: str | None = None
        mode, size = stat.S_IFLNK | 0o777, 0
        if rec.is_symlink() or rec.is_mount_point():  # type: ignore[attr-defined]
            target = str(rec.reparse_point_name).replace("\\", "/")  # type: ignore[attr-defined]
        elif rec.is_dir():  # type: ignore[attr-defined]
            mode, size = stat.S_IFDIR | 0o755, 0
        else:
            mode = stat.S_IFREG | (0o444 if readonly else 0o644)
            size = int(rec.size()) if rec.has_stream("") else 0  # type: ignore[attr-defined]
            if si and si[0].attr.FileAttributes & _FILE_ATTRIBUTE_SYSTEM:
                target = self._interix_target(rec, size)
        if target is not None:
            # Absolute Windows targets ("C:/x") cannot be resolved inside one volume.
            self._links[segment] = target
            mode, size = stat.S_IFLNK | 0o777, len(target.encode())
        names = rec.attributes[ATTRIBUTE_TYPE_CODE.FILE_NAME]  # type: ignore[attr-defined]
        nlink = max(1, sum(1 for a in names if a.flags != 2))  # 2 = DOS-only 8.3 name
        return Node(
            name=name,
            kind=_kind(mode),
            size=size,
            mode=mode,
            uid=0,
            gid=0,
            atime_ns=atime,
            mtime_ns=mtime,
            ctime_ns=ctime,
            nlink=nlink,
            inode=segment,
            fs=fs,
            ref=rec,
        )

    def root(self, fs: Filesystem) -> Node:
        return self._node(fs, "", self.mft.get(5), 5)

    def children(self, fs: Filesystem, node: Node) -> Iterator[Node]:
        rec = node.ref
        is_root = node.inode == 5
        for entry in rec.iterdir(ignore_dos=True):  # type: ignore[attr-defined]
            name = entry.attribute.file_name
            segment = segment_reference(entry.header.FileReference)
            if name == "." or (is_root and segment < _NTFS_FIRST_USER_RECORD):
                continue
            yield self._node(fs, name, self.mft.get(segment), segment)

    def child(self, fs: Filesystem, node: Node, name: str) -> Node:
        if not node.ref.is_dir():  # type: ignore[attr-defined]
            raise NotFound(name)
        try:
            entry = node.ref.index("$I30").search(name)  # type: ignore[attr-defined]
        except KeyError as exc:
            raise NotFound(name) from exc
        segment = segment_reference(entry.header.FileReference)
        if node.inode == 5 and segment < _NTFS_FIRST_USER_RECORD:
            raise NotFound(name)
        # NTFS names are case-insensitive: report the name as stored.
        return self._node(fs, entry.attribute.file_name, self.mft.get(segment), segment)

    def open(self, node: Node) -> BinaryIO:
        return node.ref.open()  # type: ignore[attr-defined,no-any-return]

    @staticmethod
    def _interix_target(rec: object, size: int) -> str | None:
        """Target of an Interix-style symlink (what ntfs-3g creates), else None."""
        if not len(_INTERIX_LINK) < size <= _INTERIX_MAX:
            return None
        data = rec.open().read(size)  # type: ignore[attr-defined]
        if not data.startswith(_INTERIX_LINK):
            return None
        return str(data[len(_INTERIX_LINK) :].decode("utf-16-le", errors="replace"))

    def readlink(self, node: Node) -> str:
        target = self._links.get(node.inode)
        if target is None:
            self._node(node.fs, node.name, node.ref, node.inode)
            target = self._links.get(node.inode, "")
        return target


# ---------------------------------------------------------------------------------------------
# FAT


def _fat_ref(node: Node) -> tuple[str, dfat.DirectoryEntry]:
    return cast("tuple[str, dfat.DirectoryEntry]", node.ref)


def _apply_case_flags(short_name: str, nt_res: int) -> str:
    """Windows NT marks all-lowercase 8.3 names with DIR_NTRes bits instead of an LFN."""
    base, dot, ext = short_name.partition(".")
    if nt_res & 0x08:
        base = base.lower()
    if nt_res & 0x10:
        ext = ext.lower()
    return base + dot + ext


def _dos_ns(value: datetime.datetime) -> int:
    # FAT stores local time without a zone; it is reported as if it were UTC.
    return calendar.timegm(value.timetuple()) * 1_000_000_000 + value.microsecond * 1000


class _FatBackend:
    def __init__(self, fh: BinaryIO) -> None:
        self.fat = dfat.FATFS(fh)
        self._inodes: dict[str, int] = {"/": 1}
        table = self.fat.fat
        self._max_cluster = table.entry_count

    def _runlist(self, first: int) -> list[tuple[int, int]]:
        """Cluster chain as (first data cluster - 2, count) runs, with loop detection."""
        if first == 0:
            return []
        table = self.fat.fat
        bits = table.bits_per_entry
        eoc_min = {12: 0xFF8, 16: 0xFFF8, 32: 0x0FFFFFF8}[bits]
        bad = eoc_min - 1
        runs: list[tuple[int, int]] = []
        cluster, steps = first, 0
        while True:
            if not 2 <= cluster < self._max_cluster:
                raise CorruptFilesystem(f"FAT chain points at invalid cluster {cluster}")
            steps += 1
            if steps > self._max_cluster:
                raise CorruptFilesystem(f"FAT chain starting at {first} loops")
            if runs and runs[-1][0] + runs[-1][1] == cluster - 2:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((cluster - 2, 1))
            value = table.get(cluster)
            if value >= eoc_min:
                return runs
            if value in (0, 1, bad):
                raise CorruptFilesystem(f"FAT chain hits free/bad cluster at {cluster}")
            cluster = value

    def _prepare(self, entry: object) -> object:
        # Replace dissect's unguarded chain walk before anything reads through it.
        if entry._runlist is None and entry.cluster is not None:  # type: ignore[attr-defined]
            entry._runlist = self._runlist(int(entry.cluster))  # type: ignore[attr-defined]
        return entry

    def _node(self, fs: Filesystem, name: str, path: str, entry: object) -> Node:
        self._prepare(entry)
        inode = self._inodes.setdefault(path, len(self._inodes) + 1)
        is_dir = bool(entry.is_directory())  # type: ignore[attr-defined]
        readonly = bool(entry.is_readonly())  # type: ignore[attr-defined]
        if is_dir:
            mode = stat.S_IFDIR | (0o555 if readonly else 0o755)
        else:
            mode = stat.S_IFREG | (0o444 if readonly else 0o644)
        mtime = _dos_ns(entry.mtime)  # type: ignore[attr-defined]
        return Node(
            name=name,
            kind="dir" if is_dir else "file",
            size=int(entry.size),  # type: ignore[attr-defined]
            mode=mode,
            uid=0,
            gid=0,
            atime_ns=_dos_ns(entry.atime),  # type: ignore[attr-defined]
            mtime_ns=mtime,
            ctime_ns=mtime,
            nlink=2 if is_dir else 1,
            inode=inode,
            fs=fs,
            ref=(path, entry),
        )

    def root(self, fs: Filesystem) -> Node:
        return self._node(fs, "", "/", self.fat.root)

    def children(self, fs: Filesystem, node: Node) -> Iterator[Node]:
        path, entry = _fat_ref(node)
        self._prepare(entry)
        for child in entry.iterdir():
            if child.is_volume_id() or child.name in (".", ".."):
                continue
            name = child.name
            if not child.ldirents:
                name = _apply_case_flags(name, int(child.dirent.DIR_NTRes))
            child_path = f"{path.rstrip('/')}/{name}"
            yield self._node(fs, name, child_path, child)

    def child(self, fs: Filesystem, node: Node, name: str) -> Node:
        folded = name.upper()
        fallback: Node | None = None
        for child in self.children(fs, node):
            if child.name == name:
                return child
            _p, entry = _fat_ref(child)
            if fallback is None and folded in (child.name.upper(), entry.short_name.upper()):
                fallback = child
        if fallback is None:
            raise NotFound(name)
        return fallback

    def open(self, node: Node) -> BinaryIO:
        _path, entry = _fat_ref(node)
        self._prepare(entry)
        return cast(BinaryIO, entry.open())

    def readlink(self, node: Node) -> str:
        raise CorruptFilesystem("FAT has no symlinks")


# ---------------------------------------------------------------------------------------------


_BACKENDS: dict[str, Callable[[BinaryIO], _Backend]] = {
    "ext": _ExtBackend,
    "xfs": _XfsBackend,
    "ntfs": _NtfsBackend,
    "fat": _FatBackend,
}


class Filesystem:
    """An opened, read-only filesystem.

    Thread-safe: one re-entrant lock serialises every call into the parser (``dissect`` keeps a
    file position and lazy caches). Every method raises only :class:`~image.ImageError`
    subclasses for bad content: :class:`NotFound` for missing paths, :class:`CorruptFilesystem`
    for anything the parser trips over.
    """

    def __init__(self, src: ByteSource, fs_type: str, backend: _Backend) -> None:
        self.source = src
        self.fs_type = fs_type
        self._backend = backend
        self._lock = threading.RLock()
        self.root: Node = self._call("open root directory", lambda: backend.root(self))

    def __repr__(self) -> str:
        return f"<Filesystem {self.fs_type} on {self.source!r}>"

    def _call(self, what: str, fn: Callable[[], _T]) -> _T:
        with self._lock, _translated(what):
            return fn()

    def lookup(self, path: str) -> Node:
        """Resolve an absolute or relative "/"-separated path (symlinks are not followed).

        Raises NotFound if a component is missing or a non-final component is not a directory.
        """
        parts = [p for p in path.split("/") if p and p != "."]

        def walk() -> Node:
            node = self.root
            stack: list[Node] = []
            for part in parts:
                if part == "..":
                    node = stack.pop() if stack else self.root
                    continue
                if node.kind != "dir":
                    raise NotFound(f"{path}: {node.name!r} is not a directory")
                stack.append(node)
                node = self._backend.child(self, node, part)
            return node

        return self._call(f"lookup {path!r}", walk)

    def listdir(self, node: Node) -> list[Node]:
        """Children of a directory node, without "." and ".."."""
        if node.kind != "dir":
            raise CorruptFilesystem(f"{node.name!r} is not a directory")

        def collect() -> list[Node]:
            out: list[Node] = []
            for child in self._backend.children(self, node):
                out.append(child)
                if len(out) > MAX_DIR_ENTRIES:
                    raise CorruptFilesystem(f"directory {node.name!r} has too many entries")
            return out

        return self._call(f"listdir inode {node.inode}", collect)

    def readlink(self, node: Node) -> str:
        """Target of a symlink node."""
        if node.kind != "symlink":
            raise CorruptFilesystem(f"{node.name!r} is not a symlink")
        return self._call(f"readlink inode {node.inode}", lambda: self._backend.readlink(node))

    def read(self, node: Node, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` of a file (short at EOF; b"" past it).

        Only the blocks covering the range are read.
        """
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        if node.kind == "dir":
            raise CorruptFilesystem(f"{node.name!r} is a directory")
        length = max(0, min(length, node.size - offset))
        if length == 0:
            return b""

        def do_read() -> bytes:
            stream = self._backend.open(node)
            stream.seek(offset)
            data = stream.read(length)
            if len(data) != length:
                raise CorruptFilesystem(
                    f"short read in inode {node.inode}: {len(data)} of {length} bytes"
                )
            return data

        return self._call(f"read inode {node.inode}", do_read)


@contextmanager
def _translated(what: str) -> Iterator[None]:
    try:
        yield
    except ImageError:
        raise
    except ValueError as exc:
        raise CorruptFilesystem(f"{what}: {exc}") from exc
    except Exception as exc:
        # dissect raises whatever its parsers hit (EOFError, KeyError, cstruct errors...).
        log.debug("%s failed", what, exc_info=True)
        raise CorruptFilesystem(f"{what}: {type(exc).__name__}: {exc}") from exc


def open_filesystem(src: ByteSource, fs_type: str | None = None) -> Filesystem:
    """Detect (unless ``fs_type`` is given) and open the filesystem on ``src``.

    Raises UnsupportedFilesystem when no supported signature is found, CorruptFilesystem when the
    signature is there but the structures cannot be read. Thread-safe.
    """
    try:
        kind = fs_type or detect_fs(src)
    except Exception as exc:
        raise CorruptFilesystem(f"cannot read the filesystem header: {exc}") from exc
    if kind is None:
        raise UnsupportedFilesystem("no ext2/3/4, XFS, NTFS or FAT filesystem found")
    factory = _BACKENDS.get(kind)
    if factory is None:
        raise UnsupportedFilesystem(f"unknown filesystem type {kind!r}")
    fh = io.BufferedReader(SourceIO(src), buffer_size=64 * 1024)
    with _translated(f"open {kind} filesystem"):
        backend = factory(cast(BinaryIO, fh))
    return Filesystem(src, kind, backend)
