"""Fixtures for image/ tests: real filesystems built with the real Debian tools.

Images are built once per session from one source tree; nothing needs a loop device. NTFS
directories and symlinks need an ntfs-3g FUSE mount; without /dev/fuse the NTFS image only gets
top-level files (via ntfscp) and the tests that need more skip.
"""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from image_testlib import (
    MIB,
    MTIME_NS,
    Disk,
    FsImage,
    Tree,
    TreeFile,
    build_ext,
    build_fat,
    build_ntfs,
    build_xfs,
    dd_into,
    prefilled,
    run,
    sfdisk_layout,
    sha256,
)


@pytest.fixture(scope="session")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Tree:
    root = tmp_path_factory.mktemp("tree")
    rng = random.Random(1234)
    contents = {
        "hello.txt": b"hello, world\n",
        "empty": b"",
        "sub/big.bin": rng.randbytes(3 * MIB + 12345),
        "sub/deep/nested.txt": b"nested\n" * 1000,
        "sub/frag.bin": rng.randbytes(200_000),
        "unicode-\u00fc\u00f1\u00ee.txt": "\u00fc\u00f1\u00ee\n".encode(),
        # Holes, one inside ext2's double-indirect range (1 KiB blocks: from 268 KiB).
        "sparse.bin": b"head" + bytes(1536 * 1024) + b"tail" * 1024,
    }
    # A directory big enough for multi-block formats: ext htree, XFS leaf/node directories,
    # an NTFS index allocation B+tree, multi-cluster FAT directories.
    contents |= {f"many/file-{i:04}-with-a-long-name.txt": f"{i}\n".encode() for i in range(400)}
    modes = {"hello.txt": 0o640, "sub/big.bin": 0o600}
    files: dict[str, TreeFile] = {}
    for rel, data in contents.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if rel == "sparse.bin":
            with p.open("wb") as f:
                f.write(data[:4])
                f.seek(len(data) - 4096)
                f.write(data[-4096:])
        else:
            p.write_bytes(data)
        mode = modes.get(rel, 0o644)
        p.chmod(mode)
        os.utime(p, ns=(MTIME_NS, MTIME_NS))
        files[rel] = TreeFile(rel, sha256(data), len(data), mode)
    symlinks = {"link": "hello.txt", "sub/up": "../hello.txt"}
    for rel, target in symlinks.items():
        (root / rel).symlink_to(target)
    return Tree(root, files, ["many", "sub", "sub/deep"], symlinks)


@pytest.fixture(scope="session")
def fs_images(tree: Tree, tmp_path_factory: pytest.TempPathFactory) -> dict[str, FsImage]:
    d = tmp_path_factory.mktemp("fs")
    images = {
        "ext4": FsImage("ext", build_ext(tree, d / "ext4.img", 32 * MIB), True),
        # 1 KiB blocks, small groups: many groups, flex_bg spread, BLOCK_UNINIT groups.
        "ext4-small-groups": FsImage(
            "ext", build_ext(tree, d / "ext4s.img", 48 * MIB, "-b", "1024", "-g", "2048"), True
        ),
        "ext2": FsImage("ext", build_ext(tree, d / "ext2.img", 16 * MIB, "-t", "ext2"), True),
        "xfs": FsImage("xfs", build_xfs(tree, d / "xfs.img"), True),
        "fat16": FsImage("fat", build_fat(tree, d / "fat16.img", 32 * MIB), False),
        "fat32": FsImage("fat", build_fat(tree, d / "fat32.img", 40 * MIB, "-F", "32"), False),
        "fat12": FsImage("fat", build_fat(tree, d / "fat12.img", 14 * MIB, "-F", "12"), False),
    }
    full = build_ntfs(tree, d / "ntfs.img", 32 * MIB)
    images["ntfs"] = FsImage("ntfs", d / "ntfs.img", full)
    return images


@pytest.fixture(scope="session")
def mbr_disk(
    fs_images: dict[str, FsImage], tmp_path_factory: pytest.TempPathFactory, tree: Tree
) -> Disk:
    """MBR: p1 FAT16, p2 extended, p5 ext4 (logical), p6 ext4 with a corrupt superblock."""
    d = tmp_path_factory.mktemp("mbr")
    disk = prefilled(d / "mbr.img", 100 * MIB)
    script = (
        "label: dos\n"
        "start=2048, size=65536, type=6\n"
        "start=67584, type=5\n"
        "size=65536, type=83\n"
        "size=32768, type=83\n"
    )
    subprocess.run(["sfdisk", "-q", str(disk)], input=script, text=True, check=True)
    parts = sfdisk_layout(disk)
    dd_into(disk, fs_images["fat16"].path, parts["p1"][0])
    dd_into(disk, fs_images["ext4"].path, parts["p5"][0])
    bad = build_ext(tree, d / "bad.img", 16 * MIB, "-t", "ext4")
    with bad.open("r+b") as f:
        f.seek(1024 + 32)  # s_blocks_per_group, s_clusters_per_group, s_inodes_per_group
        f.write(b"\0" * 12)
    dd_into(disk, bad, parts["p6"][0])
    return Disk(disk, parts, {"p1": "fat16", "p5": "ext4", "p6": "corrupt"})


@pytest.fixture(scope="session")
def gpt_disk(fs_images: dict[str, FsImage], tmp_path_factory: pytest.TempPathFactory) -> Disk:
    """GPT: p1 FAT32 (EFI type), p2 ext4, p3 XFS, p4 NTFS; the boot gap holds data."""
    d = tmp_path_factory.mktemp("gpt")
    size = 2 * MIB + 40 * MIB + 32 * MIB + 300 * MIB + 32 * MIB + 2 * MIB
    disk = prefilled(d / "gpt.img", size)
    run(
        "sgdisk", "-o",
        "-n", "1:2048:+40M", "-t", "1:ef00", "-c", "1:EFI",
        "-n", "2:0:+32M", "-t", "2:8300",
        "-n", "3:0:+300M", "-t", "3:8300",
        "-n", "4:0:+32M", "-t", "4:0700",
        disk,
    )  # fmt: skip
    parts = sfdisk_layout(disk)
    contents = {"p1": "fat32", "p2": "ext4", "p3": "xfs", "p4": "ntfs"}
    for name, key in contents.items():
        dd_into(disk, fs_images[key].path, parts[name][0])
    return Disk(disk, parts, contents)


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
