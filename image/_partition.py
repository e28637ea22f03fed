"""Partition tables: MBR (with extended/logical partitions) and GPT.

Owns :func:`open_disk`, :class:`DiskLayout` and :class:`Partition`.

The parser is written here rather than taken from ``dissect.volume`` because this package needs
things that library does not give directly: Linux partition numbering (GPT slot index, MBR
primaries p1-p4, logical partitions from p5 in chain order), the exact byte ranges the tables
themselves occupy (MBR/EBR sectors, primary *and* backup GPT header + entry array, which the
used-block map must keep), per-partition errors instead of one failure for the whole disk, and
hard bounds against hostile input (EBR loops, absurd GPT entry counts). The formats are small
and stable, so a hundred lines of ``struct`` are cheaper to harden than an adapter.

Sector size is 512 bytes; GPT is also probed at 4096-byte sectors.
"""

from __future__ import annotations

import binascii
import logging
import struct
import uuid
from dataclasses import dataclass, field

from image._detect import detect_fs
from image._errors import PartitionTableError
from image._source import ByteSource, SliceSource

__all__ = ["DiskLayout", "Partition", "open_disk"]

log = logging.getLogger(__name__)

SECTOR = 512
_MBR_EXTENDED = frozenset({0x05, 0x0F, 0x85})
_MBR_GPT_PROTECTIVE = 0xEE
_MAX_LOGICAL = 128  # Linux's own limit is lower; this only bounds hostile EBR chains
_MAX_GPT_ARRAY_BYTES = 4 * 1024 * 1024
_GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
assert _GPT_HEADER.size == 92
_GPT_ENTRY = struct.Struct("<16s16sQQQ72s")
assert _GPT_ENTRY.size == 128
_MBR_ENTRY = struct.Struct("<B3sB3sII")
assert _MBR_ENTRY.size == 16


@dataclass(slots=True)
class Partition:
    """One data partition (never the MBR extended container).

    ``source`` is clipped to the disk; ``error`` says why the partition is suspect (extends past
    the end of the disk, filesystem unreadable, ...) and is None when all is well.
    """

    name: str
    number: int
    start_bytes: int
    size_bytes: int
    type_id: str
    source: SliceSource
    fs_type: str | None = None
    label: str = ""
    error: str | None = None


@dataclass(slots=True)
class DiskLayout:
    """A disk's partition scheme.

    ``scheme`` is "mbr", "gpt" or "none". With "none" ``partitions`` is empty: either the disk
    holds a filesystem directly (``fs_type`` says which; :func:`image.open_filesystem` on the
    whole source opens it) or nothing recognisable. ``table_ranges`` are the (offset, length)
    byte ranges occupied by the tables themselves; ``warnings`` collects non-fatal table damage
    (e.g. a broken logical-partition chain).
    """

    scheme: str
    size_bytes: int
    partitions: list[Partition] = field(default_factory=list)
    table_ranges: list[tuple[int, int]] = field(default_factory=list)
    fs_type: str | None = None
    warnings: list[str] = field(default_factory=list)


def open_disk(src: ByteSource) -> DiskLayout:
    """Read the partition table of ``src``.

    Raises :class:`PartitionTableError` when a table is present but unusable (MBR signature with
    invalid entries, GPT with no valid header). Never raises anything but ``ImageError``
    subclasses for bad content; an error in one partition is reported in ``Partition.error``.
    Thread-safe (no shared state).
    """
    try:
        return _open_disk(src)
    except PartitionTableError:
        raise
    except (EOFError, ValueError, struct.error, UnicodeDecodeError) as exc:
        raise PartitionTableError(f"malformed partition table: {exc}") from exc


def _open_disk(src: ByteSource) -> DiskLayout:
    size = src.size_bytes()
    mbr = src.pread(0, SECTOR)
    if len(mbr) < SECTOR:
        # Too small for any table; maybe a tiny filesystem, else nothing.
        return DiskLayout("none", size, fs_type=_safe_detect(src))
    has_sig = mbr[510:512] == b"\x55\xaa"
    entries = [_MBR_ENTRY.unpack_from(mbr, 446 + 16 * i) for i in range(4)]
    if has_sig and any(e[2] == _MBR_GPT_PROTECTIVE for e in entries):
        return _open_gpt(src, size)
    # A FAT/NTFS boot sector also ends in 55 AA, and a disk that once held a whole-disk
    # filesystem keeps its stale superblock in the boot gap. Like the kernel, a plausible
    # partition table wins: misreading a partitioned disk as one filesystem would let its
    # allocation map declare the partitions free (data loss in used_ranges), while the
    # opposite mistake only keeps too much.
    if has_sig and _plausible_mbr(entries, size):
        return _open_mbr(src, size, entries)
    fs_type = _safe_detect(src)
    if fs_type is not None or not has_sig:
        return DiskLayout("none", size, fs_type=fs_type)
    return _open_mbr(src, size, entries)


def _plausible_mbr(entries: list[tuple[int, bytes, int, bytes, int, int]], size: int) -> bool:
    """Valid boot flags and at least one non-empty entry starting inside the disk."""
    if any(status not in (0x00, 0x80) for status, *_rest in entries):
        return False
    return any(
        ptype != 0 and nsect != 0 and 0 < lba < size // SECTOR
        for _s, _c1, ptype, _c2, lba, nsect in entries
    )


def _safe_detect(src: ByteSource) -> str | None:
    try:
        return detect_fs(src)
    except (EOFError, ValueError, struct.error):
        return None


def _make_partition(
    src: ByteSource, size: int, name: str, number: int, start: int, length: int, type_id: str
) -> Partition:
    part = Partition(
        name=name,
        number=number,
        start_bytes=start,
        size_bytes=length,
        type_id=type_id,
        source=SliceSource(src, min(start, size), length),
    )
    if start + length > size:
        part.error = (
            f"partition ends at byte {start + length} beyond the end of the disk ({size} bytes)"
        )
        log.info("%s: %s", name, part.error)
    if part.source.size_bytes() > 0:
        part.fs_type = _safe_detect(part.source)
    return part


def _open_mbr(
    src: ByteSource, size: int, entries: list[tuple[int, bytes, int, bytes, int, int]]
) -> DiskLayout:
    layout = DiskLayout("mbr", size, table_ranges=[(0, SECTOR)])
    for status, _chs1, ptype, _chs2, _lba, nsect in entries:
        if status not in (0x00, 0x80):
            raise PartitionTableError(f"MBR entry has invalid boot flag 0x{status:02x}")
        if ptype != 0 and nsect == 0:
            raise PartitionTableError("MBR entry with a type but zero length")
    extended_seen = False
    for index, (_status, _c1, ptype, _c2, lba, nsect) in enumerate(entries):
        if ptype == 0 or nsect == 0:
            continue
        if lba == 0:
            raise PartitionTableError(f"MBR entry {index + 1} starts at sector 0")
        if ptype in _MBR_EXTENDED:
            if extended_seen:
                layout.warnings.append("more than one extended partition; ignoring the others")
                continue
            extended_seen = True
            _read_logical(src, size, lba, nsect, layout)
            continue
        layout.partitions.append(
            _make_partition(
                src,
                size,
                f"p{index + 1}",
                index + 1,
                lba * SECTOR,
                nsect * SECTOR,
                f"0x{ptype:02x}",
            )
        )
    layout.partitions.sort(key=lambda p: p.number)
    return layout


def _read_logical(
    src: ByteSource, size: int, ext_lba: int, ext_sectors: int, layout: DiskLayout
) -> None:
    """Follow the EBR chain; damage stops the chain with a warning (primaries stay usable)."""
    number = 5
    ebr_lba = ext_lba
    seen: set[int] = set()
    while True:
        if ebr_lba in seen or len(seen) >= _MAX_LOGICAL:
            layout.warnings.append(f"EBR chain loops or is too long at sector {ebr_lba}")
            return
        seen.add(ebr_lba)
        if not ext_lba <= ebr_lba < ext_lba + ext_sectors:
            layout.warnings.append(f"EBR at sector {ebr_lba} lies outside the extended partition")
            return
        ebr = src.pread(ebr_lba * SECTOR, SECTOR)
        if len(ebr) < SECTOR or ebr[510:512] != b"\x55\xaa":
            layout.warnings.append(f"EBR at sector {ebr_lba} is missing or has no signature")
            return
        layout.table_ranges.append((ebr_lba * SECTOR, SECTOR))
        _s, _c, ptype, _c2, rel, nsect = _MBR_ENTRY.unpack_from(ebr, 446)
        if ptype != 0 and nsect != 0:
            start = (ebr_lba + rel) * SECTOR
            layout.partitions.append(
                _make_partition(
                    src, size, f"p{number}", number, start, nsect * SECTOR, f"0x{ptype:02x}"
                )
            )
            number += 1
        _s, _c, ntype, _c2, next_rel, next_n = _MBR_ENTRY.unpack_from(ebr, 462)
        if ntype == 0 or next_n == 0 or next_rel == 0:
            return
        ebr_lba = ext_lba + next_rel


def _crc_ok(buf: bytes, header_size: int) -> bool:
    hdr = bytearray(buf[:header_size])
    stored = int(struct.unpack_from("<I", hdr, 16)[0])
    hdr[16:20] = b"\0\0\0\0"
    return binascii.crc32(hdr) & 0xFFFFFFFF == stored


def _read_gpt_header(
    src: ByteSource, size: int, lba: int, sector: int
) -> tuple[tuple[int, ...], bytes] | None:
    raw = src.pread(lba * sector, sector)
    if len(raw) < _GPT_HEADER.size or raw[:8] != b"EFI PART":
        return None
    fields = _GPT_HEADER.unpack_from(raw)
    header_size = fields[2]
    if not _GPT_HEADER.size <= header_size <= sector or not _crc_ok(raw, header_size):
        return None
    entries_lba, count, entry_size, entries_crc = fields[10], fields[11], fields[12], fields[13]
    if entry_size < 128 or entry_size % 8 or count * entry_size > _MAX_GPT_ARRAY_BYTES:
        return None
    array = src.pread(entries_lba * sector, count * entry_size)
    if len(array) != count * entry_size or binascii.crc32(array) & 0xFFFFFFFF != entries_crc:
        return None
    return fields, array


def _open_gpt(src: ByteSource, size: int) -> DiskLayout:
    for sector in (512, 4096):
        last_lba = size // sector - 1
        primary = _read_gpt_header(src, size, 1, sector)
        backup = _read_gpt_header(src, size, last_lba, sector) if last_lba > 1 else None
        if primary is None and backup is None:
            continue
        chosen = primary or backup
        assert chosen is not None
        fields, array = chosen
        layout = DiskLayout("gpt", size, table_ranges=[(0, sector)])
        if primary is None:
            layout.warnings.append("primary GPT header is damaged; using the backup")
        if backup is None:
            layout.warnings.append("backup GPT header is missing or damaged")
        # Keep both headers and both entry arrays wherever the headers say they are, plus the
        # conventional places (LBA 1..33 and the last 33 sectors) in case one header is bad.
        array_len = fields[11] * fields[12]
        for hdr in (primary, backup):
            if hdr is not None:
                layout.table_ranges.append((hdr[0][6] * sector, sector))
                layout.table_ranges.append((hdr[0][10] * sector, array_len))
        layout.table_ranges.append((sector, 33 * sector))
        tail = min(size, 33 * sector)
        layout.table_ranges.append((size - tail, tail))
        for index in range(fields[11]):
            type_guid, _uniq, first, last, _attrs, name = _GPT_ENTRY.unpack_from(
                array, index * fields[12]
            )
            if type_guid == b"\0" * 16:
                continue
            if last < first:
                layout.warnings.append(f"GPT entry {index + 1} ends before it starts")
                continue
            part = _make_partition(
                src,
                size,
                f"p{index + 1}",
                index + 1,
                first * sector,
                (last - first + 1) * sector,
                str(uuid.UUID(bytes_le=type_guid)),
            )
            part.label = name.decode("utf-16-le", errors="replace").split("\0", 1)[0]
            layout.partitions.append(part)
        return layout
    raise PartitionTableError("protective MBR but no valid GPT header (primary or backup)")
