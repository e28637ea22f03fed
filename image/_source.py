"""Byte sources: the only way :mod:`image` reads a disk.

Owns the :class:`ByteSource` structural Protocol, two implementations (:class:`FileSource` for
plain files, :class:`SliceSource` for a window such as a partition) and :class:`SourceIO`, a
seekable read-only file object over a source that the ``dissect.*`` parsers consume.

Must not import any other project package: the dedup store's disk readers satisfy
:class:`ByteSource` structurally.
"""

from __future__ import annotations

import io
import os
from typing import Protocol, runtime_checkable

__all__ = ["ByteSource", "FileSource", "SliceSource", "SourceIO", "read_exact"]


@runtime_checkable
class ByteSource(Protocol):
    """Random-access, read-only bytes.

    ``pread`` returns exactly ``length`` bytes unless the range crosses the end of the source,
    in which case it returns the bytes up to the end (possibly ``b""``).
    """

    def size_bytes(self) -> int: ...

    def pread(self, offset: int, length: int) -> bytes: ...


class FileSource:
    """A plain file (or block device) opened read-only.

    Thread-safe: ``os.pread`` carries its own offset. Call :meth:`close` (or use ``with``)
    to release the descriptor.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        # Block devices report 0 from fstat; seeking to the end gives the real size.
        self._size = os.lseek(self._fd, 0, os.SEEK_END)

    def size_bytes(self) -> int:
        return self._size

    def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        length = max(0, min(length, self._size - offset))
        if length == 0:
            return b""
        parts: list[bytes] = []
        while length > 0:
            chunk = os.pread(self._fd, length, offset)
            if not chunk:
                break
            parts.append(chunk)
            offset += len(chunk)
            length -= len(chunk)
        return b"".join(parts)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FileSource({self.path!r})"


class SliceSource:
    """The window ``[start, start + length)`` of another source, clipped to its end.

    Thread-safe if the parent is.
    """

    def __init__(self, src: ByteSource, start: int, length: int) -> None:
        if start < 0 or length < 0:
            raise ValueError("negative start or length")
        self.parent = src
        self.start = start
        # A partition entry may claim more than the disk holds: clip so reads stay short.
        self.length = max(0, min(length, src.size_bytes() - start))

    def size_bytes(self) -> int:
        return self.length

    def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        length = max(0, min(length, self.length - offset))
        if length == 0:
            return b""
        return self.parent.pread(self.start + offset, length)

    def __repr__(self) -> str:
        return f"SliceSource({self.parent!r}, {self.start}, {self.length})"


def read_exact(src: ByteSource, offset: int, length: int) -> bytes:
    """``src.pread`` that returns exactly ``length`` bytes or raises ``EOFError``."""
    data = src.pread(offset, length)
    if len(data) != length:
        raise EOFError(f"short read at {offset}: wanted {length}, got {len(data)}")
    return data


class SourceIO(io.RawIOBase):
    """A seekable, read-only binary file object over a :class:`ByteSource`.

    Not thread-safe by itself (it has a file position); callers serialise access, which
    ``image``'s filesystems do with one lock each.
    """

    def __init__(self, src: ByteSource) -> None:
        super().__init__()
        self.src = src
        self.size = src.size_bytes()
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self.size + offset
        else:
            raise ValueError(f"bad whence {whence}")
        if pos < 0:
            raise OSError("seek before start of source")
        self._pos = pos
        return pos

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = max(0, self.size - self._pos)
        data = self.src.pread(self._pos, size) if self._pos < self.size else b""
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        memoryview(buffer)[: len(data)] = data
        return len(data)
