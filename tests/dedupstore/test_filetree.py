"""File-tree points: metadata fidelity, sparse files, hard links, the files cache."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dedupstore import Repository, backup_tree, open_tree, restore_tree


def _populate(src: Path) -> None:
    (src / "dir" / "sub").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "dir" / "text.txt").write_text("hello\n" * 10_000)
    (src / "dir" / "sub" / "random.bin").write_bytes(os.urandom(700_000))
    (src / "zero-length").write_bytes(b"")
    os.symlink("dir/text.txt", src / "link")
    os.symlink("/nonexistent/target", src / "dangling")
    os.link(src / "dir" / "text.txt", src / "hardlink.txt")
    with open(src / "sparse.img", "wb") as fh:
        fh.seek(10 << 20)
        fh.write(b"middle")
        fh.seek(30 << 20)
        fh.write(b"end")
    os.mkfifo(src / "fifo")
    os.chmod(src / "dir" / "text.txt", 0o640)
    os.chmod(src / "dir" / "sub", 0o700)
    os.chown(src / "dir" / "sub" / "random.bin", 1234, 5678)
    os.setxattr(src / "dir" / "text.txt", "user.comment", b"backed up")
    os.utime(src / "dir" / "text.txt", ns=(1_600_000_000_123_456_789, 1_500_000_000_987_654_321))


def _snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            content = None
            if stat.S_ISREG(st.st_mode):
                content = p.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(p)
            xattrs = {} if stat.S_ISLNK(st.st_mode) else {
                k: os.getxattr(p, k) for k in os.listxattr(p)}
            out[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, content, xattrs,
                        None if stat.S_ISDIR(st.st_mode) else st.st_mtime_ns, st.st_nlink)
    return out


def test_tree_roundtrip_metadata(repo_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _populate(src)
    with Repository.open(repo_dir, writable=True) as repo:
        p = backup_tree(repo, src, source="t", mode="full")
    dest = tmp_path / "dest"
    with Repository.open(repo_dir) as repo:
        restore_tree(repo, p, dest)
        tree = open_tree(repo, p)
        link = tree.lookup("hardlink.txt")
        assert link.ino == tree.lookup("dir/text.txt").ino and link.nlink == 2
        assert tree.lookup("link").target == "dir/text.txt"
        assert tree.lookup("dir/text.txt").xattrs == {"user.comment": b"backed up"}
        sparse = tree.lookup("sparse.img")
        assert tree.read(sparse, (10 << 20) - 2, 10) == b"\0\0middle\0\0"
    assert _snapshot(dest) == _snapshot(src)
    assert os.stat(dest / "sparse.img").st_blocks * 512 < (1 << 20)  # holes stay holes
    assert os.stat(dest / "hardlink.txt").st_ino == os.stat(dest / "dir" / "text.txt").st_ino
    assert stat.S_ISFIFO(os.lstat(dest / "fifo").st_mode)


def test_incremental_uses_files_cache_and_sees_changes(repo_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(50):
        (src / f"f{i}").write_bytes(os.urandom(20_000))
    with Repository.open(repo_dir, writable=True) as repo:
        backup_tree(repo, src, source="t", mode="full")
        (src / "f3").write_bytes(b"changed" * 1000)
        (src / "new").write_text("new file")
        (src / "f7").unlink()
        p2 = backup_tree(repo, src, source="t", mode="incremental")
    st = p2.manifest["stats"]
    assert st["cached_files"] == 48  # 50 - changed - deleted
    assert st["read_bytes"] == 7000 + 8
    dest = tmp_path / "dest"
    with Repository.open(repo_dir) as repo:
        restore_tree(repo, p2, dest)
    assert sorted(os.listdir(dest)) == sorted(os.listdir(src))
    assert (dest / "f3").read_bytes() == b"changed" * 1000


def test_insertion_dedups_with_cdc(repo_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    blob = os.urandom(4 << 20)
    (src / "big").write_bytes(blob)
    with Repository.open(repo_dir, writable=True) as repo:
        backup_tree(repo, src, source="t", mode="full")
        (src / "big").write_bytes(blob[: 2 << 20] + b"INSERTED" * 100 + blob[2 << 20 :])
        p2 = backup_tree(repo, src, source="t", mode="full")
    # only the chunks around the insertion are new
    assert p2.manifest["stats"]["new_raw_bytes"] < 700_000


def test_restore_single_path(repo_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _populate(src)
    with Repository.open(repo_dir, writable=True) as repo:
        p = backup_tree(repo, src, source="t")
    with Repository.open(repo_dir) as repo:
        restore_tree(repo, p, tmp_path / "one.txt", subpath="dir/text.txt")
        restore_tree(repo, p, tmp_path / "sub", subpath="dir/sub")
    assert (tmp_path / "one.txt").read_text() == "hello\n" * 10_000
    assert (tmp_path / "sub" / "random.bin").read_bytes() == (
        src / "dir" / "sub" / "random.bin").read_bytes()


def test_not_a_directory(repo_dir: Path, tmp_path: Path) -> None:
    from dedupstore import NotFound

    with Repository.open(repo_dir, writable=True) as repo, pytest.raises(NotFound):
        backup_tree(repo, tmp_path / "missing", source="t")
