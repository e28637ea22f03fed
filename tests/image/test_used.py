"""Used-block maps: back up only the used ranges, restore onto zeros, nothing may be lost.

Every fixture image was pre-filled with a non-zero pattern before mkfs, so free blocks hold
junk: a block wrongly reported free reads back as zeros in the copy and changes a checksum or
makes fsck complain.
"""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from image_testlib import MIB, Disk, FsImage, prefilled, run, walk

from image import FileSource, open_disk, open_filesystem, used_ranges
from image._used import bitmap_runs, merge_ranges, subtract_ranges

FSCK = {
    "ext": ["e2fsck", "-fn"],
    "xfs": ["xfs_repair", "-n", "-f"],
    "ntfs": ["ntfsfix", "-n"],
    "fat": ["fsck.vfat", "-n"],
}


def restore_used(src: FileSource, ranges: list[tuple[int, int]], dst: Path) -> Path:
    """What a used-blocks-only backup + restore produces: zeros except the stored ranges."""
    with dst.open("wb") as out:
        out.truncate(src.size_bytes())
        for off, length in ranges:
            for pos in range(off, off + length, 8 * MIB):
                out.seek(pos)
                out.write(src.pread(pos, min(8 * MIB, off + length - pos)))
    return dst


def fsck_clean(kind: str, path: Path) -> None:
    proc = subprocess.run([*FSCK[kind], str(path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{FSCK[kind]} on {path}: {proc.stdout}{proc.stderr}"


@pytest.mark.parametrize(
    "key", ["ext4", "ext4-small-groups", "ext2", "xfs", "ntfs", "fat12", "fat16", "fat32"]
)
def test_round_trip(key: str, fs_images: dict[str, FsImage], tmp_path: Path) -> None:
    image = fs_images[key]
    with FileSource(image.path) as src:
        umap = used_ranges(src)
        assert umap.scheme == "none"
        (usage,) = umap.partitions
        assert usage.bitmap_used and usage.error is None and usage.fs_type == image.kind
        assert umap.ranges == merge_ranges(umap.ranges)
        assert 0 < umap.used_bytes < umap.size_bytes
        if image.kind != "xfs":  # XFS: the internal log alone is 64 MiB of 300 MiB
            assert umap.used_bytes < umap.size_bytes // 2
        original = walk(open_filesystem(src))
        copy_path = restore_used(src, umap.ranges, tmp_path / "copy.img")
    with FileSource(copy_path) as copy:
        assert walk(open_filesystem(copy)) == original
    fsck_clean(image.kind, copy_path)


def test_gpt_disk_round_trip(gpt_disk: Disk, tmp_path: Path) -> None:
    with FileSource(gpt_disk.path) as src:
        umap = used_ranges(src)
        assert umap.scheme == "gpt"
        assert [u.name for u in umap.partitions] == ["p1", "p2", "p3", "p4"]
        assert all(u.bitmap_used for u in umap.partitions), umap.partitions
        originals = [walk(open_filesystem(p.source)) for p in open_disk(src).partitions]
        copy_path = restore_used(src, umap.ranges, tmp_path / "copy.img")
        first_start = gpt_disk.parts["p1"][0]
        gap = src.pread(0, first_start)  # MBR, GPT, and the boot loader gap (pattern-filled)
        tail = src.pread(src.size_bytes() - 33 * 512, 33 * 512)
    with FileSource(copy_path) as copy:
        assert copy.pread(0, first_start) == gap
        assert copy.pread(copy.size_bytes() - 33 * 512, 33 * 512) == tail
        layout = open_disk(copy)
        assert not layout.warnings  # the backup GPT survived too
        assert [walk(open_filesystem(p.source)) for p in layout.partitions] == originals
        for part, kind in zip(layout.partitions, ["fat", "ext", "xfs", "ntfs"], strict=True):
            part_path = tmp_path / f"{part.name}.img"
            part_path.write_bytes(b"")
            restore_used(part.source, [(0, part.source.size_bytes())], part_path)
            fsck_clean(kind, part_path)


def test_mbr_disk_keeps_unknown_and_corrupt_whole(mbr_disk: Disk) -> None:
    with FileSource(mbr_disk.path) as src:
        umap = used_ranges(src)
    usage = {u.name: u for u in umap.partitions}
    assert usage["p1"].bitmap_used and usage["p5"].bitmap_used
    assert not usage["p6"].bitmap_used and "kept whole" in (usage["p6"].error or "")
    p6_start, p6_size = mbr_disk.parts["p6"]
    assert any(off <= p6_start and p6_start + p6_size <= off + n for off, n in umap.ranges)
    # Each EBR sits before its logical partition and must be kept.
    for name in ("p5", "p6"):
        ebr = mbr_disk.parts[name][0] - 2048 * 512
        assert any(off <= ebr < off + n for off, n in umap.ranges), name


def test_dirty_ext4_is_kept_whole(fs_images: dict[str, FsImage], tmp_path: Path) -> None:
    """A journal that needs recovery may hold newer bitmaps than the disk: keep everything."""
    path = tmp_path / "dirty.img"
    path.write_bytes(fs_images["ext4"].path.read_bytes())
    run("debugfs", "-w", "-R", "feature needs_recovery", path)
    with FileSource(path) as src:
        umap = used_ranges(src)
    assert umap.ranges == [(0, path.stat().st_size)]
    assert "recovery" in (umap.partitions[0].error or "")


def naive_runs(bitmap: bytes, nbits: int) -> list[tuple[int, int]]:
    bits = [i for i in range(nbits) if bitmap[i // 8] >> (i % 8) & 1]
    return merge_ranges((b, 1) for b in bits)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.integers(0, 600))
def test_bitmap_runs_matches_naive(bitmap: bytes, nbits: int) -> None:
    nbits = min(nbits, len(bitmap) * 8)
    assert bitmap_runs(bitmap, nbits) == naive_runs(bitmap, nbits)


def test_bitmap_runs_long_uniform_stretches() -> None:
    bitmap = b"\xff" * 1000 + b"\x00" * 1000 + b"\x0f" + b"\xff" * 10
    assert bitmap_runs(bitmap, len(bitmap) * 8) == [(0, 8000), (16000, 4), (16008, 80)]


def test_measure_30_percent_full(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Report (not assert) how much of a 256 MiB ext4 / NTFS image ~30 % full must be stored."""
    rng = random.Random(7)
    tree = tmp_path / "data"
    tree.mkdir()
    for i in range(20):
        (tree / f"f{i:02}.bin").write_bytes(rng.randbytes(int(3.84 * MIB)))
    data_bytes = sum(p.stat().st_size for p in tree.iterdir())
    ext = tmp_path / "ext4.img"
    prefilled(ext, 256 * MIB)
    run("mkfs.ext4", "-q", "-F", "-d", tree, ext)
    ntfs = tmp_path / "ntfs.img"
    prefilled(ntfs, 256 * MIB)
    run("mkfs.ntfs", "-q", "-F", "-Q", ntfs)
    for p in sorted(tree.iterdir()):
        run("ntfscp", "-q", ntfs, p, p.name)
    lines = []
    for kind, path in (("ext4", ext), ("ntfs", ntfs)):
        with FileSource(path) as src:
            umap = used_ranges(src)
        assert data_bytes <= umap.used_bytes < umap.size_bytes // 2
        lines.append(
            f"{kind}: image {umap.size_bytes / MIB:.0f} MiB, file data {data_bytes / MIB:.1f} MiB, "
            f"used ranges {umap.used_bytes / MIB:.1f} MiB "
            f"({100 * umap.used_bytes / umap.size_bytes:.1f} %), {len(umap.ranges)} ranges"
        )
    with capsys.disabled():
        print("\n" + "\n".join(lines))


def test_bad_descriptor_checksum_keeps_ext4_whole(
    fs_images: dict[str, FsImage], tmp_path: Path
) -> None:
    path = tmp_path / "baddesc.img"
    path.write_bytes(fs_images["ext4"].path.read_bytes())
    with FileSource(path) as src:
        block_size = 1024 << int.from_bytes(src.pread(1024 + 24, 4), "little")
        first_data = int.from_bytes(src.pread(1024 + 20, 4), "little")
    with path.open("r+b") as f:
        f.seek((first_data + 1) * block_size + 12)  # group 0: bg_free_blocks_count_lo
        f.write(b"\x12\x34")
    with FileSource(path) as src:
        umap = used_ranges(src)
    assert umap.ranges == [(0, path.stat().st_size)]
    assert "checksum" in (umap.partitions[0].error or "")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 200), st.integers(1, 20)), max_size=8),
    st.lists(st.tuples(st.integers(0, 200), st.integers(1, 20)), max_size=8),
)
def test_subtract_ranges_matches_sets(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> None:
    ranges, holes = merge_ranges(a), merge_ranges(b)
    got = subtract_ranges(ranges, holes)
    assert got == merge_ranges(got)

    def cover(rs: list[tuple[int, int]]) -> set[int]:
        return {x for off, n in rs for x in range(off, off + n)}

    assert cover(got) == cover(ranges) - cover(holes)
