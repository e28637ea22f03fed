"""Hostile images: mutated filesystems may fail, but only with ImageError, and never hang."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from image_testlib import MIB, BytesSource, FsImage, PatchedSource, run

from image import ByteSource, FileSource, ImageError, Node, open_filesystem, used_ranges


@pytest.fixture(scope="session")
def small_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("fuzz")
    tree = d / "tree"
    (tree / "dir" / "deeper").mkdir(parents=True)
    (tree / "a.txt").write_bytes(b"a" * 5000)
    (tree / "dir" / "b.bin").write_bytes(bytes(range(256)) * 300)
    (tree / "dir" / "deeper" / "c").write_bytes(b"c\n")
    (tree / "ln").symlink_to("dir/b.bin")
    images: dict[str, bytes] = {}
    ext = d / "ext.img"
    ext.write_bytes(b"\0" * MIB)
    run("mkfs.ext4", "-q", "-F", "-b", "1024", "-N", "32", "-d", tree, ext)
    images["ext"] = ext.read_bytes()
    ext2 = d / "ext2.img"
    ext2.write_bytes(b"\0" * MIB)
    run("mkfs.ext2", "-q", "-F", "-b", "1024", "-N", "32", "-d", tree, ext2)
    images["ext2"] = ext2.read_bytes()
    fat = d / "fat.img"
    fat.write_bytes(b"\0" * MIB)
    run("mkfs.vfat", "-F", "12", fat)
    run("mcopy", "-s", "-i", fat, tree / "a.txt", tree / "dir", "::")
    images["fat"] = fat.read_bytes()
    ntfs = d / "ntfs.img"
    ntfs.write_bytes(b"\0" * 2 * MIB)
    run("mkfs.ntfs", "-q", "-F", "-Q", ntfs)
    run("ntfscp", "-q", ntfs, tree / "a.txt", "a.txt")
    images["ntfs"] = ntfs.read_bytes()
    return images


def exercise(node: Node, budget: list[int]) -> None:
    """Touch everything reachable, with a bound on work (a cyclic tree must not hang the test)."""
    for child in node.listdir():
        budget[0] -= 1
        if budget[0] <= 0:
            return
        if child.kind == "dir":
            exercise(child, budget)
        elif child.kind == "symlink":
            child.readlink()
        else:
            child.read(0, 1 << 16)
            child.read(max(0, child.size - 100), 200)


def _metadata_sectors(src: ByteSource, limit: int = 4 * MIB) -> list[int]:
    """Offsets of the non-zero sectors near the start: where the metadata lives."""
    return [off for off in range(0, min(limit, src.size_bytes()), 512) if any(src.pread(off, 512))]


@pytest.fixture(scope="session")
def fuzz_targets(
    small_images: dict[str, bytes], fs_images: dict[str, FsImage]
) -> dict[str, tuple[ByteSource, list[int]]]:
    targets: dict[str, tuple[ByteSource, list[int]]] = {}
    for kind, data in small_images.items():
        src = BytesSource(data)
        targets[kind] = (src, _metadata_sectors(src))
    # XFS needs 300 MiB: mutate the session image through an overlay instead of copying it.
    xfs = FileSource(fs_images["xfs"].path)
    targets["xfs"] = (xfs, _metadata_sectors(xfs))
    return targets


# (which metadata sector, byte within it, new value)
MUTATIONS = st.lists(
    st.tuples(st.integers(0, 10**6), st.integers(0, 511), st.integers(0, 255)),
    min_size=1,
    max_size=12,
)


@pytest.mark.parametrize("kind", ["ext", "ext2", "fat", "ntfs", "xfs"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations=MUTATIONS)
def test_mutated_filesystem_raises_only_image_errors(
    fuzz_targets: dict[str, tuple[ByteSource, list[int]]],
    kind: str,
    mutations: list[tuple[int, int, int]],
) -> None:
    base, sectors = fuzz_targets[kind]
    patches = {sectors[i % len(sectors)] + j: v for i, j, v in mutations}
    src = PatchedSource(base, patches)
    try:
        fs = open_filesystem(src)
        exercise(fs.root, [500])
    except ImageError:
        pass
    umap = used_ranges(src)  # never raises for content
    assert all(off >= 0 and off + n <= src.size_bytes() for off, n in umap.ranges)


def test_truncated_filesystems(small_images: dict[str, bytes]) -> None:
    for data in small_images.values():
        for cut in (0, 100, 1024, 2048, 8192, 65536, len(data) // 2):
            src = BytesSource(data[:cut])
            try:
                exercise(open_filesystem(src).root, [500])
            except ImageError:
                pass
            used_ranges(src)
