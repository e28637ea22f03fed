"""The protocol-free namespace over real repositories, without FUSE."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

import pytest
from testlib import assert_logs
from vfs_testutil import MIB, Images, backup, make_tree, new_repo

from dedupstore import Repository, backup_tree, open_tree
from vfs.tree import ROOT_INO, Namespace, point_namespace, repository_namespace


def walk(ns: Namespace, path: str) -> int:
    ino = ROOT_INO
    for part in [p for p in path.split("/") if p]:
        ino, _attr = ns.lookup(ino, part)
    return ino


def names(ns: Namespace, ino: int) -> list[str]:
    return [n for n, _node in ns.listdir(ino)]


def test_layout_and_reads(image_repo: Path, images: Images) -> None:
    with Repository.open(image_repo) as repo:
        ns = repository_namespace(repo, open_tree)
        assert names(ns, ROOT_INO) == ["vm1"]
        pid = repo.resolve("vm1@latest").id
        assert names(ns, walk(ns, "vm1")) == sorted([pid, "latest"])
        assert ns.readlink(walk(ns, "vm1/latest")) == pid
        img = walk(ns, f"vm1/{pid}/disk0.img")
        data = images.disk0.read_bytes()
        assert ns.read(img, 12345, 200000) == data[12345:212345]
        assert ns.read(img, len(data) - 10, 100) == data[-10:]
        assert ns.read(img, len(data) + 10, 100) == b""
        with assert_logs(r"disk0/p3: ext filesystem cannot be opened, shown empty", count=1):
            assert names(ns, walk(ns, f"vm1/{pid}/disk0")) == ["p1", "p2", "p3"]  # p3 smashed
        big = walk(ns, f"vm1/{pid}/disk0/p1/dir/sub/big.bin")
        assert ns.read(big, MIB, 1000) == images.files["dir/sub/big.bin"][MIB : MIB + 1000]
        # hard links share an inode number; lookups of one path are stable
        assert walk(ns, f"vm1/{pid}/disk0/p1/hello.txt") == walk(
            ns, f"vm1/{pid}/disk0/p1/dir/hardlink.txt")
        with pytest.raises(OSError) as exc:
            walk(ns, f"vm1/{pid}/disk0/p1/nope")
        assert exc.value.errno == errno.ENOENT
        with pytest.raises(OSError) as exc:
            walk(ns, "vm2")
        assert exc.value.errno == errno.ENOENT
        with pytest.raises(OSError) as exc:
            ns.listdir(img)
        assert exc.value.errno == errno.ENOTDIR
        # single-point view
        pns = point_namespace(repo, repo.resolve("vm1@latest"), open_tree)
        assert names(pns, ROOT_INO) == ["disk0", "disk0.img", "disk1", "disk1.img"]
        assert names(pns, walk(pns, "disk1")) == ["fs"]


def test_live_refresh_without_new_namespace(images: Images, tmp_path: Path) -> None:
    root = new_repo(tmp_path / "repo")
    disk = tmp_path / "d.img"
    shutil.copyfile(images.disk1, disk)
    first = backup(root, [disk])
    with Repository.open(root) as repo:
        ns = repository_namespace(repo, open_tree)
        src = walk(ns, "vm1")
        assert names(ns, src) == [first, "latest"]
        second = backup(root, [disk], source="vm1")
        third = backup(root, [disk], source="other")
        assert names(ns, src) == sorted([first, second, "latest"])
        assert ns.readlink(walk(ns, "vm1/latest")) == second
        assert names(ns, ROOT_INO) == ["other", "vm1"]
        assert walk(ns, f"other/{third}/disk0.img")


def test_file_tree_namespace(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    files = make_tree(src)
    os.setxattr(src / "small.bin", "user.k", b"v")
    root = new_repo(tmp_path / "repo")
    with Repository.open(root, writable=True) as repo:
        backup_tree(repo, src, source="fs1")
    with Repository.open(root) as repo:
        ns = repository_namespace(repo, open_tree)
        base = f"fs1/{ns.readlink(walk(ns, 'fs1/latest'))}/files"  # walk() follows no links
        assert set(names(ns, walk(ns, base))) >= {"dir", "hello.txt", "link-to-hello"}
        for rel, data in files.items():
            assert ns.read(walk(ns, f"{base}/{rel}"), 0, len(data) + 10) == data
        assert walk(ns, f"{base}/hello.txt") == walk(ns, f"{base}/dir/hardlink.txt")
        link = walk(ns, f"{base}/link-to-hello")
        assert ns.readlink(link) == "hello.txt"
        assert stat.S_ISLNK(ns.getattr(link).mode)
        assert ns.xattrs(walk(ns, f"{base}/small.bin")) == {"user.k": b"v"}
