"""Used-block maps must not trust an allocation map that may be stale (issue 8, item 8).

A live or uncleanly unmounted XFS keeps its newest metadata in the log: the on-disk free-space
btrees still call the blocks of recently written files free, and a used-only backup would
restore them as zeros (shown below: on today's main, a 20 MiB file comes back all zeros after
log replay). Such an XFS, and a FAT volume marked dirty, must be kept whole. The XFS images
are made dirty for real: a loop mount, writes, and a copy of the image while it is mounted
(a live backup) or `xfs_io -x -c shutdown` (a crash). This host cannot mount FAT (no vfat
module), so the FAT dirty marks are written with the exact bytes the Linux driver
(`fat_set_state`) and Windows write, and `fsck.fat -n` confirms the volume reads as dirty.

A block device mounted read-write is refused for `--used-only` with a message naming the
ways to get a stable source (an LVM snapshot, fsfreeze).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from image_testlib import MIB, run
from testlib import run_cli

from image import FileSource, used_ranges, writable_mounts


def _need_loop_mounts(fs: str) -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/loop-control"):
        pytest.skip("needs root and loop devices")
    with open("/proc/filesystems") as f:
        if fs not in f.read().split():
            pytest.skip(f"this kernel cannot mount {fs}")


@contextlib.contextmanager
def loop_device(image: Path) -> Iterator[str]:
    dev = run("losetup", "-f", "--show", image).strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False, capture_output=True)


@contextlib.contextmanager
def mounted(dev: str, mnt: Path, *opts: str) -> Iterator[Path]:
    mnt.mkdir(exist_ok=True)
    run("mount", *opts, dev, mnt)
    try:
        yield mnt
    finally:
        # Not os.path.ismount: a shut-down XFS fails the stat it needs.
        with open("/proc/self/mountinfo") as f:
            if any(line.split()[4] == str(mnt).replace(" ", "\\040") for line in f):
                run("umount", mnt)


def _restore_used(src: Path, dst: Path) -> tuple[list[tuple[int, int]], str | None]:
    """What a used-only backup + restore of `src` gives: zeros outside the used ranges."""
    with FileSource(src) as s:
        umap = used_ranges(s)
        with dst.open("wb") as out:
            out.truncate(s.size_bytes())
            for off, length in umap.ranges:
                for pos in range(off, off + length, 8 * MIB):
                    out.seek(pos)
                    out.write(s.pread(pos, min(8 * MIB, off + length - pos)))
    return umap.ranges, umap.partitions[0].error


def _sha_in_image(image: Path, mnt: Path, rel: str) -> str:
    """Mount `image` (the kernel replays a dirty log) and hash one file."""
    with loop_device(image) as dev, mounted(dev, mnt):
        return hashlib.sha256((mnt / rel).read_bytes()).hexdigest()


def test_dirty_xfs_log_keeps_the_partition_whole(tmp_path: Path) -> None:
    _need_loop_mounts("xfs")
    img = tmp_path / "xfs.img"
    with img.open("wb") as f:
        f.truncate(300 * MIB)
    run("mkfs.xfs", "-q", "-f", img)
    data = random.Random(8).randbytes(20 * MIB)
    want = hashlib.sha256(data).hexdigest()
    live = tmp_path / "live.img"
    with loop_device(img) as dev, mounted(dev, tmp_path / "mnt") as mnt:
        (mnt / "new.bin").write_bytes(data)
        (mnt / "dir").mkdir()
        for i in range(50):
            (mnt / "dir" / f"f{i}").write_text(f"{i}\n")
        os.sync()
        shutil.copyfile(img, live)  # a "backup" of a live filesystem
        run("xfs_io", "-x", "-c", "shutdown", mnt)  # and then it crashes
    crashed = img
    assert "DIRTY" in run("xfs_logprint", "-t", live)

    for dirty in (live, crashed):
        ranges, error = _restore_used(dirty, tmp_path / "copy.img")
        assert ranges == [(0, 300 * MIB)], dirty
        assert error is not None and "XFS log is dirty" in error, error
        # Nothing lost: after log replay the new file is all there.
        assert _sha_in_image(tmp_path / "copy.img", tmp_path / "m2", "new.bin") == want

    # Mounting replays the log; after a clean unmount the free-space btrees are trusted again.
    with loop_device(crashed) as dev, mounted(dev, tmp_path / "mnt"):
        pass
    assert "CLEAN" in run("xfs_logprint", "-t", crashed)
    ranges, error = _restore_used(crashed, tmp_path / "copy.img")
    assert error is None
    assert sum(n for _o, n in ranges) < 150 * MIB
    assert _sha_in_image(tmp_path / "copy.img", tmp_path / "m2", "new.bin") == want


def test_fresh_xfs_log_is_clean(tmp_path: Path) -> None:
    img = tmp_path / "fresh.img"
    with img.open("wb") as f:
        f.truncate(300 * MIB)
    run("mkfs.xfs", "-q", "-f", img)
    with FileSource(img) as s:
        umap = used_ranges(s)
    assert umap.partitions[0].bitmap_used, umap.partitions[0].error


def _fat_image(tmp_path: Path, bits: int) -> Path:
    img = tmp_path / f"fat{bits}.img"
    kib = {12: 8000, 16: 60000, 32: 300000}[bits]
    run("mkfs.vfat", "-C", "-F", str(bits), img, str(kib))
    payload = tmp_path / "payload.bin"
    payload.write_bytes(random.Random(bits).randbytes(300_000))
    run("mcopy", "-i", img, payload, "::/DATA.BIN")
    return img


@pytest.mark.parametrize("bits", [12, 16, 32])
def test_fat_with_dirty_state_byte_is_kept_whole(tmp_path: Path, bits: int) -> None:
    img = _fat_image(tmp_path, bits)
    with FileSource(img) as s:
        assert used_ranges(s).partitions[0].bitmap_used
    state_at = 65 if bits == 32 else 37  # BS_Reserved1: Linux's fat_set_state sets bit 0
    with img.open("r+b") as f:
        f.seek(state_at)
        state = f.read(1)[0]
        f.seek(state_at)
        f.write(bytes([state | 0x01]))
    fsck = subprocess.run(["fsck.fat", "-n", str(img)], capture_output=True, text=True)
    assert "Dirty bit is set" in fsck.stdout  # the real tool agrees it was not unmounted
    with FileSource(img) as s:
        umap = used_ranges(s)
    assert umap.ranges == [(0, img.stat().st_size)]
    assert "dirty" in (umap.partitions[0].error or "")


@pytest.mark.parametrize(("bits", "mask"), [(16, 0x8000), (16, 0x4000), (32, 0x08000000)])
def test_fat_entry1_unclean_or_error_bits_keep_it_whole(
    tmp_path: Path, bits: int, mask: int
) -> None:
    img = _fat_image(tmp_path, bits)
    with img.open("r+b") as f:
        reserved = struct.unpack_from("<H", f.read(512), 14)[0]
        width = 4 if bits == 32 else 2
        fmt = "<I" if bits == 32 else "<H"
        f.seek(reserved * 512 + width)  # FAT entry 1 of the first FAT
        entry1 = struct.unpack(fmt, f.read(width))[0]
        assert entry1 & mask  # mkfs wrote it clean
        f.seek(reserved * 512 + width)
        f.write(struct.pack(fmt, entry1 & ~mask))
    with FileSource(img) as s:
        umap = used_ranges(s)
    assert umap.ranges == [(0, img.stat().st_size)]
    assert "FAT entry 1" in (umap.partitions[0].error or "")


def test_used_only_refuses_a_device_mounted_read_write(tmp_path: Path) -> None:
    _need_loop_mounts("ext4")
    img = tmp_path / "ext4.img"
    with img.open("wb") as f:
        f.truncate(32 * MIB)
    run("mkfs.ext4", "-q", "-F", img)
    repo = tmp_path / "repo"
    run_cli("--repo", str(repo), "init")
    assert writable_mounts(img) == []  # a regular file: not a device
    with loop_device(img) as dev:
        assert writable_mounts(dev) == []
        mnt = tmp_path / "mnt point"  # a space: mountinfo escapes it as \040
        with mounted(dev, mnt):
            assert writable_mounts(dev) == [str(mnt)]
            assert writable_mounts(img) == [str(mnt)]  # the image file behind the loop device
            proc = run_cli(
                "--repo",
                str(repo),
                "backup",
                "image",
                str(img),
                "--used-only",
                "--source",
                "live",
                check=False,
            )
            assert proc.returncode == 2 and "mounted read-write" in proc.stderr
            proc = run_cli(
                "--repo",
                str(repo),
                "backup",
                "image",
                dev,
                "--used-only",
                "--source",
                "live",
                check=False,
            )
            assert proc.returncode == 2, proc.stdout + proc.stderr
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1, proc.stderr
            assert f"mounted read-write at {mnt}" in lines[0]
            assert "lvcreate --snapshot" in lines[0] and "fsfreeze" in lines[0]
        with mounted(dev, mnt, "-o", "ro"):  # a read-only mount cannot change under us
            assert writable_mounts(dev) == []
            run_cli("--repo", str(repo), "backup", "image", dev, "--used-only", "--source", "ro")
    out = tmp_path / "out.img"
    run_cli("--repo", str(repo), "restore", "ro@latest", str(out))
    run("e2fsck", "-fn", out)
