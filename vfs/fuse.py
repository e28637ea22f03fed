"""Thin pyfuse3 adapter over `vfs.tree.Namespace`: inode numbers in, `FUSEError` out.

Owns the translation between FUSE requests and the namespace, the error mapping (`fuse_op`),
the worker-thread limiter and the server's lifecycle (`serve`). It must not know the layout
of the namespace or the store's internals.

Concurrency: pyfuse3 runs each request as a trio task (several in flight). Everything that
may touch the store or parse an image runs in one `trio.to_thread.run_sync` call per request
(a 128 KiB read is one call, not one per block) under the `store_limiter()`; inode-table ops that
only take a short lock (getattr, forget, open) stay on the event loop.

Caching: point content never changes, so entries and attributes carry long timeouts and
opened files set `keep_cache` (the page cache survives close/open). The live parts (sources,
point lists, `latest`) use one-second timeouts, so new points show up without a remount.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import signal
import stat
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from dedupstore import StoreError
from image import ImageError
from vfs.tree import Attr, Namespace, Node

log = logging.getLogger(__name__)

#: Worker threads doing store reads and image parsing for one mount (~ 2 x cores): enough to
#: keep both cores busy decompressing while other requests wait on pack reads.
STORE_THREADS = max(2, 2 * (os.cpu_count() or 1))


def store_limiter() -> trio.CapacityLimiter:
    """The named limiter of a mount's store work (created per Operations, per trio run)."""
    return trio.CapacityLimiter(STORE_THREADS)


#: Readahead window of a mount (see raise_readahead).
READAHEAD_KIB = 4096

_P = ParamSpec("_P")
_R = TypeVar("_R")


def fuse_op(
    fn: Callable[_P, Coroutine[Any, Any, _R]],
) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """Map every failure of a handler to a `FUSEError`, so nothing escapes into pyfuse3.

    StoreError -> its errno (EIO for missing/corrupt chunks, logged); OSError -> its errno;
    ImageError -> EIO (logged); anything else is a bug: logged with its traceback, EIO, and the
    operations object is flagged `degraded`. `trio.Cancelled` (a BaseException) passes through.
    """

    @functools.wraps(fn)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except StoreError as exc:
            if exc.errno == errno.EIO:
                log.error("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except ImageError as exc:
            log.error("%s: image content unreadable: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("%s failed unexpectedly", fn.__name__)
            if args and isinstance(args[0], Operations):
                args[0].degraded = True
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def entry_attributes(ino: int, attr: Attr) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = pyfuse3.InodeT(ino)
    e.generation = 0
    e.entry_timeout = attr.timeout_s
    e.attr_timeout = attr.timeout_s
    e.st_mode = pyfuse3.ModeT(attr.mode)
    e.st_nlink = attr.nlink
    e.st_uid = attr.uid
    e.st_gid = attr.gid
    e.st_rdev = attr.rdev
    e.st_size = attr.size
    e.st_blksize = 128 * 1024
    e.st_blocks = (attr.size + 511) // 512
    e.st_atime_ns = attr.atime_ns
    e.st_mtime_ns = attr.mtime_ns
    e.st_ctime_ns = attr.ctime_ns
    return e


class Operations(pyfuse3.Operations):
    """Read-only pyfuse3 operations over a Namespace.

    File handles are inode numbers (reads need nothing else); directory handles index a
    listing snapshot taken at opendir, so readdir offsets stay stable across calls.
    """

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, ns: Namespace, limiter: trio.CapacityLimiter | None = None) -> None:
        super().__init__()
        self.ns = ns
        self.store_limiter = limiter or store_limiter()
        self.degraded = False
        self._dirs: dict[int, list[tuple[str, Node]]] = {}
        self._next_dir_fh = 1

    async def _blocking(self, fn: Callable[..., _R], *args: object) -> _R:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.store_limiter)

    @fuse_op
    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        text = os.fsdecode(name)
        ino, attr = await self._blocking(self.ns.lookup, parent_inode, text)
        return entry_attributes(ino, attr)

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        # Must never raise: the kernel does not wait for an answer.
        for ino, count in inode_list:
            try:
                self.ns.forget(ino, count)
            except Exception:
                log.exception("forget(%d) failed", ino)

    @fuse_op
    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return entry_attributes(inode, self.ns.getattr(inode))

    @fuse_op
    async def setattr(
        self,
        inode: pyfuse3.InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: pyfuse3.FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    @fuse_op
    async def readlink(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileNameT:
        target = await self._blocking(self.ns.readlink, inode)
        return pyfuse3.FileNameT(os.fsencode(target))

    @fuse_op
    async def open(
        self, inode: pyfuse3.InodeT, flags: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        attr = self.ns.getattr(inode)
        if stat.S_ISDIR(attr.mode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        # Point content is immutable: let the page cache keep it across opens.
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(inode), keep_cache=not attr.live)

    @fuse_op
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        # One worker-thread call for the whole request, however many store blocks it spans.
        return await self._blocking(self.ns.read, fh, off, size)

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        return None

    @fuse_op
    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        entries = await self._blocking(self.ns.listdir, inode)
        fh = self._next_dir_fh
        self._next_dir_fh += 1
        self._dirs[fh] = entries
        return pyfuse3.FileHandleT(fh)

    @fuse_op
    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        entries = self._dirs.get(fh)
        if entries is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        for i in range(start_id, len(entries)):
            name, node = entries[i]
            # readdirplus: every accepted entry counts as a lookup; undo it if refused.
            ino = self.ns.remember(node)
            if not pyfuse3.readdir_reply(
                token, os.fsencode(name), entry_attributes(ino, node.attr), i + 1
            ):
                self.ns.forget(ino, 1)
                break

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        self._dirs.pop(fh, None)

    @fuse_op
    async def getxattr(
        self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> bytes:
        value = self.ns.xattrs(inode).get(os.fsdecode(name))
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @fuse_op
    async def listxattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> Sequence[pyfuse3.XAttrNameT]:
        return [pyfuse3.XAttrNameT(os.fsencode(k)) for k in self.ns.xattrs(inode)]

    @fuse_op
    async def access(self, inode: pyfuse3.InodeT, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        # Only reached without default_permissions; the mount is read-only either way.
        return not (mode & os.W_OK)

    @fuse_op
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = pyfuse3.StatvfsData()
        st.f_bsize = 128 * 1024
        st.f_frsize = 4096
        st.f_blocks = st.f_bfree = st.f_bavail = 0
        st.f_files = len(self.ns)
        st.f_ffree = st.f_favail = 0
        st.f_namemax = 255
        return st


class MountError(Exception):
    """The kernel refused the mount (see the log of libfuse for why)."""


def mount_options(*, allow_other: bool, fsname: str) -> set[str]:
    """Read-only, kernel-checked permissions. Never `max_read` (breaks pyfuse3 3.5 init)."""
    # Mount options are comma-separated: keep the fs name from splitting them.
    fsname = fsname.replace(",", "_").replace("\\", "_")
    opts = {"ro", "default_permissions", f"fsname={fsname}", "subtype=appliance"}
    if allow_other:
        opts.add("allow_other")
    return opts


def serve(
    ops: Operations, mountpoint: str, options: set[str], ready: Callable[[], None] | None = None
) -> None:
    """Mount, run until unmounted or SIGTERM/SIGINT, then unmount. Starts and ends trio.

    `ready` is called once the mount is up (the kernel queues requests until the loop runs).
    """
    try:
        pyfuse3.init(ops, mountpoint, options)
    except RuntimeError as exc:  # pyfuse3 reports fuse_session_new/mount failures this way
        raise MountError(f"cannot mount {mountpoint}: {exc}") from exc
    unmount = True
    try:
        if ready is not None:
            ready()
        trio.run(_main, mountpoint)
    except BaseException:
        unmount = False  # pyfuse3's examples: don't touch the mount after a crash of main()
        raise
    finally:
        pyfuse3.close(unmount=unmount)
    if ops.degraded:
        log.warning("the mount saw unexpected errors (see above)")


def raise_readahead(mountpoint: str, kib: int = READAHEAD_KIB) -> None:
    """Best effort (root only): widen the mount's readahead window beyond the 128 KiB default.

    With 128 KiB only one or two 128 KiB requests are in flight during a sequential read and
    the worker threads idle; 4 MiB keeps several requests decoding in parallel (measured on
    a 2-core machine: cold `dd` 180-300 -> 530-620 MB/s). The device comes from mountinfo:
    a stat() of the mount point would wait for this very server, which is not serving yet
    (so no realpath() either: it lstat()s every component).
    """
    # mountinfo octal-escapes space, tab, newline and backslash.
    real = os.path.abspath(mountpoint)
    for ch in "\\ \t\n":
        real = real.replace(ch, f"\\{ord(ch):03o}")
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
        dev = next(
            fields[2]
            for line in reversed(lines)
            if len(fields := line.split()) > 4 and fields[4] == real
        )
        with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
            f.write(str(kib))
    except (OSError, StopIteration) as exc:
        log.debug("readahead of %s left at the default: %s", mountpoint, exc)
    else:
        log.debug("readahead of %s (bdi %s) set to %d KiB", mountpoint, dev, kib)


async def _main(mountpoint: str) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal)
        nursery.start_soon(_tune_readahead, mountpoint)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _tune_readahead(mountpoint: str) -> None:
    """Widen readahead once FUSE INIT is done (the INIT reply resets the window)."""
    # A stat() of the root is answered only after INIT, by the loop that is now running.
    try:
        await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
    except OSError as exc:  # unmounted already
        log.debug("readahead of %s not tuned: %s", mountpoint, exc)
        return
    await trio.to_thread.run_sync(raise_readahead, mountpoint, abandon_on_cancel=True)


async def _stop_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()
            return
