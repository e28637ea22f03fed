"""Backups that say they worked must have worked (issue 8, item 7).

Unreadable sources are real: the appliance's own FUSE mount of a repository with one flipped
byte in a pack serves a disk image and a file whose reads fail with EIO in one place. An image
backup of such a source must abort naming the disk and the offset and commit nothing; a file
tree backup must leave the file out, record it in the point and exit 3. A file that grows or
shrinks while it is read is reported as changed (made deterministic through the progress
callback, which runs on the reading thread after every 8 MiB window).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sys
from pathlib import Path

import pytest
from testlib import assert_logs, make_image, run_cli, sha256_file

from dedupstore import Repository, backup_image, backup_tree, restore_tree

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vfs"))
from vfs_testutil import mounted

MIB = 1 << 20
BLOCK = 64 * 1024  # the repository's default block size


def _flip_chunk(repo_root: Path, data: bytes) -> None:
    """Flip one byte in the middle of the stored payload of the chunk holding `data`."""
    from dedupstore._pack import pack_path  # test-only peek at the on-disk layout

    with Repository.open(repo_root) as repo:
        loc = repo.index.lookup(repo.chunk_id(data))
        assert loc is not None
        pack_id, offset, stored_len = loc[0], loc[1], loc[2]
        info = repo.index.pack_info(pack_id)
        assert info is not None
        path = pack_path(repo_root, str(info["tier"]), pack_id)
    with path.open("r+b") as f:
        f.seek(offset + stored_len // 2)
        byte = f.read(1)
        f.seek(offset + stored_len // 2)
        f.write(bytes([byte[0] ^ 0xFF]))


def _points(repo: Path) -> list[dict[str, object]]:
    rows = json.loads(run_cli("--repo", str(repo), "points", "--json").stdout)
    assert isinstance(rows, list)
    return rows


@pytest.mark.fuse
def test_image_backup_of_a_failing_source_aborts_naming_the_offset(tmp_path: Path) -> None:
    disk = make_image(tmp_path / "disk.img", 8)
    data = disk.read_bytes()
    damaged = tmp_path / "damaged"
    run_cli("--repo", str(damaged), "init")
    run_cli("--repo", str(damaged), "backup", "image", str(disk), "--source", "vm1")
    # A random-data block (unique) that is not the first of a 64-block read batch.
    bad = 16 + 5
    assert data[bad * BLOCK : (bad + 1) * BLOCK].count(0) < BLOCK // 2
    _flip_chunk(damaged, data[bad * BLOCK : (bad + 1) * BLOCK])
    target = tmp_path / "target"
    run_cli("--repo", str(target), "init")
    with mounted(damaged, tmp_path / "mnt") as m:
        src = m.mnt / "vm1" / "latest" / "disk0.img"
        fd = os.open(src, os.O_RDONLY)
        try:
            with pytest.raises(OSError):  # the source really fails there
                os.pread(fd, BLOCK, bad * BLOCK)
        finally:
            os.close(fd)
        proc = run_cli(
            "--repo", str(target), "backup", "image", str(src), "--source", "copy", check=False
        )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    match = re.search(r"disk0: read failed at offset (\d+) .*no point committed", lines[0])
    assert match, lines[0]
    assert str(src) in lines[0]
    assert int(match.group(1)) == bad * BLOCK  # the first block that fails, exactly
    assert _points(target) == []


def test_image_backup_of_a_short_source_aborts(tmp_path: Path) -> None:
    """A source that ends before its measured size (it shrank) is an error, not zeros."""
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.write(random.Random(5).randbytes(MIB))
        f.truncate(64 * MIB)
    repo_root = tmp_path / "repo"
    Repository.create(repo_root)
    truncated = False

    def shrink(done: int, total: int) -> None:
        # The first progress report comes after the first 4 MiB batch; at most 3 batches per
        # worker (48 MiB) are read ahead, so the reads past 48 MiB see the shorter file.
        nonlocal truncated
        if not truncated:
            os.truncate(disk, 2 * MIB)
            truncated = True

    with Repository.open(repo_root, writable=True) as repo:
        with pytest.raises(OSError, match=r"disk0: short read at offset \d+.*no point committed"):
            backup_image(repo, [disk], source="vm1", progress=shrink)
        assert repo.list_points() == []


@pytest.mark.fuse
def test_tree_backup_skips_unreadable_file_records_it_and_exits_3(tmp_path: Path) -> None:
    rnd = random.Random(7)
    src = tmp_path / "src"
    (src / "dir").mkdir(parents=True)
    files = {
        "a.txt": b"alpha\n",
        "dir/bad.bin": rnd.randbytes(2 * MIB),
        "dir/good.bin": rnd.randbytes(300 * 1024),
        "z.txt": b"omega\n",
    }
    for rel, content in files.items():
        (src / rel).write_bytes(content)
    damaged = tmp_path / "damaged"
    run_cli("--repo", str(damaged), "init")
    run_cli("--repo", str(damaged), "backup", "files", str(src), "--source", "fs1")
    # Damage a chunk of dir/bad.bin: find one by cutting it the way the backup did.
    from pyfastcdc.cy import FastCDC

    from dedupstore._filetree import CDC_AVG, CDC_MAX, CDC_MIN

    content = files["dir/bad.bin"]
    cut = list(FastCDC(CDC_AVG, min_size=CDC_MIN, max_size=CDC_MAX).cut_buf(content))[1]
    _flip_chunk(damaged, content[cut.offset : cut.offset + cut.length])

    target = tmp_path / "target"
    run_cli("--repo", str(target), "init")
    with mounted(damaged, tmp_path / "mnt") as m:
        tree = m.mnt / "fs1" / "latest" / "files"
        with pytest.raises(OSError):
            (tree / "dir" / "bad.bin").read_bytes()
        proc = run_cli(
            "--repo", str(target), "backup", "files", str(tree), "--source", "copy", check=False
        )
        jproc = run_cli(
            "--repo",
            str(target),
            "backup",
            "files",
            str(tree),
            "--source",
            "copy2",
            "--json",
            check=False,
        )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "not backed up: dir/bad.bin: Input/output error" in proc.stderr
    assert "completed with errors: 1 entries could not be read" in proc.stderr
    assert jproc.returncode == 3
    out = json.loads(jproc.stdout)
    assert out["complete"] is False
    assert out["errors"] == [{"path": "dir/bad.bin", "error": "Input/output error"}]
    assert out["stats"]["errors"] == 1

    rows = {r["source"]: r for r in _points(target)}
    assert rows["copy"]["complete"] is False and rows["copy"]["skipped"] == 1
    assert rows["copy"]["errors"] == [{"path": "dir/bad.bin", "error": "Input/output error"}]
    listing = run_cli("--repo", str(target), "points").stdout
    assert "INCOMPLETE (1 skipped)" in listing
    # The point holds everything else byte-exact and no stand-in for the unreadable file.
    out_dir = tmp_path / "out"
    run_cli("--repo", str(target), "restore", "copy@latest", str(out_dir))
    assert not (out_dir / "dir" / "bad.bin").exists()
    for rel in ("a.txt", "dir/good.bin", "z.txt"):
        assert sha256_file(out_dir / rel) == hashlib.sha256(files[rel]).hexdigest(), rel


def test_file_changed_while_read_is_reported(tmp_path: Path) -> None:
    rnd = random.Random(3)
    src = tmp_path / "src"
    src.mkdir()
    grow, shrink, calm = src / "a-grow.log", src / "b-shrink.bin", src / "c-calm.txt"
    grow_data, shrink_data = rnd.randbytes(20 * MIB), rnd.randbytes(20 * MIB)
    grow.write_bytes(grow_data)
    shrink.write_bytes(shrink_data)
    calm.write_bytes(b"calm\n")

    def progress(done: int, total: int) -> None:
        # Called after every 8 MiB window on the reading thread: a-grow.log is read first
        # (names are sorted), then b-shrink.bin from done = 20 MiB on.
        if done == 8 * MIB:
            with grow.open("ab") as f:
                f.write(b"appended while being read\n")
        elif done == 28 * MIB:
            os.truncate(shrink, 10 * MIB)

    repo_root = tmp_path / "repo"
    Repository.create(repo_root)
    with Repository.open(repo_root, writable=True) as repo:
        point = backup_tree(repo, src, source="fs1", progress=progress)
        m = point.manifest
        assert m["complete"] is True and m["errors"] == []
        assert [c["path"] for c in m["changed"]] == ["a-grow.log", "b-shrink.bin"]
        assert "size" in m["changed"][0]["change"] and "size" in m["changed"][1]["change"]
        assert m["stats"]["changed"] == 2
        out = tmp_path / "out"
        restore_tree(repo, point, out)
        # Each file holds what was read: the size at the start, or less if it shrank.
        assert (out / "a-grow.log").read_bytes() == grow_data
        assert (out / "b-shrink.bin").read_bytes() == shrink_data[: 10 * MIB]
        assert (out / "c-calm.txt").read_bytes() == b"calm\n"
        # A changed file is not trusted by the files cache: the next backup reads it again.
        point2 = backup_tree(repo, src, source="fs1")
        assert point2.manifest["stats"]["cached_files"] == 1
        assert point2.manifest["changed"] == []


def test_unreadable_entry_is_recorded_in_process(tmp_path: Path) -> None:
    """An entry that cannot be read (here: gone before its lstat) is recorded, not hidden."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.txt").write_bytes(b"ok\n")
    repo_root = tmp_path / "repo"
    Repository.create(repo_root)
    # A file that vanishes between the directory listing and its lstat (a real race, made
    # deterministic): the progress callback runs after ok.txt, before "zz-gone" is visited.
    gone = src / "zz-gone"
    gone.write_bytes(b"x")

    def progress(done: int, total: int) -> None:
        if gone.exists():
            gone.unlink()

    with (
        Repository.open(repo_root, writable=True) as repo,
        assert_logs(r"skipping zz-gone: No such file or directory", count=1),
    ):
        point = backup_tree(repo, src, source="fs1", progress=progress)
    assert point.manifest["complete"] is False
    assert point.manifest["errors"] == [{"path": "zz-gone", "error": "No such file or directory"}]
