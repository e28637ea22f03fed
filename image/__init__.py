"""Disk images: partition tables, filesystems and used-block maps.

``image`` reads a disk only through :class:`ByteSource` (``size_bytes()`` + ``pread()``), a
structural Protocol the dedup store's readers satisfy; it imports no other project package.

* :func:`open_disk` -> :class:`DiskLayout`: MBR (primary, extended, logical from p5) or GPT.
  A disk without a partition table has ``scheme == "none"`` and no partitions; if it holds a
  filesystem directly, ``DiskLayout.fs_type`` names it and :func:`open_filesystem` on the whole
  source opens it.
* :func:`open_filesystem` -> :class:`Filesystem` of :class:`Node`: read-only, thread-safe
  ext2/3/4, XFS, NTFS, FAT12/16/32 (parsing by ``dissect.*``).
* :func:`used_ranges` -> :class:`UsedMap`: byte ranges of a whole disk that must be backed up;
  everything else may be restored as zeros. :func:`filesystem_used_ranges` does the same for
  one volume (e.g. an agent's single partition) and raises instead of keeping it whole.
  :func:`writable_mounts` names where a block device is mounted read-write (a used map of a
  changing filesystem cannot be trusted).

Errors: everything caused by image content is an :class:`ImageError`
(:class:`PartitionTableError`, :class:`UnsupportedFilesystem`, :class:`CorruptFilesystem`,
:class:`NotFound`).
"""

from image._detect import detect_fs
from image._errors import (
    CorruptFilesystem,
    ImageError,
    NotFound,
    PartitionTableError,
    UnsupportedFilesystem,
)
from image._fs import Filesystem, Node, open_filesystem
from image._partition import DiskLayout, Partition, open_disk
from image._source import ByteSource, FileSource, SliceSource
from image._used import (
    PartitionUsage,
    UsedMap,
    filesystem_used_ranges,
    used_ranges,
    writable_mounts,
)

__all__ = [
    "ByteSource",
    "CorruptFilesystem",
    "DiskLayout",
    "FileSource",
    "Filesystem",
    "ImageError",
    "Node",
    "NotFound",
    "Partition",
    "PartitionTableError",
    "PartitionUsage",
    "SliceSource",
    "UnsupportedFilesystem",
    "UsedMap",
    "detect_fs",
    "filesystem_used_ranges",
    "open_disk",
    "open_filesystem",
    "used_ranges",
    "writable_mounts",
]
