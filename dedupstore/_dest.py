"""A restore's destination: create entries beneath one directory without following any link.

Owns :class:`Dest`, the one writer every file-level restore (file-tree points, files out of a
disk image) goes through, and :func:`valid_name`, the one test of a name a restore or a mount
may show or create. It must not know where entries come from (points, guest filesystems).

Why: a restore writes names chosen by someone else (a guest filesystem, an old backup) into a
directory that may already hold symlinks (``DEST/etc -> /etc``). A path-based writer follows
them and writes outside DEST. Here every path is resolved one component at a time from a
directory fd with ``O_NOFOLLOW | O_DIRECTORY`` (``openat``), so:

* a symlink already in DEST, or one the restore itself created (``a -> /x`` then ``a/f``), is
  never traversed: using it as a directory raises :class:`UnsafePath`;
* where the restore wants a directory and finds a symlink or a file, that entry is removed and
  a real directory created; where it wants a file, the old entry is unlinked first and the new
  one created with ``O_EXCL | O_NOFOLLOW`` (so a hard link to a file outside DEST is never
  written through, and a symlink raced in meanwhile makes the create fail, not follow);
* a non-empty directory is never removed to make room (that would lose data): UnsafePath;
* metadata is set through fds or ``*at`` calls with ``follow_symlinks=False``; calls that have
  no ``*at`` form (chmod, setxattr) go through ``/proc/self/fd/N`` of an ``O_PATH`` fd, which
  names exactly the inode that was opened.

Names are ``str`` as the os module returns them (undecodable bytes as surrogate escapes); they
are handed to os functions unchanged, which encode them back byte-exact. Never ``.encode()``.

Thread-safety: a Dest resolves paths through a cache of open directory fds and must be driven
from one thread; the fds :meth:`Dest.create_file` returns, and :func:`set_fd_meta` on them, may
be used on any thread.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from .errors import InvalidArgument

__all__ = ["Dest", "DestMeta", "UnsafePath", "set_fd_meta", "valid_name"]

log = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePath(InvalidArgument):
    """An entry that cannot be created beneath the destination without leaving it or
    destroying data (bad name, a symlink or file where a directory is needed, a non-empty
    directory in the way). The restore skips the entry; nothing was written for it."""


def valid_name(name: str) -> bool:
    """True if `name` may be one entry of a directory: not empty, ".", "..", and without "/"
    or NUL. Guest filesystems and damaged points can hold such names; the kernel would reject
    or misinterpret them, so mounts hide them and restores skip them."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


@dataclass(frozen=True, slots=True)
class DestMeta:
    """What a restore sets on an entry: permission bits, owner, times, xattrs."""

    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    xattrs: dict[str, bytes] = field(default_factory=dict)


def set_fd_meta(fd: int, meta: DestMeta, *, owner: bool) -> None:
    """Apply `meta` to the file open as `fd` (a regular file or directory, not O_PATH).

    Owner (uid/gid) only with `owner` (root). chown precedes chmod, which would otherwise lose
    set-id bits. Failures to set xattrs, owner or times are logged at INFO (a filesystem may not
    support them); a failing chmod raises OSError."""
    for name, value in meta.xattrs.items():
        try:
            os.setxattr(fd, name, value)
        except OSError as exc:
            log.info("cannot set xattr %s: %s", name, exc)
    if owner:
        try:
            os.fchown(fd, meta.uid, meta.gid)
        except OSError as exc:
            log.info("cannot chown: %s", exc)
    os.fchmod(fd, stat.S_IMODE(meta.mode))
    try:
        os.utime(fd, ns=(meta.atime_ns, meta.mtime_ns))
    except OSError as exc:
        log.info("cannot set times: %s", exc)


def placement(dest: Path, *, is_dir: bool, name: str) -> tuple[Path, str]:
    """Where a restored entry lands: (the directory a `Dest` opens, the path beneath it).

    A directory's contents go into `dest`; a single file goes into `dest` under its own name
    when `dest` is an existing directory, else it becomes `dest` itself.
    """
    if is_dir:
        return dest, ""
    if dest.is_dir():
        return dest, name
    return dest.parent, dest.name


class Dest:
    """A directory a restore writes beneath, by relative paths ("a/b/c", "" = the directory).

    The directory itself is the caller's choice: its own path may go through symlinks (it is
    created with its parents if `create`). Everything beneath it is resolved without following
    links (module docstring). Relative paths are split on "/" and every component must pass
    :func:`valid_name`, else :class:`UnsafePath`. Raises OSError for I/O problems.
    Drive it from one thread; use it as a context manager (it holds directory fds).
    """

    def __init__(self, root: Path, *, create: bool = True) -> None:
        self.path = Path(root)
        if create:
            self.path.mkdir(parents=True, exist_ok=True)
        self._root = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        # The directory chain last resolved: [(name, fd), ...] from the root down. Restores
        # walk trees depth-first, so consecutive paths share most of it (one openat per new
        # directory instead of one per component per entry).
        self._chain: list[tuple[str, int]] = []

    def __enter__(self) -> Dest:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._drop_chain()
        if self._root >= 0:
            os.close(self._root)
            self._root = -1

    def _drop_chain(self, depth: int = 0) -> None:
        for _name, fd in self._chain[depth:]:
            os.close(fd)
        del self._chain[depth:]

    @staticmethod
    def _parts(rel: str) -> list[str]:
        parts = rel.split("/") if rel else []
        for part in parts:
            if not valid_name(part):
                raise UnsafePath(f"{rel!r}: unsafe name {part!r}")
        return parts

    def _dir(self, rel: str, parts: list[str]) -> int:
        """The fd of directory `parts` (owned by the chain: do not close), never via a link."""
        keep = 0
        while keep < len(self._chain) and keep < len(parts) and self._chain[keep][0] == parts[keep]:
            keep += 1
        self._drop_chain(keep)
        cur = self._chain[-1][1] if self._chain else self._root
        for i in range(keep, len(parts)):
            try:
                fd = os.open(parts[i], _DIR_FLAGS, dir_fd=cur)
            except OSError as exc:
                if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                    where = "/".join(parts[: i + 1])
                    raise UnsafePath(f"{rel!r}: {where!r} is not a directory") from None
                raise
            self._chain.append((parts[i], fd))
            cur = fd
        return cur

    def _parent(self, rel: str) -> tuple[int, str]:
        parts = self._parts(rel)
        if not parts:
            raise UnsafePath("the destination itself is not an entry beneath it")
        return self._dir(rel, parts[:-1]), parts[-1]

    def _make_room(self, rel: str, parent: int, name: str, *, want_dir: bool) -> bool:
        """Clear `name` in `parent` for a new entry. True if an existing directory is kept
        (want_dir). Symlinks and files are unlinked, an empty directory is removed, a
        non-empty one raises UnsafePath."""
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if want_dir:
                return True
            try:
                os.rmdir(name, dir_fd=parent)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise UnsafePath(f"{rel!r}: a non-empty directory is in the way") from None
                raise
        else:
            os.unlink(name, dir_fd=parent)
        # The chain ends at `parent` (every caller resolved it just before), so it cannot hold
        # the entry just removed: nothing cached goes stale.
        return False

    def mkdir(self, rel: str) -> None:
        """Make `rel` a real directory (mode 0700 until :meth:`set_meta`); an existing
        directory is kept, a symlink or file there is replaced."""
        if not rel:
            return
        parent, name = self._parent(rel)
        if not self._make_room(rel, parent, name, want_dir=True):
            os.mkdir(name, 0o700, dir_fd=parent)

    def create_file(self, rel: str) -> int:
        """A new, empty regular file at `rel` (mode 0600), open for writing: the caller owns
        (and closes) the fd. Whatever was at `rel` is unlinked first, never written through."""
        parent, name = self._parent(rel)
        self._make_room(rel, parent, name, want_dir=False)
        return os.open(name, _NEW_FILE_FLAGS, 0o600, dir_fd=parent)

    def symlink(self, rel: str, target: str) -> None:
        """A symlink at `rel` pointing to `target` (stored as is; never followed here)."""
        parent, name = self._parent(rel)
        self._make_room(rel, parent, name, want_dir=False)
        os.symlink(target, name, dir_fd=parent)

    def mkfifo(self, rel: str) -> None:
        parent, name = self._parent(rel)
        self._make_room(rel, parent, name, want_dir=False)
        os.mkfifo(name, 0o600, dir_fd=parent)

    def mknod(self, rel: str, mode: int, rdev: int) -> None:
        """A device node (`mode` carries S_IFCHR or S_IFBLK; needs root)."""
        parent, name = self._parent(rel)
        self._make_room(rel, parent, name, want_dir=False)
        os.mknod(name, stat.S_IFMT(mode) | 0o600, rdev, dir_fd=parent)

    def link(self, existing_rel: str, rel: str) -> None:
        """A hard link at `rel` to the entry at `existing_rel` (itself never dereferenced)."""
        src_parent, src_name = self._parent(existing_rel)
        src_fd = os.dup(src_parent)  # resolving `rel` may close the chain's fds
        try:
            parent, name = self._parent(rel)
            self._make_room(rel, parent, name, want_dir=False)
            os.link(src_name, name, src_dir_fd=src_fd, dst_dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(src_fd)

    def set_meta(self, rel: str, meta: DestMeta, *, owner: bool) -> None:
        """Apply `meta` to the entry at `rel` ("" = the destination directory) without
        following it if it is a symlink (symlinks get owner, times and xattrs, no mode)."""
        if not rel:
            set_fd_meta(self._root, meta, owner=owner)
            return
        parent, name = self._parent(rel)
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        try:
            is_link = stat.S_ISLNK(os.fstat(fd).st_mode)
            # /proc/self/fd/N of an O_PATH fd is the opened inode itself; for a symlink the
            # same path would name the magic link, so symlinks use name + parent fd instead.
            here = f"/proc/self/fd/{parent}/{name}" if is_link else f"/proc/self/fd/{fd}"
            for key, value in meta.xattrs.items():
                try:
                    os.setxattr(here, key, value, follow_symlinks=False)
                except OSError as exc:
                    log.info("cannot set xattr %s on %s: %s", key, rel, exc)
            if owner:
                try:
                    os.chown(name, meta.uid, meta.gid, dir_fd=parent, follow_symlinks=False)
                except OSError as exc:
                    log.info("cannot chown %s: %s", rel, exc)
            if not is_link:
                os.chmod(here, stat.S_IMODE(meta.mode))
            try:
                os.utime(
                    name, ns=(meta.atime_ns, meta.mtime_ns), dir_fd=parent, follow_symlinks=False
                )
            except OSError as exc:
                log.info("cannot set times on %s: %s", rel, exc)
        finally:
            os.close(fd)
