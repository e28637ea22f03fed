"""Restores the CLI (and later the REST API) run: whole disks onto files or block devices, and
files or directories out of a filesystem inside an image point.

Owns the copy of a guest filesystem (``image.Node``) into a destination directory, and the
order of checks before a whole-disk restore overwrites its target (:mod:`appliance._targets`).
It must not parse arguments or print: commands do that.

A guest filesystem is hostile input: names such as ``..``, ``a/b``, NUL, duplicates, a
directory entry that points back at an ancestor, a symlink ``evil -> /etc`` followed by an
entry ``evil/x``. Names go through :func:`dedupstore.valid_name` (the filter the mount uses,
so both show the same tree: invalid names are skipped, of duplicates the last one listed
wins), and everything is written through :class:`dedupstore.Dest`, which never follows a
symlink beneath DEST (one already there or one this restore created).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import dedupstore as ds
import image

from . import _targets
from ._ui import UserError

log = logging.getLogger(__name__)

#: Bytes read from a guest file per call (the image layer reads only the blocks it needs).
COPY_CHUNK_BYTES = 8 << 20


@dataclass
class FileRestore:
    """What a file-level restore out of an image did."""

    source: str  # POINT/disk0/p1/path
    dest: Path
    entries: int = 0
    skipped: list[str] = field(default_factory=list)  # one line per entry left out, and why


def restore_disks(
    repo: ds.Repository,
    point: ds.Point,
    dest: Path,
    *,
    disk: str | None,
    force: bool,
    confirm: Callable[[_targets.Target], bool] | None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Write a point's disks to `dest` (one disk: a file or block device; several: a
    directory). Every target is checked first (:func:`appliance._targets.check_target`):
    one in use is refused; one holding data needs `force` or `confirm(target)` to say yes.
    Raises UserError before anything is written."""
    names = [r.name for r in ds.disk_readers(repo, point)]
    if disk and disk not in names:
        raise UserError(f"{point.name} has no disk {disk!r} (has {', '.join(names)})")

    def check(target: Path) -> None:
        _targets.check_target(target, force=force, confirm=confirm)

    return ds.restore_image(repo, point, dest, disk=disk or None, progress=progress, check=check)


def restore_from_image(
    repo: ds.Repository, point: ds.Point, disk: str, fs_path: str, dest: Path
) -> FileRestore:
    """Restore one file or directory of a filesystem inside an image point.

    `fs_path` is ``PART/path/in/fs`` where PART is a partition name (p1...) or ``fs`` for a
    filesystem on the whole disk. A directory is restored into `dest`; anything else becomes
    `dest` (or `dest/NAME` if `dest` is an existing directory). Raises UserError for a missing
    disk, partition or path and for a filesystem the image layer cannot read.
    """
    readers = {r.name: r for r in ds.disk_readers(repo, point)}
    if disk not in readers:
        raise UserError(f"{point.name} has no disk {disk!r} (has {', '.join(readers)})")
    part, _, path = fs_path.partition("/")
    src: image.ByteSource = readers[disk]
    if part != "fs":
        layout = image.open_disk(src)
        parts = {p.name: p for p in layout.partitions}
        if part not in parts:
            raise UserError(
                f"{point.name}/{disk} has no partition {part!r} (has {', '.join(parts) or 'none'})"
            )
        src = parts[part].source
    where = f"{point.name}/{disk}/{part}"
    result = FileRestore(f"{where}/{path}", dest)
    try:
        fs = image.open_filesystem(src)
        node = fs.lookup("/" + path)
        root, rel = ds.restore_placement(dest, is_dir=node.kind == "dir", name=node.name)
        with ds.Dest(root) as out:
            _copy_tree(node, out, rel, result)
    except image.ImageError as exc:
        raise UserError(f"{where}: {exc}") from exc
    except ds.UnsafePath as exc:  # only the top entry can get here (the user named it)
        raise UserError(f"{dest}: {exc}") from exc
    return result


def _copy_tree(top: image.Node, out: ds.Dest, top_rel: str, result: FileRestore) -> None:
    """Depth-first copy of `top` to `top_rel` in `out`, without recursion (a crafted image
    can nest deeper than Python's stack) and visiting every directory inode once (a crafted
    directory entry can point back at an ancestor)."""
    owner = os.geteuid() == 0
    seen_dirs: set[int] = set()
    first_path: dict[int, str] = {}  # inode of a hard-linked file -> where it was restored
    dirs: list[tuple[str, image.Node]] = []
    stack: list[tuple[str, image.Node]] = [(top_rel, top)]

    def skip(rel: str, why: str) -> None:
        result.skipped.append(f"{rel}: {why}")
        log.warning("%s: not restored: %s", rel or "/", why)

    while stack:
        rel, node = stack.pop()
        try:
            if node.kind == "dir":
                if node.inode in seen_dirs:
                    skip(rel, "a directory already restored (a loop in the filesystem)")
                    continue
                seen_dirs.add(node.inode)
                out.mkdir(rel)
                dirs.append((rel, node))
                kids = _children(node, rel, skip)
                # Reversed onto the stack so they pop in name order (depth-first, sorted).
                stack.extend(
                    (f"{rel}/{name}" if rel else name, kid) for name, kid in reversed(kids)
                )
            elif node.kind == "symlink":
                out.symlink(rel, node.readlink())
                out.set_meta(rel, _meta(node), owner=owner)
            elif node.kind == "file":
                if node.nlink > 1 and node.inode in first_path:
                    out.link(first_path[node.inode], rel)
                else:
                    _copy_file(node, out, rel, owner)
                    first_path[node.inode] = rel
            else:
                log.info("not restoring %s %s", node.kind, rel)
                continue
            result.entries += 1
        except ds.UnsafePath as exc:
            skip(rel, str(exc))
    for rel, node in reversed(dirs):
        out.set_meta(rel, _meta(node), owner=owner)


def _children(
    node: image.Node, rel: str, skip: Callable[[str, str], None]
) -> list[tuple[str, image.Node]]:
    """A directory's entries as the mount shows them: valid names only, sorted, and of
    duplicate names the last one listed."""
    kids: dict[str, image.Node] = {}
    for kid in sorted(node.listdir(), key=lambda n: n.name):
        where = f"{rel}/{kid.name!r}" if rel else repr(kid.name)
        if not ds.valid_name(kid.name):
            skip(where, "a name no directory may hold")
            continue
        if kid.name in kids:
            skip(where, "a duplicate name: only the last one listed is restored")
        kids[kid.name] = kid
    return list(kids.items())


def _copy_file(node: image.Node, out: ds.Dest, rel: str, owner: bool) -> None:
    fd = out.create_file(rel)
    try:
        pos = 0
        while pos < node.size:
            data = node.read(pos, min(COPY_CHUNK_BYTES, node.size - pos))
            if not data:
                break
            os.pwrite(fd, data, pos)
            pos += len(data)
        ds.set_fd_meta(fd, _meta(node), owner=owner)
    finally:
        os.close(fd)


def _meta(node: image.Node) -> ds.DestMeta:
    return ds.DestMeta(node.mode, node.uid, node.gid, node.atime_ns, node.mtime_ns)
