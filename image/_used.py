"""Used-block maps: which byte ranges of a disk must be backed up.

Owns :func:`used_ranges`, :class:`UsedMap` and :class:`PartitionUsage`. Everything outside the
returned ranges is promised to read as zeros after a restore without losing data.

Rules (correctness before tightness; an allocated block reported free loses data):

* partition-table areas (MBR/EBR sectors, both GPT headers and entry arrays), everything outside
  the data partitions (boot loader gap, unpartitioned space) and every partition whose
  filesystem is unknown, unsupported, corrupt or not cleanly unmounted are kept whole;
* inside a recognised filesystem the allocation structures decide, plus the filesystem's own
  metadata regions, plus anything between the filesystem's end and the partition's end:

  - ext2/3/4: each group's block bitmap. ``BLOCK_UNINIT`` (honoured only with ``uninit_bg`` /
    ``metadata_csum``, as the kernel does) means "free except group metadata"; the superblock
    and descriptor backups, all block/inode bitmaps and all inode tables (wherever flex_bg put
    them) are always kept, inode tables only up to ``bg_itable_unused`` when the descriptors'
    metadata_csum verifies. A journal that needs recovery, bigalloc and meta_bg with uninit
    groups keep the partition whole;
  - XFS: every block not in the per-AG free-space B+tree by block number (bnobt); the sum of
    free extents must match ``agf_freeblks`` or the partition is kept whole. Only when the log
    is clean: its last record (found the way the kernel's ``xlog_find_head`` does, by the cycle
    numbers stamped on every 512-byte log block) must be an unmount record ending at the log
    head; a live or uncleanly unmounted XFS has metadata only in the log (the on-disk btrees
    are stale) and an external log cannot be checked: both are kept whole;
  - NTFS: ``$Bitmap`` (a dirty volume is kept whole);
  - FAT12/16/32: reserved sectors, all FAT copies and the root directory region, plus every
    cluster whose FAT entry is non-zero. A volume marked dirty is kept whole: the boot sector's
    state byte (BS_Reserved1, bit 0: set by Linux and Windows NT while mounted read-write) or,
    on FAT16/32, a cleared "clean shutdown" or "no I/O errors" bit in FAT entry 1.

:func:`writable_mounts` tells whether a block device (or a partition or device-mapper holder
of it) is mounted read-write on this host: its used map and its data would then be read at
different moments of a changing filesystem, so callers refuse a used-only backup of it.

The parsers here are local ``struct`` code, not ``dissect``: allocation maps are a few fields
each, and the exact rules above (what counts as metadata, what a flag means) are the contract.
Only NTFS uses ``dissect.ntfs`` to locate ``$Bitmap`` through the MFT.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dissect.util import crc32c

from image._detect import detect_fs
from image._errors import CorruptFilesystem, ImageError, UnsupportedFilesystem
from image._partition import DiskLayout, open_disk
from image._source import ByteSource, read_exact

__all__ = [
    "PartitionUsage",
    "UsedMap",
    "bitmap_runs",
    "filesystem_used_ranges",
    "merge_ranges",
    "subtract_ranges",
    "used_ranges",
    "writable_mounts",
]

log = logging.getLogger(__name__)

Range = tuple[int, int]


@dataclass(slots=True)
class PartitionUsage:
    """How one partition (or the whole-disk filesystem, named "disk") was mapped.

    ``bitmap_used`` is True when the filesystem's allocation map decided; otherwise the
    partition was kept whole and ``error`` says why (None if there simply was no filesystem).
    """

    name: str
    start_bytes: int
    size_bytes: int
    fs_type: str | None
    used_bytes: int
    bitmap_used: bool
    error: str | None = None


@dataclass(slots=True)
class UsedMap:
    """Sorted, merged ``(offset, length)`` byte ranges of a disk that must be stored."""

    size_bytes: int
    scheme: str
    ranges: list[Range] = field(default_factory=list)
    partitions: list[PartitionUsage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def used_bytes(self) -> int:
        return sum(length for _off, length in self.ranges)


def subtract_ranges(ranges: list[Range], holes: list[Range]) -> list[Range]:
    """``ranges`` minus ``holes``; both sorted and merged."""
    out: list[Range] = []
    i = 0
    for off, length in ranges:
        pos, end = off, off + length
        while i < len(holes) and holes[i][0] + holes[i][1] <= pos:
            i += 1
        j = i
        while j < len(holes) and holes[j][0] < end:
            hole_off, hole_end = holes[j][0], holes[j][0] + holes[j][1]
            if hole_off > pos:
                out.append((pos, hole_off - pos))
            pos = max(pos, hole_end)
            j += 1
        if pos < end:
            out.append((pos, end - pos))
    return out


def merge_ranges(ranges: Iterable[Range], limit: int | None = None) -> list[Range]:
    """Sort, clip to ``[0, limit)`` and merge overlapping or touching ranges."""
    out: list[Range] = []
    for off, length in sorted(ranges):
        end = off + length
        if limit is not None:
            end = min(end, limit)
        off = max(off, 0)
        if end <= off:
            continue
        if out and off <= out[-1][0] + out[-1][1]:
            last_off, last_len = out[-1]
            out[-1] = (last_off, max(last_off + last_len, end) - last_off)
        else:
            out.append((off, end - off))
    return out


# Runs of 0x00 bytes, runs of 0xFF bytes, or one mixed byte: long uniform stretches of a bitmap
# cost one regex match instead of eight Python iterations per byte.
_BITMAP_TOKEN = re.compile(rb"\x00+|\xff+|[^\x00\xff]", re.DOTALL)


def bitmap_runs(bitmap: bytes, nbits: int) -> list[Range]:
    """Runs ``(first_bit, count)`` of set bits in an LSB-first bitmap, limited to ``nbits``."""
    runs: list[Range] = []

    def add(start: int, count: int) -> None:
        if runs and runs[-1][0] + runs[-1][1] == start:
            runs[-1] = (runs[-1][0], runs[-1][1] + count)
        else:
            runs.append((start, count))

    for match in _BITMAP_TOKEN.finditer(bitmap, 0, (nbits + 7) // 8):
        start, end = match.span()
        byte = bitmap[start]
        if byte == 0:
            continue
        if byte == 0xFF:
            add(start * 8, (end - start) * 8)
            continue
        for bit in range(8):
            if byte >> bit & 1:
                add(start * 8 + bit, 1)
    # The last byte may carry padding bits past nbits.
    while runs and runs[-1][0] + runs[-1][1] > nbits:
        first, _count = runs.pop()
        if first < nbits:
            runs.append((first, nbits - first))
    return runs


# ---------------------------------------------------------------------------------------------
# ext2/3/4

_EXT_COMPAT_SPARSE_SUPER2 = 0x200
_EXT_INCOMPAT_RECOVER = 0x4
_EXT_INCOMPAT_META_BG = 0x10
_EXT_INCOMPAT_64BIT = 0x80
_EXT_INCOMPAT_CSUM_SEED = 0x2000
_EXT_RO_SPARSE_SUPER = 0x1
_EXT_RO_GDT_CSUM = 0x10
_EXT_RO_BIGALLOC = 0x200
_EXT_RO_METADATA_CSUM = 0x400
_EXT_BG_INODE_UNINIT = 0x1
_EXT_BG_BLOCK_UNINIT = 0x2


def _is_power_of(n: int, base: int) -> bool:
    while n > 1 and n % base == 0:
        n //= base
    return n == 1


def _ext_used(src: ByteSource) -> list[Range]:
    sb = read_exact(src, 1024, 1024)
    (inodes_count, blocks_lo, _r, _fb, _fi, first_data, log_bs, log_cs, bpg, _cpg, ipg) = (
        struct.unpack_from("<11I", sb, 0)
    )
    if struct.unpack_from("<H", sb, 56)[0] != 0xEF53:
        raise CorruptFilesystem("ext superblock magic mismatch")
    rev = struct.unpack_from("<I", sb, 76)[0]
    inode_size = struct.unpack_from("<H", sb, 88)[0] if rev >= 1 else 128
    compat, incompat, ro_compat = struct.unpack_from("<III", sb, 92)
    reserved_gdt = struct.unpack_from("<H", sb, 206)[0]
    desc_size_raw = struct.unpack_from("<H", sb, 254)[0]
    first_meta_bg = struct.unpack_from("<I", sb, 260)[0]
    blocks_hi = struct.unpack_from("<I", sb, 336)[0] if incompat & _EXT_INCOMPAT_64BIT else 0
    backup_bgs = struct.unpack_from("<II", sb, 588)

    if log_bs > 6:
        raise CorruptFilesystem(f"ext block size 2^{10 + log_bs} is impossible")
    bs = 1024 << log_bs
    if ro_compat & _EXT_RO_BIGALLOC or log_cs != log_bs:
        raise UnsupportedFilesystem("ext bigalloc (cluster bitmaps) is not supported")
    if incompat & _EXT_INCOMPAT_RECOVER:
        raise UnsupportedFilesystem("ext journal needs recovery: on-disk bitmaps may be stale")
    blocks = blocks_hi << 32 | blocks_lo
    if bpg == 0 or bpg > 8 * bs or ipg == 0 or inodes_count == 0 or first_data >= blocks:
        raise CorruptFilesystem("ext superblock geometry is impossible")
    if blocks * bs > src.size_bytes():
        raise CorruptFilesystem(
            f"ext filesystem ({blocks * bs} bytes) is larger than its partition"
        )
    desc_size = desc_size_raw if incompat & _EXT_INCOMPAT_64BIT and desc_size_raw >= 64 else 32
    if desc_size > bs or desc_size & (desc_size - 1):
        raise CorruptFilesystem(f"ext group descriptor size {desc_size} is impossible")
    groups = (blocks - first_data + bpg - 1) // bpg
    uninit_honoured = bool(ro_compat & (_EXT_RO_GDT_CSUM | _EXT_RO_METADATA_CSUM))
    meta_bg = bool(incompat & _EXT_INCOMPAT_META_BG)
    descs_per_block = bs // desc_size
    gdt_blocks = (groups + descs_per_block - 1) // descs_per_block
    itable_blocks = (ipg * inode_size + bs - 1) // bs

    def has_super(g: int) -> bool:
        if g == 0:
            return True
        if compat & _EXT_COMPAT_SPARSE_SUPER2:
            return g in backup_bgs
        if ro_compat & _EXT_RO_SPARSE_SUPER:
            return g == 1 or _is_power_of(g, 3) or _is_power_of(g, 5) or _is_power_of(g, 7)
        return True

    def group_start(g: int) -> int:
        return int(first_data + g * bpg)

    def desc_block(i: int) -> int:
        """Block holding the i-th block of group descriptors (primary copy)."""
        if not meta_bg or i < first_meta_bg:
            return int(first_data + 1 + i)
        g = i * descs_per_block
        return group_start(g) + (1 if has_super(g) else 0)

    csum_seed: int | None = None
    if ro_compat & _EXT_RO_METADATA_CSUM:
        if incompat & _EXT_INCOMPAT_CSUM_SEED:
            csum_seed = struct.unpack_from("<I", sb, 624)[0]
        else:
            csum_seed = _crc32c_raw(0xFFFFFFFF, sb[104:120])  # s_uuid
    holes: list[Range] = []  # byte ranges that may restore as zeros despite the bitmap
    used_blocks: list[Range] = []
    # Boot block + primary superblock (+ the rest of block 0 when bs > 1024).
    keep_bytes: list[Range] = [(0, max(2048, (first_data + 1) * bs))]
    desc_cache: dict[int, bytes] = {}

    def descriptor(g: int) -> bytes:
        i, j = divmod(g, descs_per_block)
        if i not in desc_cache:
            block = desc_block(i)
            if block >= blocks:
                raise CorruptFilesystem(f"ext descriptor block {block} beyond the filesystem")
            used_blocks.append((block, 1))
            desc_cache.clear()
            desc_cache[i] = read_exact(src, block * bs, bs)
        return desc_cache[i][j * desc_size : (j + 1) * desc_size]

    for g in range(groups):
        start = group_start(g)
        count = min(bpg, blocks - start)
        if has_super(g):
            # Superblock backup, descriptor table copy and reserved GDT growth blocks.
            base = 1 if meta_bg else 1 + gdt_blocks + reserved_gdt
            used_blocks.append((start, min(base, count)))
        d = descriptor(g)
        bb, ib, it = struct.unpack_from("<III", d, 0)
        flags = struct.unpack_from("<H", d, 18)[0]
        if desc_size >= 64:
            bb_hi, ib_hi, it_hi = struct.unpack_from("<III", d, 32)
            bb, ib, it = bb | bb_hi << 32, ib | ib_hi << 32, it | it_hi << 32
        if bb >= blocks or ib >= blocks or it + itable_blocks > blocks:
            raise CorruptFilesystem(f"ext group {g} metadata lies beyond the filesystem")
        # Bitmaps and the inode table are kept wherever flex_bg placed them. The table's tail
        # past bg_itable_unused is never read by the kernel or e2fsck (lazy init zeroes it), so
        # it may restore as zeros; trusted only when the descriptor's crc32c checks out.
        used_blocks += [(bb, 1), (ib, 1), (it, itable_blocks)]
        if csum_seed is not None:
            _ext_check_desc(csum_seed, g, d)
            unused = struct.unpack_from("<H", d, 28)[0]
            if desc_size >= 64:
                unused |= struct.unpack_from("<H", d, 50)[0] << 16
            if flags & _EXT_BG_INODE_UNINIT:
                unused = ipg
            if unused <= ipg:
                first_unused = ((ipg - unused) * inode_size + bs - 1) // bs
                holes.append(((it + first_unused) * bs, (itable_blocks - first_unused) * bs))
        if uninit_honoured and flags & _EXT_BG_BLOCK_UNINIT:
            if meta_bg:
                used_blocks.append((start, count))  # descriptor copies: keep more, not less
            continue
        bitmap = read_exact(src, bb * bs, bs)
        used_blocks += [(start + first, n) for first, n in bitmap_runs(bitmap, count)]

    keep_bytes += [(b * bs, n * bs) for b, n in used_blocks]
    # Anything after the filesystem's last block (partition larger than the fs).
    keep_bytes.append((blocks * bs, src.size_bytes() - blocks * bs))
    return subtract_ranges(merge_ranges(keep_bytes), merge_ranges(holes))


def _crc32c_raw(seed: int, data: bytes) -> int:
    """The kernel's ``crc32c(seed, data)``: no pre/post inversion (dissect's adds both)."""
    return int(~crc32c.update(~seed & 0xFFFFFFFF, data) & 0xFFFFFFFF)


def _ext_check_desc(seed: int, group: int, desc: bytes) -> None:
    """Verify a metadata_csum group descriptor (crc32c over group number + descriptor)."""
    crc = _crc32c_raw(seed, struct.pack("<I", group))
    crc = _crc32c_raw(crc, desc[:30] + b"\0\0" + desc[32:])
    if crc & 0xFFFF != struct.unpack_from("<H", desc, 30)[0]:
        raise CorruptFilesystem(f"ext group descriptor {group} fails its checksum")


# ---------------------------------------------------------------------------------------------
# XFS

_XFS_SB = struct.Struct(">4sI9Q5I4H")  # sb_magicnum .. sb_inopblock
assert _XFS_SB.size == 108
_XFS_AGF_MAGIC = b"XAGF"
_XFS_BNO_MAGICS = (b"ABTB", b"AB3B")


_XLOG_MAGIC = 0xFEEDBABE
_XLOG_BB = 512  # the log's basic block: each starts with its cycle number (or a header)
_XLOG_HEADER_CYCLE_SIZE = 32 * 1024  # log data covered by one header block (v2 logs)
_XLOG_VERSION_2 = 0x2
_XLOG_UNMOUNT_TRANS = 0x20  # xlog_op_header.oh_flags of an unmount record
# Up to 8 in-core logs of 256 KiB can be in flight: the kernel checks this many blocks before
# the head for a hole left by out-of-order completion (XLOG_TOTAL_REC_SHIFT).
_XLOG_SCAN_BBS = (8 * 256 * 1024) // _XLOG_BB


def _xfs_log_dirty(src: ByteSource, log_off: int, log_bbs: int) -> str | None:
    """Why the internal log at ``log_off`` (``log_bbs`` basic blocks) is not clean, or None.

    Clean means what the kernel's ``xlog_find_tail`` calls a clean unmount: the log head found
    from the blocks' cycle numbers directly follows a record holding one operation flagged
    XLOG_UNMOUNT_TRANS. Anything unexpected counts as dirty (a false "dirty" only costs
    space). A log that was never written (all zero) is clean, as for the kernel.
    """
    if log_bbs < 2:
        return "XFS log is impossibly small"

    def block(bb: int) -> bytes:
        return read_exact(src, log_off + (bb % log_bbs) * _XLOG_BB, _XLOG_BB)

    def cycle(data: bytes) -> int:
        magic, after_magic = struct.unpack_from(">II", data, 0)
        return int(after_magic if magic == _XLOG_MAGIC else magic)

    first, last = cycle(block(0)), cycle(block(log_bbs - 1))

    def first_with(pred_cycle: int, lo: int, hi: int) -> int:
        """First block in [lo, hi) whose cycle is ``pred_cycle`` (blocks before it are not)."""
        while lo < hi:
            mid = (lo + hi) // 2
            if cycle(block(mid)) == pred_cycle:
                hi = mid
            else:
                lo = mid + 1
        return lo

    if first == 0:
        if any(cycle(block(bb)) for bb in range(0, log_bbs, max(1, log_bbs // 64))):
            return "XFS log starts with an unwritten block but is not empty"
        return None  # never written (or zeroed by xfs_repair -L): nothing to replay
    if last == 0:
        head, current = first_with(0, 1, log_bbs), first  # the log has not wrapped yet
    elif first == last:
        head, current = log_bbs, first  # the head is exactly at the wrap point
    elif first == last + 1:
        head, current = first_with(last, 1, log_bbs), first
    else:
        return f"XFS log cycles {first} and {last} do not follow each other"
    # No older cycle may hide shortly before the head (iclogs completing out of order).
    lo = max(0, head - _XLOG_SCAN_BBS)
    window = read_exact(src, log_off + lo * _XLOG_BB, (head - lo) * _XLOG_BB)
    for i in range(0, len(window), _XLOG_BB):
        if cycle(window[i : i + 8]) != current:
            return "XFS log has a hole before its head: it was not cleanly unmounted"
    # The last record header before the head (a record is at most 256 KiB plus headers).
    rec = None
    for back in range(1, min(log_bbs, _XLOG_SCAN_BBS) + 1):
        data = block(head - back)
        if struct.unpack_from(">I", data, 0)[0] == _XLOG_MAGIC:
            rec = (head - back) % log_bbs, data
            break
    if rec is None:
        return "XFS log has no record header before its head"
    rec_bb, hdr = rec
    version, h_len = struct.unpack_from(">II", hdr, 8)
    num_logops = struct.unpack_from(">I", hdr, 40)[0]
    h_size = struct.unpack_from(">I", hdr, 320)[0]
    hblks = 1
    if version & _XLOG_VERSION_2 and h_size > _XLOG_HEADER_CYCLE_SIZE:
        hblks = (h_size + _XLOG_HEADER_CYCLE_SIZE - 1) // _XLOG_HEADER_CYCLE_SIZE
    after = (rec_bb + hblks + (h_len + _XLOG_BB - 1) // _XLOG_BB) % log_bbs
    if after != head % log_bbs or num_logops != 1:
        return "XFS log is dirty (its last record is not an unmount record): not cleanly unmounted"
    if not block(rec_bb + hblks)[9] & _XLOG_UNMOUNT_TRANS:  # xlog_op_header.oh_flags
        return "XFS log is dirty (its last record is not an unmount record): not cleanly unmounted"
    return None


def _xfs_used(src: ByteSource) -> list[Range]:
    sb = read_exact(src, 0, 512)
    fields = _XFS_SB.unpack_from(sb, 0)
    magic, bs, dblocks = fields[0], fields[1], fields[2]
    agblocks, agcount = fields[12], fields[13]
    version, sectsize = fields[16], fields[17]
    logstart, logblocks, agblklog = fields[7], fields[15], sb[124]
    if magic != b"XFSB":
        raise CorruptFilesystem("XFS superblock magic mismatch")
    if bs < 512 or bs > 65536 or bs & (bs - 1) or sectsize < 512 or sectsize > bs:
        raise CorruptFilesystem("XFS block or sector size is impossible")
    if agblocks == 0 or agcount == 0 or (agcount - 1) * agblocks >= dblocks:
        raise CorruptFilesystem("XFS allocation group geometry is impossible")
    if dblocks * bs > src.size_bytes():
        raise CorruptFilesystem(
            f"XFS filesystem ({dblocks * bs} bytes) is larger than its partition"
        )
    if logstart == 0:
        raise UnsupportedFilesystem("XFS with an external log: cannot tell if it is clean")
    log_agno, log_agbno = logstart >> agblklog, logstart & ((1 << agblklog) - 1)
    log_off = (log_agno * agblocks + log_agbno) * bs
    if log_agno >= agcount or log_off + logblocks * bs > dblocks * bs or logblocks == 0:
        raise CorruptFilesystem("XFS log lies outside the filesystem")
    dirty = _xfs_log_dirty(src, log_off, logblocks * bs // _XLOG_BB)
    if dirty is not None:
        raise UnsupportedFilesystem(f"{dirty}; free-space btrees may be stale")
    crc = (version & 0xF) == 5
    hdr = 56 if crc else 16
    maxrecs = (bs - hdr) // 12  # interior node: 8-byte key + 4-byte pointer per entry

    used: list[Range] = []
    for ag in range(agcount):
        ag_first = ag * agblocks
        aglen_geom = min(agblocks, dblocks - ag_first)
        agf = read_exact(src, ag_first * bs + sectsize, sectsize)
        agf_magic, _ver, seqno, length, bno_root = struct.unpack_from(">4s4I", agf, 0)
        # agf_roots[3] at 16 and agf_levels[3] at 28 (bno, cnt, rmap); agf_freeblks at 52.
        bno_level = struct.unpack_from(">I", agf, 28)[0]
        freeblks = struct.unpack_from(">I", agf, 52)[0]
        if agf_magic != _XFS_AGF_MAGIC or seqno != ag or length != aglen_geom:
            raise CorruptFilesystem(f"XFS AGF {ag} is damaged")
        if not 1 <= bno_level <= 16 or not 0 < bno_root < length:
            raise CorruptFilesystem(f"XFS AGF {ag} free-space tree root is impossible")
        free: list[Range] = []
        stack: list[tuple[int, int]] = [(bno_root, bno_level - 1)]
        visited = 0
        while stack:
            block, level = stack.pop()
            visited += 1
            if visited > length or not 0 < block < length:
                raise CorruptFilesystem(f"XFS AG {ag} free-space tree is cyclic or out of range")
            node = read_exact(src, (ag_first + block) * bs, bs)
            node_magic = node[:4]
            node_level, numrecs = struct.unpack_from(">HH", node, 4)
            if node_magic not in _XFS_BNO_MAGICS or node_level != level:
                raise CorruptFilesystem(f"XFS AG {ag} free-space tree node {block} is damaged")
            if level == 0:
                if hdr + numrecs * 8 > bs:
                    raise CorruptFilesystem(f"XFS AG {ag} bnobt leaf {block} overflows")
                for i in range(numrecs):
                    start, count = struct.unpack_from(">II", node, hdr + 8 * i)
                    if count == 0 or start + count > length:
                        raise CorruptFilesystem(f"XFS AG {ag} free extent out of range")
                    free.append((start, count))
            else:
                if numrecs > maxrecs:
                    raise CorruptFilesystem(f"XFS AG {ag} bnobt node {block} overflows")
                ptrs = struct.unpack_from(f">{numrecs}I", node, hdr + maxrecs * 8)
                # Reverse so leaves are visited left to right.
                stack.extend((ptr, level - 1) for ptr in reversed(ptrs))
        if sum(n for _s, n in free) != freeblks:
            raise CorruptFilesystem(
                f"XFS AG {ag}: free extents do not add up to agf_freeblks ({freeblks})"
            )
        # Used = the AG minus its free extents (AG headers, AGFL, btrees, log, inodes, data).
        pos = 0
        for start, count in sorted(free):
            if start < pos:
                raise CorruptFilesystem(f"XFS AG {ag} free extents overlap")
            if start > pos:
                used.append(((ag_first + pos) * bs, (start - pos) * bs))
            pos = start + count
        if pos < length:
            used.append(((ag_first + pos) * bs, (length - pos) * bs))
    used.append((dblocks * bs, src.size_bytes() - dblocks * bs))
    return used


# ---------------------------------------------------------------------------------------------
# NTFS


def _ntfs_used(src: ByteSource) -> list[Range]:
    import io

    from dissect.ntfs import NTFS

    from image._source import SourceIO

    boot = read_exact(src, 0, 512)
    sector_size = struct.unpack_from("<H", boot, 11)[0]
    spc_raw = boot[13]
    spc = 1 << (256 - spc_raw) if spc_raw > 0x80 else spc_raw
    total_sectors = struct.unpack_from("<Q", boot, 40)[0]
    if sector_size not in (512, 1024, 2048, 4096) or spc == 0 or spc & (spc - 1):
        raise CorruptFilesystem("NTFS boot sector geometry is impossible")
    cluster = sector_size * spc
    clusters = total_sectors // spc
    if clusters * cluster > src.size_bytes():
        raise CorruptFilesystem("NTFS volume is larger than its partition")
    try:
        ntfs = NTFS(io.BufferedReader(SourceIO(src), 64 * 1024))
        assert ntfs.mft is not None
        volume = ntfs.mft.get(3)
        info = volume.attributes[0x70]
        if info and struct.unpack_from("<H", info[0].data(), 10)[0] & 0x1:
            raise UnsupportedFilesystem("NTFS volume is dirty: $Bitmap may be stale")
        stream = ntfs.mft.get(6).open()
        bitmap = stream.read((clusters + 7) // 8)
    except ImageError:
        raise
    except Exception as exc:
        raise CorruptFilesystem(f"cannot read NTFS $Bitmap: {type(exc).__name__}: {exc}") from exc
    if len(bitmap) * 8 < clusters:
        raise CorruptFilesystem("NTFS $Bitmap is shorter than the volume")
    used = [(first * cluster, n * cluster) for first, n in bitmap_runs(bitmap, clusters)]
    # Boot sector/$Boot and, past the last cluster, the backup boot sector.
    used.append((0, max(8192, cluster)))
    used.append((clusters * cluster, src.size_bytes() - clusters * cluster))
    return used


# ---------------------------------------------------------------------------------------------
# FAT


def _fat_used(src: ByteSource) -> list[Range]:
    boot = read_exact(src, 0, 512)
    ss, spc, reserved, nfats, root_entries, tot16, _media, fatsz16 = struct.unpack_from(
        "<HBHBHHBH", boot, 11
    )
    tot32, fatsz32 = struct.unpack_from("<I", boot, 32)[0], struct.unpack_from("<I", boot, 36)[0]
    total = tot16 or tot32
    fatsz = fatsz16 or fatsz32
    if ss not in (512, 1024, 2048, 4096) or spc == 0 or spc & (spc - 1) or reserved == 0:
        raise CorruptFilesystem("FAT boot sector geometry is impossible")
    if nfats == 0 or fatsz == 0 or total == 0:
        raise CorruptFilesystem("FAT boot sector geometry is impossible")
    root_sectors = (root_entries * 32 + ss - 1) // ss
    first_data = reserved + nfats * fatsz + root_sectors
    if first_data >= total or total * ss > src.size_bytes():
        raise CorruptFilesystem("FAT volume does not fit its partition")
    clusters = (total - first_data) // spc
    bits = 12 if clusters < 4085 else 16 if clusters < 65525 else 32
    if (clusters + 2) * bits > fatsz * ss * 8:
        raise CorruptFilesystem("FAT table is too small for the volume")
    table = read_exact(src, reserved * ss, (((clusters + 2) * bits + 7) // 8))
    dirty = _fat_dirty(boot, table, bits, fat32_layout=fatsz16 == 0)
    if dirty is not None:
        raise UnsupportedFilesystem(f"FAT volume {dirty}: its FAT may be stale")
    cluster_bytes = ss * spc
    data_off = first_data * ss
    used: list[Range] = [(0, data_off)]  # reserved sectors, every FAT copy, FAT12/16 root dir

    def entries() -> Iterator[int]:
        if bits == 12:
            for c in range(2, clusters + 2):
                v = struct.unpack_from("<H", table, c + c // 2)[0]
                yield v >> 4 if c & 1 else v & 0xFFF
        elif bits == 16:
            yield from memoryview(table).cast("H")[2 : clusters + 2]
        else:
            for v in memoryview(table).cast("I")[2 : clusters + 2]:
                yield v & 0x0FFFFFFF

    run_start = -1
    for index, value in enumerate(entries()):
        if value and run_start < 0:
            run_start = index
        elif not value and run_start >= 0:
            used.append((data_off + run_start * cluster_bytes, (index - run_start) * cluster_bytes))
            run_start = -1
    if run_start >= 0:
        used.append((data_off + run_start * cluster_bytes, (clusters - run_start) * cluster_bytes))
    end = data_off + clusters * cluster_bytes
    used.append((end, src.size_bytes() - end))
    return used


_FAT_STATE_DIRTY = 0x01  # BS_Reserved1 ("state"): set while mounted read-write
_FAT16_CLEAN, _FAT16_NO_ERRORS = 0x8000, 0x4000  # FAT entry 1 (fatgen103 ClnShutBitMask...)
_FAT32_CLEAN, _FAT32_NO_ERRORS = 0x08000000, 0x04000000


def _fat_dirty(boot: bytes, table: bytes, bits: int, *, fat32_layout: bool) -> str | None:
    """Why a FAT volume is not clean, or None.

    Linux (fat_set_state) and Windows NT set bit 0 of the boot sector's state byte while the
    volume is mounted read-write; Windows clears the "clean shutdown" bit of FAT entry 1 while
    mounted and the "no errors" bit after an I/O error (FAT16/32 only).
    """
    state_at = 65 if fat32_layout else 37  # BS_Reserved1, after BS_DrvNum
    if boot[state_at + 1] in (0x28, 0x29) and boot[state_at] & _FAT_STATE_DIRTY:
        return "is marked dirty (boot sector state): it was not cleanly unmounted"
    if bits == 16:
        entry1 = struct.unpack_from("<H", table, 2)[0]
        clean, no_errors = entry1 & _FAT16_CLEAN, entry1 & _FAT16_NO_ERRORS
    elif bits == 32:
        entry1 = struct.unpack_from("<I", table, 4)[0]
        clean, no_errors = entry1 & _FAT32_CLEAN, entry1 & _FAT32_NO_ERRORS
    else:
        return None
    if not clean:
        return "was not cleanly shut down (FAT entry 1)"
    if not no_errors:
        return "had I/O errors (FAT entry 1)"
    return None


_MAPPERS = {"ext": _ext_used, "xfs": _xfs_used, "ntfs": _ntfs_used, "fat": _fat_used}


def filesystem_used_ranges(src: ByteSource, fs_type: str | None = None) -> list[Range]:
    """Used byte ranges of one filesystem (offsets relative to ``src``), sorted and merged.

    Raises UnsupportedFilesystem / CorruptFilesystem when the allocation map cannot be trusted;
    the caller then keeps the whole source.
    """
    kind = fs_type or detect_fs(src)
    if kind is None:
        raise UnsupportedFilesystem("no supported filesystem")
    mapper = _MAPPERS.get(kind)
    if mapper is None:
        raise UnsupportedFilesystem(f"no used-block map for {kind!r}")
    try:
        ranges = mapper(src)
    except ImageError:
        raise
    except Exception as exc:
        # Garbage makes parsers fail in arbitrary ways; the caller keeps the region whole.
        log.debug("%s used-block map failed", kind, exc_info=True)
        raise CorruptFilesystem(f"{kind}: {type(exc).__name__}: {exc}") from exc
    return merge_ranges(ranges, src.size_bytes())


def _map_region(
    src: ByteSource, name: str, start: int, size: int, fs_type: str | None, error: str | None
) -> tuple[list[Range], PartitionUsage]:
    from image._source import SliceSource

    usage = PartitionUsage(name, start, size, fs_type, size, False, error)
    whole = [(start, size)]
    if fs_type is None or error is not None:
        return whole, usage
    try:
        local = filesystem_used_ranges(SliceSource(src, start, size), fs_type)
    except ImageError as exc:
        usage.error = f"{type(exc).__name__}: {exc}; kept whole"
        log.info("%s: used-block map unavailable (%s); keeping it whole", name, exc)
        return whole, usage
    usage.bitmap_used = True
    usage.used_bytes = sum(n for _o, n in local)
    return [(start + off, n) for off, n in local], usage


def used_ranges(src: ByteSource) -> UsedMap:
    """Byte ranges of ``src`` a backup must store; the rest restores as zeros.

    Never raises for bad content (an unreadable table or filesystem is kept whole and noted);
    errors from ``src.pread`` itself propagate. Thread-safe (no shared state).
    """
    size = src.size_bytes()
    try:
        layout = open_disk(src)
    except ImageError as exc:
        result = UsedMap(size, "unknown", [(0, size)] if size else [])
        result.notes.append(f"partition table unreadable ({exc}); disk kept whole")
        return result
    return _used_from_layout(src, layout)


def _used_from_layout(src: ByteSource, layout: DiskLayout) -> UsedMap:
    size = layout.size_bytes
    result = UsedMap(size, layout.scheme)
    result.notes += layout.warnings
    if layout.scheme == "none":
        ranges, usage = _map_region(src, "disk", 0, size, layout.fs_type, None)
        result.partitions.append(usage)
        result.ranges = merge_ranges(ranges, size)
        return result
    keep: list[Range] = list(layout.table_ranges)
    # Everything not inside a data partition is kept: start with the complement.
    pos = 0
    for part in sorted(layout.partitions, key=lambda p: p.start_bytes):
        if part.start_bytes > pos:
            keep.append((pos, part.start_bytes - pos))
        pos = max(pos, part.start_bytes + part.size_bytes)
    if pos < size:
        keep.append((pos, size - pos))
    for part in layout.partitions:
        ranges, usage = _map_region(
            src,
            part.name,
            part.start_bytes,
            part.source.size_bytes(),
            part.fs_type,
            part.error,
        )
        usage.size_bytes = part.size_bytes
        keep += ranges
        result.partitions.append(usage)
    result.ranges = merge_ranges(keep, size)
    return result


# ---------------------------------------------------------------------------------------------
# Live block devices


def _stacked_devices(dev: str, sys_block: Path) -> set[str]:
    """``dev`` ("major:minor") plus its partitions and the devices stacked on them (dm, md)."""
    seen: set[str] = set()
    todo = [dev]
    while todo:
        cur = todo.pop()
        if cur in seen:
            continue
        seen.add(cur)
        node = sys_block / cur
        try:
            children = [p for p in node.iterdir() if (p / "partition").exists()]
            children += [Path("/sys/class/block") / h.name for h in (node / "holders").iterdir()]
        except OSError:
            continue
        for child in children:
            try:
                todo.append((child / "dev").read_text().strip())
            except OSError:
                continue
    return seen


def _loop_devices_of(st: os.stat_result, sys_block: Path) -> list[str]:
    """The loop devices ("major:minor") whose backing file is the file with stat ``st``."""
    out: list[str] = []
    try:
        nodes = list(sys_block.iterdir())
    except OSError:
        return out
    for node in nodes:
        try:
            backing = (node / "loop" / "backing_file").read_text().rstrip("\n")
            bst = os.stat(backing)
        except OSError:
            continue
        if (bst.st_dev, bst.st_ino) == (st.st_dev, st.st_ino):
            out.append(node.name)
    return out


def _unescape_mountinfo(field_text: str) -> str:
    """Mount points in mountinfo escape space, tab, newline and backslash as ``\\ooo``."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_text)


def writable_mounts(
    path: str | os.PathLike[str],
    *,
    mountinfo: str = "/proc/self/mountinfo",
    sys_block: str = "/sys/dev/block",
) -> list[str]:
    """Mount points where block device ``path`` is mounted read-write on this host.

    A partition of it or a device-mapper / md device stacked on it counts too, and for an
    image file, the loop devices backed by it. The superblock's options decide (a read-only
    bind mount of a read-write filesystem is still being written). ``[]`` when nobody has it
    mounted read-write.
    """
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        roots = [f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"]
    elif stat.S_ISREG(st.st_mode):
        roots = _loop_devices_of(st, Path(sys_block))
    else:
        return []
    devs: set[str] = set()
    for root in roots:
        devs |= _stacked_devices(root, Path(sys_block))
    out: list[str] = []
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            fields = line.split()
            try:
                sep = fields.index("-", 6)
                super_opts = fields[sep + 3].split(",")
            except (ValueError, IndexError):
                continue
            if fields[2] in devs and "rw" in super_opts:
                out.append(_unescape_mountinfo(fields[4]))
    return out
