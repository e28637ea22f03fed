"""The pyfuse3 adapter without a mount: Operations called directly over fake nodes."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Hashable

import pyfuse3
import pytest
from testlib import assert_logs

from dedupstore import (
    ChunkCorrupt,
    ChunkMissing,
    FormatError,
    InvalidArgument,
    NotFound,
    ReadOnly,
    StoreError,
    WrongPassphrase,
)
from image import CorruptFilesystem, UnsupportedFilesystem
from vfs.fuse import Operations
from vfs.tree import ROOT_INO, Attr, Namespace, Node

ROOT = pyfuse3.InodeT(ROOT_INO)


class FakeFile(Node):
    def __init__(self, key: Hashable, data: bytes = b"", exc: BaseException | None = None,
                 xattrs: dict[str, bytes] | None = None, target: str | None = None) -> None:
        self.key = key
        self.data = data
        self.exc = exc
        self._xattrs = xattrs or {}
        self.target = target
        mode = (stat.S_IFLNK | 0o777) if target else (stat.S_IFREG | 0o444)
        self.attr = Attr(mode, len(data))

    def read(self, offset: int, length: int) -> bytes:
        if self.exc is not None:
            raise self.exc
        return self.data[offset : offset + length]

    def readlink(self) -> str:
        if self.target is None:
            return super().readlink()
        return self.target

    def xattrs(self) -> dict[str, bytes]:
        return self._xattrs


class FakeDir(Node):
    def __init__(self, key: Hashable, kids: dict[str, Node], exc: BaseException | None = None,
                 live: bool = False) -> None:
        self.key = key
        self.kids = kids
        self.exc = exc
        self.attr = Attr(stat.S_IFDIR | 0o555, live=live)

    def children(self) -> list[tuple[str, Node]]:
        if self.exc is not None:
            raise self.exc
        return sorted(self.kids.items())


ERRORS: list[tuple[BaseException, int]] = [
    (ChunkMissing("gone"), errno.EIO),
    (ChunkCorrupt("bad crc"), errno.EIO),
    (FormatError("bad manifest"), errno.EIO),
    (NotFound("no such point"), errno.ENOENT),
    (ReadOnly("ro"), errno.EROFS),
    (InvalidArgument("bad"), errno.EINVAL),
    (WrongPassphrase("pw"), errno.EACCES),
    (StoreError("generic"), errno.EIO),
    (CorruptFilesystem("garbage inode"), errno.EIO),
    (UnsupportedFilesystem("zfs"), errno.EIO),
    (PermissionError(errno.EACCES, "denied"), errno.EACCES),
    (OSError(errno.ENOSPC, "full"), errno.ENOSPC),
    (RuntimeError("a bug"), errno.EIO),
    (KeyError("a bug"), errno.EIO),
]


def make_ops() -> Operations:
    kids: dict[str, Node] = {
        f"f{i}": FakeFile(("f", i), exc=exc) for i, (exc, _e) in enumerate(ERRORS)
    }
    kids["ok"] = FakeFile("ok", b"0123456789", xattrs={"user.a": b"1"})
    kids["link"] = FakeFile("link", target="ok")
    kids["hard"] = FakeFile("ok", b"0123456789")  # same key: a hard link
    kids["sub"] = FakeDir("sub", {}, exc=ChunkMissing("dir index gone"))
    return Operations(Namespace(FakeDir("root", kids, live=True)))


async def lookup(ops: Operations, name: str) -> int:
    entry = await ops.lookup(ROOT, pyfuse3.FileNameT(name.encode()), None)  # type: ignore[arg-type]
    return int(entry.st_ino)


@pytest.mark.parametrize(("exc", "code"), ERRORS, ids=[type(e).__name__ for e, _c in ERRORS])
async def test_read_error_maps_to_errno(exc: BaseException, code: int) -> None:
    ops = make_ops()
    i = next(i for i, (e, _c) in enumerate(ERRORS) if e is exc)
    ino = await lookup(ops, f"f{i}")
    fi = await ops.open(pyfuse3.InodeT(ino), os.O_RDONLY, None)  # type: ignore[arg-type]
    # EIO is logged (a bug with its traceback); the errnos of ordinary failures are not
    expect: contextlib.AbstractContextManager[list[logging.LogRecord]] = (
        assert_logs("", level=logging.ERROR, logger="vfs.fuse") if code == errno.EIO
        else contextlib.nullcontext([]))
    with expect as logged, pytest.raises(pyfuse3.FUSEError) as err:
        await ops.read(fi.fh, 0, 4096)
    assert err.value.errno == code
    bug = not isinstance(exc, StoreError | OSError | CorruptFilesystem | UnsupportedFilesystem)
    assert ops.degraded is bug
    if bug:
        assert any(r.exc_info for r in logged), "a bug is logged with its traceback"
    # The mount stays usable after any failure.
    ok = await lookup(ops, "ok")
    fi = await ops.open(pyfuse3.InodeT(ok), os.O_RDONLY, None)  # type: ignore[arg-type]
    assert await ops.read(fi.fh, 2, 3) == b"234"


async def test_directory_errors_map_to_errno() -> None:
    ops = make_ops()
    sub = await lookup(ops, "sub")
    with assert_logs("dir index gone", level=logging.ERROR, count=1), \
            pytest.raises(pyfuse3.FUSEError) as err:
        await ops.opendir(pyfuse3.InodeT(sub), None)  # type: ignore[arg-type]
    assert err.value.errno == errno.EIO
    with pytest.raises(pyfuse3.FUSEError) as err:
        await lookup(ops, "nope")
    assert err.value.errno == errno.ENOENT
    ok = await lookup(ops, "ok")
    with pytest.raises(pyfuse3.FUSEError) as err:
        await ops.lookup(pyfuse3.InodeT(ok), pyfuse3.FileNameT(b"x"), None)  # type: ignore[arg-type]
    assert err.value.errno == errno.ENOTDIR
    with pytest.raises(pyfuse3.FUSEError) as err:
        await ops.getattr(pyfuse3.InodeT(99999), None)  # type: ignore[arg-type]
    assert err.value.errno == errno.ESTALE


async def test_attributes_links_xattrs_and_readonly() -> None:
    ops = make_ops()
    ok = await lookup(ops, "ok")
    assert await lookup(ops, "hard") == ok  # one key, one inode number
    attr = await ops.getattr(pyfuse3.InodeT(ok), None)  # type: ignore[arg-type]
    assert attr.st_size == 10 and stat.S_ISREG(attr.st_mode)
    assert attr.attr_timeout > 60  # immutable content is cached by the kernel
    root = await ops.getattr(ROOT, None)  # type: ignore[arg-type]
    assert root.attr_timeout <= 1  # the live catalogue is not
    link = await lookup(ops, "link")
    assert await ops.readlink(pyfuse3.InodeT(link), None) == b"ok"  # type: ignore[arg-type]
    with pytest.raises(pyfuse3.FUSEError) as err:
        await ops.readlink(pyfuse3.InodeT(ok), None)  # type: ignore[arg-type]
    assert err.value.errno == errno.EINVAL
    assert await ops.getxattr(pyfuse3.InodeT(ok), pyfuse3.XAttrNameT(b"user.a"),
                              None) == b"1"  # type: ignore[arg-type]
    assert list(await ops.listxattr(pyfuse3.InodeT(ok), None)) == [b"user.a"]  # type: ignore[arg-type]
    with pytest.raises(pyfuse3.FUSEError) as err:
        await ops.getxattr(pyfuse3.InodeT(ok), pyfuse3.XAttrNameT(b"user.b"),
                           None)  # type: ignore[arg-type]
    assert err.value.errno == pyfuse3.ENOATTR
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        with pytest.raises(pyfuse3.FUSEError) as err:
            await ops.open(pyfuse3.InodeT(ok), flags, None)  # type: ignore[arg-type]
        assert err.value.errno == errno.EROFS
    fi = await ops.open(pyfuse3.InodeT(ok), os.O_RDONLY, None)  # type: ignore[arg-type]
    assert fi.keep_cache
    with pytest.raises(pyfuse3.FUSEError) as err:
        await ops.open(ROOT, os.O_RDONLY, None)  # type: ignore[arg-type]
    assert err.value.errno == errno.EISDIR


async def test_forget_releases_inodes_and_never_raises() -> None:
    ops = make_ops()
    ok = await lookup(ops, "ok")
    assert await lookup(ops, "ok") == ok
    before = len(ops.ns)
    await ops.forget([(pyfuse3.InodeT(ok), 1)])
    assert len(ops.ns) == before  # one lookup left
    await ops.forget([(pyfuse3.InodeT(ok), 1), (pyfuse3.InodeT(424242), 3), (ROOT, 5)])
    assert len(ops.ns) == before - 1
    with pytest.raises(pyfuse3.FUSEError):
        await ops.getattr(pyfuse3.InodeT(ok), None)  # type: ignore[arg-type]
    assert await ops.getattr(ROOT, None)  # type: ignore[arg-type]
    assert await lookup(ops, "ok") != ok  # numbers are never reused
