"""Exceptions raised by :mod:`image`.

Owns the error hierarchy only. Every failure caused by the *content* of an image (garbage,
truncation, unsupported features) surfaces as an :class:`ImageError` subclass; anything else
escaping this package is a bug.
"""

from __future__ import annotations

__all__ = [
    "CorruptFilesystem",
    "ImageError",
    "NotFound",
    "PartitionTableError",
    "UnsupportedFilesystem",
]


class ImageError(Exception):
    """Base class: the image content cannot be interpreted as asked."""


class PartitionTableError(ImageError):
    """The partition table is malformed (bad signature, impossible geometry, loops)."""


class UnsupportedFilesystem(ImageError):
    """No supported filesystem was recognised, or it uses a feature we cannot read."""


class CorruptFilesystem(ImageError):
    """A filesystem was recognised but its structures are inconsistent or truncated."""


class NotFound(ImageError):
    """A path does not exist inside the filesystem."""
