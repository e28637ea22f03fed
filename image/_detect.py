"""Filesystem signature detection.

Owns :func:`detect_fs`: a cheap, side-effect-free look at the first sectors of a source that
names the filesystem family. It never opens the filesystem and never raises on garbage.
"""

from __future__ import annotations

import logging
import struct

from image._source import ByteSource

__all__ = ["FS_TYPES", "detect_fs"]

log = logging.getLogger(__name__)

FS_TYPES = ("ext", "xfs", "ntfs", "fat")

# ext2/3/4: superblock at byte 1024, s_magic (0xEF53) at offset 56 inside it.
_EXT_MAGIC_OFFSET = 1024 + 56


def _looks_like_fat(boot: bytes) -> bool:
    """Sanity-check a FAT BIOS parameter block (no single magic exists for FAT)."""
    if len(boot) < 512 or boot[0] not in (0xEB, 0xE9):
        return False
    bytes_per_sector, sec_per_clus, reserved, num_fats = struct.unpack_from("<HBHB", boot, 11)
    root_entries, tot16, _media, fat16 = struct.unpack_from("<HHBH", boot, 17)
    tot32, fat32 = struct.unpack_from("<I", boot, 32)[0], struct.unpack_from("<I", boot, 36)[0]
    if bytes_per_sector not in (512, 1024, 2048, 4096):
        return False
    if sec_per_clus == 0 or sec_per_clus & (sec_per_clus - 1):
        return False
    if reserved == 0 or num_fats == 0 or num_fats > 4:
        return False
    if (tot16 or tot32) == 0 or (fat16 or fat32) == 0:
        return False
    # FAT32 has no fixed root directory; FAT12/16 must have one.
    if fat16 == 0 and root_entries != 0:
        return False
    return boot[54:57] == b"FAT" or boot[82:85] == b"FAT" or boot[510:512] == b"\x55\xaa"


def detect_fs(src: ByteSource) -> str | None:
    """Return "ext", "xfs", "ntfs", "fat" or None from on-disk signatures.

    Never raises for content problems (a source error from ``pread`` propagates).
    """
    head = src.pread(0, 4096)
    if head[:4] == b"XFSB":
        return "xfs"
    if head[3:11] == b"NTFS    ":
        return "ntfs"
    if len(head) >= _EXT_MAGIC_OFFSET + 2 and head[_EXT_MAGIC_OFFSET : _EXT_MAGIC_OFFSET + 2] == (
        b"\x53\xef"
    ):
        return "ext"
    if head[3:11] == b"EXFAT   ":
        log.debug("exFAT is not supported")
        return None
    if _looks_like_fat(head):
        return "fat"
    return None
