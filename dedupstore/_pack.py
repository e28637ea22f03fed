"""Pack files: append-only containers of chunk payloads, one writer each.

Owns writing (PackWriter), positional reads of one payload, and scanning a pack without the
index (for index rebuilds, crash recovery and verify). A pack is written once, sealed with a
table + footer and fsynced before the index may point into it; it is never modified after,
only deleted whole by compaction.
"""

from __future__ import annotations

import errno
import logging
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from .errors import ChunkCorrupt, FormatError, OutOfSpace
from .formats import (
    ENTRY_HEADER,
    ENTRY_HEADER_CRC_SPAN,
    ENTRY_TAG,
    FOOTER_MAGIC,
    ID_BYTES,
    MAX_CHUNK_BYTES,
    PACK_FOOTER,
    PACK_HEADER,
    PACK_MAGIC,
    PACK_SUFFIX,
    TABLE_ENTRY,
    ChunkId,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PackEntry:
    chunk_id: ChunkId
    offset: int  # of the payload (just after the entry header)
    stored_len: int
    raw_len: int
    kind: int
    codec: int


def pack_path(root: Path, tier: str, pack_id: int) -> Path:
    """packs/<tier>/<two hex digits>/<16 hex digits>.pack"""
    name = f"{pack_id:016x}"
    return root / "packs" / tier / name[-2:] / (name + PACK_SUFFIX)


def make_private_dirs(path: Path) -> None:
    """`mkdir -p` where every directory created is 0700 whatever the umask (the existing
    ones are left as they are)."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            continue  # another writer made it meanwhile
        os.chmod(d, 0o700)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PackWriter:
    """Appends entries to a new pack file. Not thread-safe: one owner thread."""

    def __init__(self, root: Path, tier: str, pack_id: int) -> None:
        self.pack_id = pack_id
        self.tier = tier
        self.path = pack_path(root, tier, pack_id)
        make_private_dirs(self.path.parent)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.fchmod(self._fd, 0o600)  # the owner's only, whatever the umask
        self._buf: list[bytes] = []
        self._buffered = 0
        self.entries: list[PackEntry] = []
        header = PACK_HEADER.pack(PACK_MAGIC, pack_id, tier.encode()[:16], time.time_ns())
        self._write(header)
        self.size = len(header)

    def _write(self, data: bytes) -> None:
        self._buf.append(data)
        self._buffered += len(data)
        if self._buffered >= 4 * 1024 * 1024:
            self._drain()

    def _drain(self) -> None:
        if not self._buf:
            return
        data = b"".join(self._buf)
        self._buf.clear()
        self._buffered = 0
        view = memoryview(data)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise OutOfSpace(f"no space left writing {self.path}") from exc
            raise

    def add(self, chunk_id: ChunkId, kind: int, codec: int, payload: bytes, raw_len: int) -> int:
        """Append one entry; returns the bytes it added to the pack."""
        crc = zlib.crc32(payload)
        head = ENTRY_HEADER.pack(ENTRY_TAG, kind, codec, 0, chunk_id, len(payload), raw_len, crc, 0)
        head = head[:ENTRY_HEADER_CRC_SPAN] + zlib.crc32(head[:ENTRY_HEADER_CRC_SPAN]).to_bytes(
            4, "little"
        )
        self._write(head)
        self._write(payload)
        entry = PackEntry(chunk_id, self.size + len(head), len(payload), raw_len, kind, codec)
        self.entries.append(entry)
        added = len(head) + len(payload)
        self.size += added
        return added

    def seal(self) -> list[PackEntry]:
        """Write table + footer, fsync file and directory, close. Returns the entries."""
        table = b"".join(
            TABLE_ENTRY.pack(e.chunk_id, e.offset, e.stored_len, e.raw_len, e.kind, e.codec)
            for e in self.entries
        )
        footer = PACK_FOOTER.pack(FOOTER_MAGIC, len(self.entries), self.size, zlib.crc32(table))
        self._write(table)
        self._write(footer)
        try:
            self._drain()
            self.size += len(table) + len(footer)
            os.fsync(self._fd)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise OutOfSpace(f"no space left sealing {self.path}") from exc
            raise
        finally:
            os.close(self._fd)
            self._fd = -1
        _fsync_dir(self.path.parent)
        return self.entries

    def abort(self) -> None:
        """Close without sealing (the file stays for crash recovery to salvage)."""
        if self._fd >= 0:
            try:
                self._drain()
            except (OSError, OutOfSpace) as exc:  # best effort: we are already failing
                log.warning("could not flush unsealed pack %s: %s", self.path, exc)
                self._buf.clear()
            finally:
                os.close(self._fd)
                self._fd = -1


def read_payload(fd: int, entry_offset: int, stored_len: int) -> bytes:
    """Read one payload by its index location. A short read is ChunkCorrupt."""
    data = os.pread(fd, stored_len, entry_offset)
    if len(data) != stored_len:
        raise ChunkCorrupt(f"pack truncated: wanted {stored_len} bytes at {entry_offset}")
    return data


def check_payload_crc(fd: int, entry_offset: int, payload: bytes) -> None:
    """Compare the payload with the crc in its entry header."""
    head = os.pread(fd, ENTRY_HEADER.size, entry_offset - ENTRY_HEADER.size)
    if len(head) != ENTRY_HEADER.size:
        raise ChunkCorrupt("pack truncated in an entry header")
    fields = ENTRY_HEADER.unpack(head)
    if fields[0] != ENTRY_TAG or fields[7] != zlib.crc32(payload):
        raise ChunkCorrupt("payload checksum mismatch")


@dataclass(frozen=True, slots=True)
class PackScan:
    pack_id: int
    tier: str
    entries: list[PackEntry]
    sealed: bool  # footer + table present and consistent
    valid_end: int  # bytes of the file that parse (a torn tail starts here)
    problems: list[str]


def read_header(fd: int) -> tuple[int, str]:
    head = os.pread(fd, PACK_HEADER.size, 0)
    if len(head) != PACK_HEADER.size:
        raise FormatError("pack shorter than its header")
    magic, pack_id, tier, _created = PACK_HEADER.unpack(head)
    if magic != PACK_MAGIC:
        raise FormatError("not a pack file (bad magic)")
    return pack_id, tier.rstrip(b"\0").decode(errors="replace")


def scan_pack(path: Path, *, check_payloads: bool = True) -> PackScan:
    """Parse a pack without the index.

    Uses the table when the footer is intact (and `check_payloads` is False); otherwise walks
    entries from the start, verifying header and payload crcs, and stops at the first damage.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        pack_id, tier = read_header(fd)
        size = os.fstat(fd).st_size
        problems: list[str] = []
        sealed = False
        table_entries: list[PackEntry] | None = None
        if size >= PACK_HEADER.size + PACK_FOOTER.size:
            magic, count, table_off, table_crc = PACK_FOOTER.unpack(
                os.pread(fd, PACK_FOOTER.size, size - PACK_FOOTER.size)
            )
            table_len = count * TABLE_ENTRY.size
            if magic == FOOTER_MAGIC and table_off + table_len + PACK_FOOTER.size == size:
                table = os.pread(fd, table_len, table_off)
                if zlib.crc32(table) == table_crc:
                    sealed = True
                    table_entries = [
                        PackEntry(ChunkId(c), o, s, r, k, cd)
                        for c, o, s, r, k, cd in TABLE_ENTRY.iter_unpack(table)
                    ]
                else:
                    problems.append("pack table checksum mismatch")
        if table_entries is not None and not check_payloads:
            return PackScan(pack_id, tier, table_entries, sealed, size, problems)
        entries, valid_end, walk_problems = _walk(fd, size, table_entries)
        problems.extend(walk_problems)
        return PackScan(pack_id, tier, entries, sealed, valid_end, problems)
    finally:
        os.close(fd)


def _walk(
    fd: int, size: int, table: list[PackEntry] | None
) -> tuple[list[PackEntry], int, list[str]]:
    entries: list[PackEntry] = []
    problems: list[str] = []
    pos = PACK_HEADER.size
    end = table[-1].offset + table[-1].stored_len if table else size
    if table == []:
        end = PACK_HEADER.size
    while pos + ENTRY_HEADER.size <= end:
        head = os.pread(fd, ENTRY_HEADER.size, pos)
        tag, kind, codec, _flags, cid, stored, raw, crc, hcrc = ENTRY_HEADER.unpack(head)
        if tag != ENTRY_TAG or zlib.crc32(head[:ENTRY_HEADER_CRC_SPAN]) != hcrc:
            if table is None and tag != ENTRY_TAG:
                break  # end of entries of an unsealed pack (or a torn header)
            problems.append(f"damaged entry header at offset {pos}")
            break
        if stored > MAX_CHUNK_BYTES or raw > MAX_CHUNK_BYTES or len(cid) != ID_BYTES:
            problems.append(f"implausible entry lengths at offset {pos}")
            break
        payload_off = pos + ENTRY_HEADER.size
        payload = os.pread(fd, stored, payload_off)
        if len(payload) != stored:
            problems.append(f"entry at offset {pos} truncated")
            break
        entry = PackEntry(ChunkId(cid), payload_off, stored, raw, kind, codec)
        if zlib.crc32(payload) != crc:
            problems.append(f"payload checksum mismatch at offset {pos} (chunk {cid.hex()[:16]})")
        else:
            entries.append(entry)
        pos = payload_off + stored
    if table is not None and len(entries) != len(table):
        # Entries that failed their crc are reported above; keep the rest usable.
        pass
    return entries, pos, problems


def salvage_pack(path: Path) -> PackScan:
    """Every intact entry of a pack whose header, table or some entries are damaged.

    Entries are self-describing: a tag, a header crc and a payload crc. This scans the whole
    file for the tag, keeps each entry whose header and payload crcs check, and resumes the
    search after anything damaged, so one bad byte costs at most the entry it hit. The pack
    id and tier come from the header when it is intact, else from the file's path
    (packs/<tier>/<xx>/<id>.pack). Raises FormatError when the name is not a pack id.
    """
    try:
        pid_from_name = int(path.stem, 16)
    except ValueError:
        raise FormatError(f"{path.name}: not a pack file name") from None
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        problems: list[str] = []
        try:
            pack_id, tier = read_header(fd)
            if pack_id != pid_from_name:
                problems.append(f"header names pack {pack_id:016x}")
                pack_id = pid_from_name
        except FormatError as exc:
            problems.append(f"header damaged: {exc}")
            pack_id, tier = pid_from_name, path.parent.parent.name
        size = os.fstat(fd).st_size
        data = os.pread(fd, size, 0) if size else b""
    finally:
        os.close(fd)
    entries: list[PackEntry] = []
    pos = data.find(ENTRY_TAG, PACK_HEADER.size if size >= PACK_HEADER.size else 0)
    end = PACK_HEADER.size
    while pos >= 0 and pos + ENTRY_HEADER.size <= size:
        head = data[pos : pos + ENTRY_HEADER.size]
        _tag, kind, codec, _flags, cid, stored, raw, crc, hcrc = ENTRY_HEADER.unpack(head)
        payload_off = pos + ENTRY_HEADER.size
        if (
            zlib.crc32(head[:ENTRY_HEADER_CRC_SPAN]) != hcrc
            or stored > MAX_CHUNK_BYTES
            or raw > MAX_CHUNK_BYTES
            or payload_off + stored > size
        ):
            pos = data.find(ENTRY_TAG, pos + 1)  # not an entry (or a damaged one): resync
            continue
        if zlib.crc32(data[payload_off : payload_off + stored]) != crc:
            problems.append(f"payload checksum mismatch at offset {pos} (chunk {cid.hex()[:16]})")
            pos = data.find(ENTRY_TAG, pos + 1)
            continue
        entries.append(PackEntry(ChunkId(cid), payload_off, stored, raw, kind, codec))
        end = payload_off + stored
        pos = data.find(ENTRY_TAG, end)
    return PackScan(pack_id, tier, entries, False, max(end, size), problems)


def pack_is_empty(path: Path) -> bool:
    """True only when a pack provably holds no entry: no bytes past a valid header, or a
    valid header followed only by an empty table's footer."""
    size = path.stat().st_size
    if size == 0:
        return True
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            read_header(fd)
        except FormatError:
            return False
        if size == PACK_HEADER.size:
            return True
        if size != PACK_HEADER.size + PACK_FOOTER.size:
            return False
        magic, count, table_off, _crc = PACK_FOOTER.unpack(
            os.pread(fd, PACK_FOOTER.size, PACK_HEADER.size)
        )
        return bool(magic == FOOTER_MAGIC and count == 0 and table_off == PACK_HEADER.size)
    finally:
        os.close(fd)
