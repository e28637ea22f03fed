"""Partition tables: MBR with logical partitions, GPT, damaged and hostile tables."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from image_testlib import BytesSource, Disk, FsImage, Tree, read_all

from image import (
    CorruptFilesystem,
    FileSource,
    ImageError,
    PartitionTableError,
    open_disk,
    open_filesystem,
    used_ranges,
)

EFI_GUID = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
LINUX_GUID = "0fc63daf-8483-4772-8e79-3d69d8477de4"
MS_BASIC_GUID = "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7"


def test_mbr_with_logical_partitions(mbr_disk: Disk, tree: Tree) -> None:
    with FileSource(mbr_disk.path) as src:
        layout = open_disk(src)
        assert layout.scheme == "mbr"
        assert [p.name for p in layout.partitions] == ["p1", "p5", "p6"]
        for part in layout.partitions:
            assert (part.start_bytes, part.size_bytes) == mbr_disk.parts[part.name]
            assert part.source.size_bytes() == part.size_bytes
            assert part.error is None
        p1, p5, p6 = layout.partitions
        assert (p1.type_id, p5.type_id, p6.type_id) == ("0x06", "0x83", "0x83")
        assert (p1.fs_type, p5.fs_type, p6.fs_type) == ("fat", "ext", "ext")
        # The EBRs of both logical partitions are table areas.
        ebrs = [off for off, _n in layout.table_ranges if off > 0]
        assert len(ebrs) == 2
        want = (tree.root / "sub/big.bin").read_bytes()
        for part in (p1, p5):
            fs = open_filesystem(part.source)
            assert read_all(fs.lookup("/sub/big.bin")) == want
        # A corrupt superblock fails that partition only.
        with pytest.raises(CorruptFilesystem):
            open_filesystem(p6.source)


def test_gpt(gpt_disk: Disk, tree: Tree) -> None:
    with FileSource(gpt_disk.path) as src:
        layout = open_disk(src)
        assert layout.scheme == "gpt"
        assert not layout.warnings
        assert [p.name for p in layout.partitions] == ["p1", "p2", "p3", "p4"]
        for part in layout.partitions:
            assert (part.start_bytes, part.size_bytes) == gpt_disk.parts[part.name]
        assert [p.type_id for p in layout.partitions] == [
            EFI_GUID,
            LINUX_GUID,
            LINUX_GUID,
            MS_BASIC_GUID,
        ]
        assert layout.partitions[0].label == "EFI"
        assert [p.fs_type for p in layout.partitions] == ["fat", "ext", "xfs", "ntfs"]
        hello = (tree.root / "hello.txt").read_bytes()
        for part in layout.partitions:
            assert read_all(open_filesystem(part.source).lookup("/hello.txt")) == hello
        # Both GPT headers and arrays are table areas: the start and the last 33 sectors.
        assert (0, 512) in layout.table_ranges
        assert any(off + n == src.size_bytes() for off, n in layout.table_ranges)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


def test_gpt_falls_back_to_backup_header(gpt_disk: Disk, tmp_path: Path) -> None:
    disk = _copy(gpt_disk.path, tmp_path / "d.img")
    with disk.open("r+b") as f:
        f.seek(512)
        f.write(b"\0" * 512)  # primary header gone
    with FileSource(disk) as src:
        layout = open_disk(src)
        assert layout.scheme == "gpt"
        assert [p.name for p in layout.partitions] == ["p1", "p2", "p3", "p4"]
        assert any("backup" in w for w in layout.warnings)
    with disk.open("r+b") as f:
        f.seek(-512, 2)
        f.write(b"\0" * 512)  # and the backup
    with FileSource(disk) as src:
        with pytest.raises(PartitionTableError):
            open_disk(src)
        umap = used_ranges(src)
        assert umap.ranges == [(0, src.size_bytes())]


def test_garbage_mbr_is_a_partition_table_error(mbr_disk: Disk, tmp_path: Path) -> None:
    disk = _copy(mbr_disk.path, tmp_path / "d.img")
    with disk.open("r+b") as f:
        f.seek(446)
        f.write(b"\x42" * 64)  # four entries with impossible boot flags, signature kept
    with FileSource(disk) as src:
        with pytest.raises(PartitionTableError):
            open_disk(src)
        assert used_ranges(src).ranges == [(0, src.size_bytes())]


def test_broken_ebr_chain_keeps_primaries(mbr_disk: Disk, tmp_path: Path) -> None:
    disk = _copy(mbr_disk.path, tmp_path / "d.img")
    with disk.open("r+b") as f:
        f.seek(mbr_disk.parts["p5"][0] - 2048 * 512 + 510)  # first EBR's signature
        f.write(b"\0\0")
    with FileSource(disk) as src:
        layout = open_disk(src)
        assert [p.name for p in layout.partitions] == ["p1"]
        assert layout.warnings
        assert open_filesystem(layout.partitions[0].source).lookup("/hello.txt").size > 0


def test_truncated_disk(mbr_disk: Disk, tmp_path: Path, fs_images: dict[str, FsImage]) -> None:
    p5_start, p5_size = mbr_disk.parts["p5"]
    disk = tmp_path / "short.img"
    with mbr_disk.path.open("rb") as f:
        disk.write_bytes(f.read(p5_start + p5_size // 8))
    with FileSource(disk) as src:
        layout = open_disk(src)
        names = {p.name: p for p in layout.partitions}
        assert names["p1"].error is None
        assert "beyond the end" in (names["p5"].error or "")
        # p6's EBR lies past the cut: the chain ends there, with a warning.
        assert "p6" not in names
        assert any("EBR" in w for w in layout.warnings)
        assert open_filesystem(names["p1"].source).lookup("/hello.txt").size > 0
        # The cut partition either fails to open or fails on the missing blocks: ImageError only.
        try:
            fs = open_filesystem(names["p5"].source)
            read_all(fs.lookup("/sub/big.bin"))
        except ImageError:
            pass
        umap = used_ranges(src)
        usage = {u.name: u for u in umap.partitions}
        assert usage["p1"].bitmap_used
        assert not usage["p5"].bitmap_used
        last_off, last_len = umap.ranges[-1]
        assert last_off <= p5_start and last_off + last_len == src.size_bytes()


def test_whole_disk_filesystem_is_scheme_none(fs_images: dict[str, FsImage]) -> None:
    with FileSource(fs_images["ntfs"].path) as src:
        layout = open_disk(src)
    # NTFS and FAT boot sectors end in 55 AA like an MBR: they must not be read as one.
    assert (layout.scheme, layout.partitions, layout.fs_type) == ("none", [], "ntfs")
    assert open_disk(BytesSource(b"\0" * 100_000)).scheme == "none"
    assert open_disk(BytesSource(b"")).partitions == []


def _mbr(entries: list[tuple[int, int, int, int]], size: int) -> bytes:
    sector = bytearray(512)
    for i, (flag, ptype, lba, count) in enumerate(entries):
        struct.pack_into("<B3sB3sII", sector, 446 + 16 * i, flag, b"", ptype, b"", lba, count)
    sector[510:512] = b"\x55\xaa"
    return bytes(sector) + b"\0" * (size - 512)


def _ebr(disk: bytearray, lba: int, logical_rel: int, next_rel: int) -> None:
    base = lba * 512
    struct.pack_into("<B3sB3sII", disk, base + 446, 0, b"", 0x83, b"", logical_rel, 4)
    struct.pack_into("<B3sB3sII", disk, base + 462, 0, b"", 0x05, b"", next_rel, 10)
    disk[base + 510 : base + 512] = b"\x55\xaa"


def test_ebr_loop_terminates() -> None:
    # Extended partition at LBA 2..101; EBRs at 2 and 22; the second points back to itself.
    disk = bytearray(_mbr([(0, 0x05, 2, 100)], 200 * 512))
    _ebr(disk, 2, 1, 20)
    _ebr(disk, 22, 1, 20)
    layout = open_disk(BytesSource(bytes(disk)))
    assert [(p.name, p.start_bytes) for p in layout.partitions] == [
        ("p5", 3 * 512),
        ("p6", 23 * 512),
    ]
    assert any("loops" in w for w in layout.warnings)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_open_disk_on_garbage_raises_only_image_errors(data: bytes) -> None:
    src = BytesSource(data)
    try:
        open_disk(src)
    except ImageError:
        pass
    used_ranges(src)  # never raises for content


_SEED_MBR = _mbr([(0x80, 0x83, 1, 6), (0, 0x05, 7, 20), (0, 0xEE, 1, 30)], 32 * 512)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 32 * 512 - 1), st.integers(0, 255)), max_size=24))
def test_open_disk_on_mutated_tables(mutations: list[tuple[int, int]]) -> None:
    """Mutations of a table that is almost valid reach deeper code than pure noise."""
    data = bytearray(_SEED_MBR)
    data[7 * 512 + 510 : 7 * 512 + 512] = b"\x55\xaa"
    data[512:520] = b"EFI PART"
    for offset, value in mutations:
        data[offset] = value
    src = BytesSource(bytes(data))
    try:
        layout = open_disk(src)
    except ImageError:
        return
    for part in layout.partitions:
        assert part.source.size_bytes() <= len(data)
    umap = used_ranges(src)
    assert all(off >= 0 and off + n <= len(data) for off, n in umap.ranges)


def test_stale_superblock_in_boot_gap_does_not_hide_the_table(
    mbr_disk: Disk, tmp_path: Path
) -> None:
    """A disk once formatted whole keeps an ext superblock at byte 1024 after partitioning."""
    disk = _copy(mbr_disk.path, tmp_path / "d.img")
    p5_start = mbr_disk.parts["p5"][0]
    with disk.open("r+b") as f:
        f.seek(p5_start + 1024)
        stale = f.read(1024)
        f.seek(1024)
        f.write(stale)
    with FileSource(disk) as src:
        layout = open_disk(src)
        assert layout.scheme == "mbr"
        assert [p.name for p in layout.partitions] == ["p1", "p5", "p6"]
        # The gap (and the stale superblock in it) lies outside every partition: kept.
        assert used_ranges(src).ranges[0][0] == 0
