"""Helpers for vfs/ tests: real disk images, real repositories, real FUSE mounts.

Images are built with the real tools (mkfs.ext4 -d, mkfs.vfat + mcopy, sfdisk, dd
conv=notrunc), no loop device needed. A mount runs `appliance mount --foreground` in a
subprocess; the fixture waits for the mount while watching the child, and always unmounts
(`fusermount3 -u -z`) and reaps the child, even when the test failed.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from testlib import sha256_file  # noqa: F401 (re-exported)

from dedupstore import Repository, backup_image

MIB = 1024 * 1024
MTIME_NS = 1_609_556_645_000_000_000  # 2021-01-02 03:04:05 UTC
REPO_ROOT = Path(__file__).resolve().parents[2]


def run(*cmd: str | os.PathLike[str]) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=False,
                          env={**os.environ, "TZ": "UTC"})
    if proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    return proc.stdout


def fuse_available() -> bool:
    return os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


def make_tree(root: Path, seed: int = 1) -> dict[str, bytes]:
    """A small source tree; returns {relative path: content} of its regular files."""
    rnd = random.Random(seed)
    files = {
        "empty.txt": b"",
        "hello.txt": b"hello, world\n",
        "small.bin": rnd.randbytes(5000),
        "dir/medium.bin": rnd.randbytes(300 * 1024),
        "dir/sub/big.bin": rnd.randbytes(3 * MIB + 17),
        "dir/text.txt": b"line\n" * 20000,
    }
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (root / "link-to-hello").symlink_to("hello.txt")
    os.link(root / "hello.txt", root / "dir" / "hardlink.txt")
    files["dir/hardlink.txt"] = files["hello.txt"]
    for p in [*root.rglob("*"), root]:
        if not p.is_symlink():
            os.utime(p, ns=(MTIME_NS, MTIME_NS))
    return files


def mkfs_ext4(path: Path, size: int, src: Path) -> None:
    with path.open("wb") as f:
        f.truncate(size)
    run("mkfs.ext4", "-q", "-F", "-b", "4096", "-d", src, "-E", "root_owner=0:0",
        "-T", "default", path)


def mkfs_fat(path: Path, size: int, files: dict[str, bytes], tmp: Path) -> None:
    run("mkfs.vfat", "-C", path, str(size // 1024))
    for rel, data in files.items():
        local = tmp / f"fat-{rel.replace('/', '_')}"
        local.write_bytes(data)
        run("mcopy", "-i", path, local, f"::/{rel}")


def place(disk: Path, part: Path, offset: int) -> None:
    run("dd", f"if={part}", f"of={disk}", "bs=1M", f"seek={offset}", "oflag=seek_bytes",
        "conv=notrunc,sparse", "status=none")


@dataclass(frozen=True)
class Images:
    disk0: Path  # MBR: p1 ext4 (tree), p2 FAT, p3 ext4 with a smashed superblock area
    disk1: Path  # whole-disk ext4, no partition table
    files: dict[str, bytes]  # content of the ext4 filesystems
    fat_files: dict[str, bytes]
    p1_offset: int


def build_images(tmp: Path) -> Images:
    src = tmp / "src"
    src.mkdir()
    files = make_tree(src)
    p1 = tmp / "p1.ext4"
    mkfs_ext4(p1, 16 * MIB, src)
    fat_files = {"README.TXT": b"fat partition\n", "DATA.BIN": random.Random(3).randbytes(70000)}
    p2 = tmp / "p2.fat"
    mkfs_fat(p2, 4 * MIB, fat_files, tmp)
    p3 = tmp / "p3.ext4"
    mkfs_ext4(p3, 4 * MIB, src)
    with p3.open("r+b") as f:  # keep the magic at 1080, smash the group descriptors
        f.seek(4096)
        f.write(b"\xa5" * 8192)
    disk0 = tmp / "disk0.img"
    with disk0.open("wb") as f:
        f.truncate(26 * MIB)
    layout = "label: dos\nstart=2048, size=32768, type=83\nstart=34816, size=8192, type=c\n" \
             "start=43008, size=8192, type=83\n"
    subprocess.run(["sfdisk", "-q", str(disk0)], input=layout, text=True, check=True,
                   capture_output=True)
    place(disk0, p1, 2048 * 512)
    place(disk0, p2, 34816 * 512)
    place(disk0, p3, 43008 * 512)
    disk1 = tmp / "disk1.img"
    mkfs_ext4(disk1, 8 * MIB, src)
    return Images(disk0, disk1, files, fat_files, 2048 * 512)


def new_repo(path: Path) -> Path:
    Repository.create(path)
    return path


def backup(repo_root: Path, disks: list[Path], source: str = "vm1") -> str:
    with Repository.open(repo_root, writable=True) as repo:
        return backup_image(repo, disks, source=source).id


class Mount:
    def __init__(self, mnt: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.mnt = mnt
        self.proc = proc
        self.log = log

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def appliance_cmd(repo: Path, *args: str) -> list[str]:
    return [sys.executable, "-c", "from appliance.cli import main; main()", "--repo",
            str(repo), *args]


@contextlib.contextmanager
def mounted(repo: Path, mnt: Path, *extra: str, timeout_s: float = 20.0) -> Iterator[Mount]:
    """Run `appliance mount --foreground` in a subprocess; always unmount and reap it."""
    if not fuse_available():
        pytest.skip("/dev/fuse or fusermount3 missing")
    mnt.mkdir(parents=True, exist_ok=True)
    log = mnt.parent / f"{mnt.name}.log"
    with log.open("wb") as logf:
        proc = subprocess.Popen(appliance_cmd(repo, "-v", "mount", "--foreground", str(mnt),
                                              *extra),
                                stdout=logf, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    m = Mount(mnt, proc, log)
    try:
        deadline = time.monotonic() + timeout_s
        while not os.path.ismount(mnt):
            if proc.poll() is not None:
                raise AssertionError(f"mount server exited ({proc.returncode}):\n{m.log_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"mount did not appear:\n{m.log_text()}")
            time.sleep(0.05)
        yield m
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False,
                           capture_output=True)
        try:
            rc = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"mount server did not exit:\n{m.log_text()}") from None
    assert rc == 0, f"mount server exited {rc}:\n{m.log_text()}"
