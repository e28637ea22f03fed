"""Store exceptions: every error a user or a front-end must handle derives from StoreError.

Each class carries the errno a front-end (FUSE, NBD) should report. Bugs are not StoreErrors,
so broad handlers at the edges cannot swallow them.
"""

from __future__ import annotations

import errno


class StoreError(Exception):
    """Base of all expected store failures."""

    errno: int = errno.EIO


class InvalidArgument(StoreError):
    errno = errno.EINVAL


class NotFound(StoreError):
    errno = errno.ENOENT


class AlreadyExists(StoreError):
    errno = errno.EEXIST


class ReadOnly(StoreError):
    errno = errno.EROFS


class OutOfSpace(StoreError):
    errno = errno.ENOSPC


class Locked(StoreError):
    """Another process holds the repository's writer lock, or a point is locked."""

    errno = errno.EBUSY


class ChunkMissing(StoreError):
    errno = errno.EIO


class ChunkCorrupt(StoreError):
    errno = errno.EIO


class FormatError(StoreError):
    """An on-disk structure (pack, manifest, config) does not parse."""

    errno = errno.EIO


class WrongPassphrase(StoreError):
    errno = errno.EACCES
