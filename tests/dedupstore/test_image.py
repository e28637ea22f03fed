"""Image points: full / incremental / differential / synthetic, dedup figures, restore."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from testlib import make_image, sha256_file

from dedupstore import (
    InvalidArgument,
    NotFound,
    Repository,
    backup_image,
    disk_readers,
    restore_image,
    synthesize,
)


def test_full_then_incremental_stores_only_changes(repo_dir: Path, tmp_path: Path) -> None:
    img = make_image(tmp_path / "disk.img", 16)
    with Repository.open(repo_dir, writable=True) as repo:
        p1 = backup_image(repo, [img], source="vm1", mode="full")
    s1 = p1.manifest["stats"]
    assert s1["zero_blocks"] == 4 * 16  # four 1 MiB zero regions of 64 KiB blocks
    # the duplicate regions dedup to one block, zeros cost nothing
    assert s1["new_raw_bytes"] < 10 * (1 << 20)
    with open(img, "r+b") as fh:  # change 3 scattered 4 KiB pieces
        for off in (1 << 20, 5 << 20, 9 << 20):
            fh.seek(off + 12345)
            fh.write(os.urandom(4096))
    with Repository.open(repo_dir, writable=True) as repo:
        p2 = backup_image(repo, [img], source="vm1", mode="incremental")
    s2 = p2.manifest["stats"]
    assert p2.parent == p1.id and p2.mode == "incremental"
    assert s2["new_chunks"] <= 6  # at most two 64 KiB blocks per change
    assert s2["reused_blocks"] >= 16 * 16 - 4 * 16 - 6 - 16  # unchanged blocks not re-hashed
    assert s2["stored_bytes"] < 1 << 20  # changed blocks + the block-map pages above them
    out = tmp_path / "out.img"
    with Repository.open(repo_dir) as repo:
        restore_image(repo, repo.resolve("vm1@latest"), out)
        assert sha256_file(out) == sha256_file(img)
        restore_image(repo, repo.resolve(p1.name), out)
    assert sha256_file(out) != sha256_file(img)  # the first point is still the old image


def test_differential_compares_with_last_full(repo_dir: Path, tmp_path: Path) -> None:
    img = make_image(tmp_path / "disk.img", 4)
    with Repository.open(repo_dir, writable=True) as repo:
        full = backup_image(repo, [img], source="s", mode="full")
        inc = backup_image(repo, [img], source="s", mode="incremental")
        diff = backup_image(repo, [img], source="s", mode="differential")
        syn = synthesize(repo, "s")
    assert inc.parent == full.id
    assert diff.parent == full.id and diff.mode == "differential"
    assert syn.mode == "synthetic" and syn.parent == diff.id
    assert syn.manifest["disks"][0]["root"] == full.manifest["disks"][0]["root"]
    out = tmp_path / "o.img"
    with Repository.open(repo_dir) as repo:
        restore_image(repo, repo.resolve("s@latest"), out)
    assert sha256_file(out) == sha256_file(img)


def test_zero_image_costs_nothing_and_odd_size(repo_dir: Path, tmp_path: Path) -> None:
    img = tmp_path / "zero.img"
    with open(img, "wb") as fh:
        fh.truncate(100 * (1 << 20) + 12345)  # sparse, not a multiple of the block size
    with Repository.open(repo_dir, writable=True) as repo:
        p = backup_image(repo, [img], source="z", mode="full")
    assert p.manifest["stats"]["stored_bytes"] == 0
    out = tmp_path / "out.img"
    with Repository.open(repo_dir) as repo:
        restore_image(repo, p, out)
        (reader,) = disk_readers(repo, p)
        assert list(reader.extents()) == [(0, reader.size, True)]
    assert out.stat().st_size == img.stat().st_size
    assert out.stat().st_blocks == 0  # restored sparse


def test_multi_disk_point_and_random_reads(repo_dir: Path, tmp_path: Path) -> None:
    a = make_image(tmp_path / "a.img", 3, seed=1)
    b = make_image(tmp_path / "b.img", 5, seed=2)
    with Repository.open(repo_dir, writable=True) as repo:
        p = backup_image(repo, [a, b], source="vm2", mode="full")
    assert [d["name"] for d in p.manifest["disks"]] == ["disk0", "disk1"]
    with Repository.open(repo_dir) as repo:
        readers = disk_readers(repo, p)
        data_b = b.read_bytes()
        rnd = __import__("random").Random(5)
        for _ in range(200):
            off = rnd.randrange(0, len(data_b))
            n = rnd.randrange(1, 300_000)
            assert readers[1].pread(off, n) == data_b[off : off + n]
        assert readers[1].pread(len(data_b) + 10, 10) == b""
        outdir = tmp_path / "restored"
        outs = restore_image(repo, p, outdir)
    assert [o.name for o in outs] == ["disk0.img", "disk1.img"]
    assert sha256_file(outs[0]) == sha256_file(a)
    assert sha256_file(outs[1]) == sha256_file(b)


def test_restore_to_block_device_writes_zeros(repo_dir: Path, tmp_path: Path) -> None:
    """A restore onto a loop device overwrites old contents, zero regions included."""
    import subprocess

    img = make_image(tmp_path / "disk.img", 4)
    with Repository.open(repo_dir, writable=True) as repo:
        p = backup_image(repo, [img], source="dev", mode="full")
    target = tmp_path / "target.img"
    target.write_bytes(b"\xa5" * (4 << 20))
    try:
        dev = subprocess.run(["losetup", "-f", "--show", str(target)], check=True,
                             capture_output=True, text=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        pytest.skip("loop devices unavailable")
    try:
        with Repository.open(repo_dir) as repo:
            restore_image(repo, p, Path(dev))
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)
    assert sha256_file(target) == sha256_file(img)


def test_bad_inputs(repo_dir: Path, tmp_path: Path) -> None:
    with Repository.open(repo_dir, writable=True) as repo:
        with pytest.raises(NotFound):
            backup_image(repo, [tmp_path / "nope.img"], source="x")
        with pytest.raises(InvalidArgument):
            backup_image(repo, [make_image(tmp_path / "i", 1)], source="a/b")
        with pytest.raises(InvalidArgument):
            backup_image(repo, [tmp_path / "i"], source="x", mode="sometimes")
        with pytest.raises(NotFound):
            repo.resolve("ghost@latest")
        with pytest.raises(InvalidArgument):
            repo.resolve("@latest")


def test_zero_runs_clip_and_merge() -> None:
    from dedupstore._blockmap import zero_runs

    flags = [True, True, False, False, True]
    assert list(zero_runs(10, 5 * 100 - 7, 100, flags)) == [
        (10, 190, True), (200, 200, False), (400, 93, True)]
    assert list(zero_runs(250, 260, 100, [False])) == [(250, 10, False)]
    assert list(zero_runs(5, 5, 100, [])) == []
