"""Filesystem reading: listings, byte-exact contents, symlinks, modes, times, threads, errors."""

from __future__ import annotations

import random
import stat
import threading
from collections.abc import Iterator

import pytest
from image_testlib import MTIME_NS, FsImage, Tree, read_all, walk

from image import CorruptFilesystem, FileSource, NotFound, open_disk, open_filesystem

ALL = ["ext4", "ext4-small-groups", "ext2", "xfs", "ntfs", "fat12", "fat16", "fat32"]


@pytest.fixture
def source(request: pytest.FixtureRequest, fs_images: dict[str, FsImage]) -> Iterator[FileSource]:
    with FileSource(fs_images[request.param].path) as src:
        yield src


def expected_files(tree: Tree, image: FsImage) -> dict[str, str]:
    """Path -> sha256 of what each filesystem should hold for the shared tree."""
    files = {rel: f.sha256 for rel, f in tree.files.items()}
    if image.kind == "fat":
        # mcopy follows symlinks: they arrive as regular files holding the target's bytes.
        files["link"] = tree.files["hello.txt"].sha256
        files["sub/up"] = tree.files["hello.txt"].sha256
    elif image.kind == "ntfs" and not image.full:
        files = {rel: h for rel, h in files.items() if "/" not in rel}
    return files


@pytest.mark.parametrize("source", ALL, indirect=True)
def test_tree_is_byte_exact(
    source: FileSource, request: pytest.FixtureRequest, fs_images: dict[str, FsImage], tree: Tree
) -> None:
    image = fs_images[request.node.callspec.params["source"]]
    assert open_disk(source).scheme == "none"
    assert open_disk(source).fs_type == image.kind
    fs = open_filesystem(source)
    assert fs.fs_type == image.kind
    seen = walk(fs)
    for name in ("lost+found",):
        seen.pop(name, None)
    want = expected_files(tree, image)
    got = {path: s.sha256 for path, s in seen.items() if s.kind == "file"}
    assert got == want
    for rel, tf in tree.files.items():
        if rel in seen:
            assert seen[rel].size == tf.size
    if image.full:
        assert {p for p, s in seen.items() if s.kind == "dir"} == set(tree.dirs)
        assert {p: s.target for p, s in seen.items() if s.kind == "symlink"} == tree.symlinks


@pytest.mark.parametrize("source", ["ext4", "ext2", "xfs"], indirect=True)
def test_unix_metadata(source: FileSource, tree: Tree, request: pytest.FixtureRequest) -> None:
    fs = open_filesystem(source)
    for rel, tf in tree.files.items():
        node = fs.lookup("/" + rel)
        assert stat.S_ISREG(node.mode)
        assert stat.S_IMODE(node.mode) == tf.mode, rel
        assert node.nlink == 1
    link = fs.lookup("/link")
    assert stat.S_ISLNK(link.mode) and link.size == len("hello.txt")
    assert stat.S_ISDIR(fs.lookup("/sub").mode)
    hello = fs.lookup("/hello.txt")
    if request.node.callspec.params["source"] == "xfs":
        # The mkfs.xfs proto file carries owner and mode but not times.
        assert (hello.uid, hello.gid) == (1000, 100)
    else:
        # mkfs.ext4 -d copies whole seconds.
        assert hello.mtime_ns == MTIME_NS // 10**9 * 10**9
        assert (hello.uid, hello.gid) == (0, 0)
    inodes = [fs.lookup("/" + rel).inode for rel in tree.files]
    assert len(set(inodes)) == len(inodes)


@pytest.mark.parametrize("source", ["ntfs"], indirect=True)
def test_ntfs_metadata(source: FileSource, fs_images: dict[str, FsImage]) -> None:
    fs = open_filesystem(source)
    hello = fs.lookup("/hello.txt")
    assert hello.mtime_ns == MTIME_NS // 100 * 100  # FILETIME: 100 ns ticks
    assert hello.kind == "file" and stat.S_ISREG(hello.mode)
    # Case-insensitive lookup, reported with the stored name.
    assert fs.lookup("/HELLO.TXT").name == "hello.txt"
    if fs_images["ntfs"].full:
        link = fs.lookup("/sub/up")
        assert link.kind == "symlink" and link.readlink() == "../hello.txt"
    names = {n.name for n in fs.root.listdir()}
    assert not {n for n in names if n.startswith("$")}, "NTFS metadata files must be hidden"


@pytest.mark.parametrize("source", ["fat12", "fat16", "fat32"], indirect=True)
def test_fat_metadata(source: FileSource) -> None:
    fs = open_filesystem(source)
    hello = fs.lookup("/hello.txt")
    assert hello.name == "hello.txt"  # lower-case 8.3 name via the NT case flags
    # DOS time: 2-second resolution, local time (the fixture runs mtools with TZ=UTC).
    assert abs(hello.mtime_ns - MTIME_NS) < 2 * 10**9
    assert fs.lookup("/HELLO.TXT").inode == hello.inode
    assert fs.lookup("/unicode-\u00fc\u00f1\u00ee.txt").size == len("\u00fc\u00f1\u00ee\n".encode())
    assert stat.S_ISDIR(fs.lookup("/sub/deep").mode)


@pytest.mark.parametrize("source", ["ext4", "xfs", "ntfs", "fat32"], indirect=True)
def test_lookup_and_read_edges(source: FileSource) -> None:
    fs = open_filesystem(source)
    with pytest.raises(NotFound):
        fs.lookup("/does/not/exist")
    with pytest.raises(NotFound):
        fs.lookup("/hello.txt/below-a-file")
    assert fs.lookup("/").inode == fs.root.inode
    assert fs.lookup("/sub/../hello.txt").inode == fs.lookup("hello.txt").inode
    hello = fs.lookup("/hello.txt")
    assert hello.read(0, 5) == b"hello"
    assert hello.read(7, 1000) == b"world\n"
    assert hello.read(hello.size, 10) == b""
    assert hello.read(10**12, 10) == b""
    with pytest.raises(CorruptFilesystem):
        hello.listdir()
    with pytest.raises(CorruptFilesystem):
        hello.readlink()


@pytest.mark.parametrize("source", ["ext4", "xfs", "ntfs", "fat16"], indirect=True)
def test_concurrent_reads(source: FileSource, tree: Tree, fs_images: dict[str, FsImage]) -> None:
    """A FUSE server reads from many threads at once: results must stay exact."""
    fs = open_filesystem(source)
    path = "sub/big.bin"
    if fs.fs_type == "ntfs" and not fs_images["ntfs"].full:
        path = "hello.txt"
    expected = (tree.root / path).read_bytes()
    node = fs.lookup("/" + path)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(60):
                off = rng.randrange(0, len(expected))
                length = rng.randrange(1, 200_000)
                other = fs.lookup("/hello.txt") if rng.random() < 0.3 else node
                want = (tree.root / "hello.txt").read_bytes() if other is not node else expected
                assert (
                    other.read(off % max(1, other.size), length)
                    == want[off % max(1, other.size) : off % max(1, other.size) + length]
                )
                if rng.random() < 0.2:
                    fs.root.listdir()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert read_all(node) == expected
