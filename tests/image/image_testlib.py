"""Shared helpers for the image/ tests: image builders (real Debian tools), tree walking.

Named ``image_testlib`` (not ``helpers``) because test directories are not packages here and
the module lands on ``sys.path`` next to other test directories' modules.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from image import Filesystem, Node

MIB = 1024 * 1024
# Fixed, sub-second mtime so filesystems with ns / 100 ns / 2 s resolution can all be checked.
MTIME_NS = 1_609_556_645_123_456_789  # 2021-01-02 03:04:05.123456789 UTC
# Free space in every image is pre-filled with this, so a block wrongly reported free by
# used_ranges() reads back as zeros in the copy and breaks a checksum or fsck.
FILL = bytes(range(256)) * 4096


class BytesSource:
    """In-memory ByteSource for tests."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def size_bytes(self) -> int:
        return len(self.data)

    def pread(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]


@dataclass(frozen=True)
class TreeFile:
    path: str  # relative, "/"-separated
    sha256: str
    size: int
    mode: int  # permission bits only


@dataclass(frozen=True)
class Tree:
    root: Path
    files: dict[str, TreeFile]
    dirs: list[str]
    symlinks: dict[str, str]


def run(*cmd: str | os.PathLike[str], **env: str) -> str:
    proc = subprocess.run(
        [str(c) for c in cmd],
        capture_output=True,
        text=True,
        env={**os.environ, "TZ": "UTC", **env},
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    return proc.stdout


def prefilled(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        for _ in range(size // len(FILL)):
            f.write(FILL)
        f.write(FILL[: size % len(FILL)])
    return path


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _xfs_proto(tree: Tree) -> str:
    """mkfs.xfs -p protofile: populates an XFS image without mounting it."""

    def walk(directory: Path, depth: int) -> list[str]:
        lines: list[str] = []
        pad = " " * depth
        for entry in sorted(directory.iterdir()):
            st = entry.lstat()
            if entry.is_symlink():
                lines.append(f"{pad}{entry.name} l--777 0 0 {os.readlink(entry)}")
            elif entry.is_dir():
                lines.append(f"{pad}{entry.name} d--755 0 0")
                lines += walk(entry, depth + 1)
                lines.append(f"{pad}$")
            else:
                lines.append(f"{pad}{entry.name} ---{st.st_mode & 0o777:o} 1000 100 {entry}")
        return lines

    return "\n".join(["/dummy", "0 0", "d--755 0 0", *walk(tree.root, 1), "$", ""])


@dataclass(frozen=True)
class FsImage:
    kind: str
    path: Path
    full: bool  # has subdirectories and symlinks


def build_ext(tree: Tree, path: Path, size: int, *extra: str) -> Path:
    prefilled(path, size)
    run("mkfs.ext4", "-q", "-F", "-E", "root_owner=0:0", *extra, "-d", tree.root, path)
    return path


def build_xfs(tree: Tree, path: Path) -> Path:
    proto = path.with_suffix(".proto")
    proto.write_text(_xfs_proto(tree))
    prefilled(path, 300 * MIB)
    run("mkfs.xfs", "-q", "-f", "-p", proto, path)
    return path


def fuse_usable() -> bool:
    return os.path.exists("/dev/fuse") and shutil.which("ntfs-3g") is not None


def build_ntfs(tree: Tree, path: Path, size: int) -> bool:
    """Returns True when populated through an ntfs-3g mount (dirs + symlinks included)."""
    prefilled(path, size)
    run("mkfs.ntfs", "-q", "-F", "-Q", path)
    if fuse_usable():
        mnt = path.with_suffix(".mnt")
        mnt.mkdir()
        try:
            run("ntfs-3g", path, mnt)
        except AssertionError:
            pass
        else:
            try:
                run("cp", "-a", f"{tree.root}/.", mnt)
            finally:
                run("umount", mnt)
            return True
    for rel in tree.files:
        if "/" not in rel:
            run("ntfscp", "-q", path, tree.root / rel, rel)
    return False


def build_fat(tree: Tree, path: Path, size: int, *extra: str) -> Path:
    prefilled(path, size)
    run("mkfs.vfat", *extra, path)
    run("mcopy", "-s", "-m", "-i", path, *sorted(tree.root.iterdir()), "::")
    # Leave the residue of a deleted file in free clusters as well.
    junk = path.with_suffix(".junk")
    junk.write_bytes(bytes(range(1, 256)) * 8192)
    run("mcopy", "-i", path, junk, "::junk.bin")
    run("mdel", "-i", path, "::junk.bin")
    return path


def sfdisk_layout(disk: Path) -> dict[str, tuple[int, int]]:
    info = json.loads(run("sfdisk", "--json", disk))
    out: dict[str, tuple[int, int]] = {}
    for part in info["partitiontable"]["partitions"]:
        number = part["node"].removeprefix(str(disk))
        out[f"p{number}"] = (part["start"] * 512, part["size"] * 512)
    return out


def dd_into(disk: Path, image: Path, offset: int) -> None:
    with disk.open("r+b") as out, image.open("rb") as inp:
        out.seek(offset)
        shutil.copyfileobj(inp, out, 4 * MIB)


@dataclass(frozen=True)
class Disk:
    path: Path
    parts: dict[str, tuple[int, int]]  # name -> (start_bytes, size_bytes)
    contents: dict[str, str]  # name -> fixture key in fs_images, or "corrupt"


CHUNK = 64 * 1024


def read_all(node: Node) -> bytes:
    return b"".join(node.read(off, CHUNK) for off in range(0, node.size, CHUNK))


@dataclass(frozen=True)
class Seen:
    kind: str
    size: int
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    sha256: str | None  # files
    target: str | None  # symlinks


def walk(fs: Filesystem) -> dict[str, Seen]:
    """Every path below the root -> what the reader says about it (file contents hashed)."""
    out: dict[str, Seen] = {}

    def visit(node: Node, prefix: str) -> None:
        names = [c.name for c in node.listdir()]
        assert "." not in names and ".." not in names
        for child in node.listdir():
            path = f"{prefix}{child.name}"
            out[path] = Seen(
                kind=child.kind,
                size=child.size,
                mode=child.mode,
                uid=child.uid,
                gid=child.gid,
                mtime_ns=child.mtime_ns,
                sha256=hashlib.sha256(read_all(child)).hexdigest()
                if child.kind == "file"
                else None,
                target=child.readlink() if child.kind == "symlink" else None,
            )
            if child.kind == "dir":
                visit(child, path + "/")

    visit(fs.root, "")
    return out


class FileSourceLike(Protocol):
    def size_bytes(self) -> int: ...

    def pread(self, offset: int, length: int) -> bytes: ...


class PatchedSource:
    """A ByteSource over another one with a few bytes replaced (cheap mutations of big images)."""

    def __init__(self, base: BytesSource | FileSourceLike, patches: dict[int, int]) -> None:
        self.base = base
        self.patches = patches

    def size_bytes(self) -> int:
        return self.base.size_bytes()

    def pread(self, offset: int, length: int) -> bytes:
        data = self.base.pread(offset, length)
        hits = [(o, v) for o, v in self.patches.items() if offset <= o < offset + len(data)]
        if not hits:
            return data
        buf = bytearray(data)
        for o, v in hits:
            buf[o - offset] = v
        return bytes(buf)
