"""Retention, locks, GC + compaction, verify, index rebuild."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from testlib import assert_logs, flip_byte, make_image, sha256_file

from dedupstore import (
    Locked,
    Point,
    Repository,
    backup_image,
    backup_tree,
    gc,
    prune_plan,
    rebuild_index,
    restore_image,
    restore_tree,
    stats,
    verify,
)

DAY = 86400 * 10**9


def _fake(source: str, t_ns: int, lock: float | None = None) -> Point:
    from dedupstore import ChunkId

    pid = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t_ns / 1e9))
    return Point(source, pid, {"kind": "image", "time_ns": t_ns}, ChunkId(b"\0" * 32), lock)


def test_prune_plan_rules() -> None:
    t0 = 1_700_000_000 * 10**9
    points = [_fake("s", t0 + i * DAY // 2) for i in range(40)]  # two per day for 20 days
    kept, gone = prune_plan(points, keep_last=3)
    assert [p.name for p, _ in kept] == [p.name for p in points[-3:]][::-1]
    assert len(gone) == 37
    kept, gone = prune_plan(points, keep_daily=7)
    assert len(kept) == 7 and all(why == "daily" for _p, why in kept)
    days = {time.gmtime(p.time_ns / 1e9).tm_yday for p, _ in kept}
    assert len(days) == 7
    kept, _ = prune_plan(points, keep_last=1, keep_weekly=2, keep_monthly=1)
    assert 2 <= len(kept) <= 4
    locked = _fake("s", t0 - DAY, lock=time.time() + 3600)
    kept, gone = prune_plan([*points, locked], keep_last=1)
    assert (locked, "locked") in kept and locked not in gone
    with pytest.raises(Exception, match="keep"):
        prune_plan(points)


def test_lock_blocks_delete(repo_dir: Path, tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 2)
    with Repository.open(repo_dir, writable=True) as repo:
        p = backup_image(repo, [img], source="vm", mode="full")
        p = repo.lock_point(p, time.time() + 86400)
        with pytest.raises(Locked, match="locked until"):
            repo.delete_point(p)
        with assert_logs("changed by force"):  # a lock only extends unless forced
            p = repo.lock_point(p, None, force=True)
        repo.delete_point(p)
        assert repo.list_points() == []


def test_gc_reclaims_and_keeps_live_data(repo_dir: Path, tmp_path: Path) -> None:
    a = make_image(tmp_path / "a.img", 8, seed=1)
    b = make_image(tmp_path / "b.img", 8, seed=2)
    with Repository.open(repo_dir, writable=True) as repo:
        pa = backup_image(repo, [a], source="a", mode="full")
        pb = backup_image(repo, [b], source="b", mode="full")
        before = stats(repo)["stored_bytes"]
        repo.delete_point(pa)
        rep = gc(repo, grace_s=0)
        after = stats(repo)["stored_bytes"]
        assert rep.deleted_chunks > 0
        assert after < before * 0.75
        assert verify(repo).ok
        out = tmp_path / "out.img"
        restore_image(repo, pb, out)
    assert sha256_file(out) == sha256_file(b)
    # GC again with nothing to do changes nothing
    with Repository.open(repo_dir, writable=True) as repo:
        rep2 = gc(repo, grace_s=0)
        assert rep2.deleted_chunks == 0


def test_verify_names_damaged_points(repo_dir: Path, tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 4)
    src = tmp_path / "tree"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(100_000))
    with Repository.open(repo_dir, writable=True) as repo:
        p1 = backup_image(repo, [img], source="vm1", mode="full")
        p2 = backup_image(repo, [img], source="vm1", mode="incremental")
        pt = backup_tree(repo, src, source="files")
        # find the pack holding a block of vm1 and damage a payload byte
        cid = next(c for c, _fp in
                   __import__("dedupstore._imagepoint", fromlist=["x"]).block_map(
                       repo, p1.manifest["disks"][0]).entries() if c != b"\0" * 32)
        loc = repo.index.lookup(cid)
        pack = next((repo_dir / "packs").rglob(f"{loc[0]:016x}.pack"))
    flip_byte(pack, loc[1] + 10)
    with Repository.open(repo_dir) as repo:
        rep = verify(repo)
        assert not rep.ok
        assert set(rep.damaged_points) == {p1.name, p2.name}
        assert pt.name not in rep.damaged_points
        assert verify(repo, repo.resolve(pt.name)).ok
        assert not verify(repo, repo.resolve(p2.name)).ok


def test_rebuild_index_from_packs(repo_dir: Path, tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 4)
    src = tmp_path / "tree"
    src.mkdir()
    (src / "f").write_text("content")
    with Repository.open(repo_dir, writable=True) as repo:
        p1 = backup_image(repo, [img], source="vm1", mode="full")
        p2 = backup_image(repo, [img], source="vm1")
        backup_tree(repo, src, source="docs")
        repo.delete_point(p1)
        repo.lock_point(p2, 4_000_000_000.0)
        names = sorted(p.name for p in repo.list_points())
    import shutil

    shutil.rmtree(repo_dir / "index")
    (repo_dir / "index").mkdir()
    with Repository.open(repo_dir, writable=True) as repo:
        assert repo.list_points() == []
        rep = rebuild_index(repo)
        assert sorted(p.name for p in repo.list_points()) == names
        assert rep.deleted_points == 1
        assert repo.resolve(p2.name).locked_until == 4_000_000_000.0
        assert verify(repo).ok
        out = tmp_path / "o.img"
        restore_image(repo, repo.resolve("vm1@latest"), out)
        restore_tree(repo, repo.resolve("docs@latest"), tmp_path / "t")
    assert sha256_file(out) == sha256_file(img)
    assert (tmp_path / "t" / "f").read_text() == "content"


@pytest.mark.parametrize("where", ["pack-header", "entry-header", "payload", "table", "footer",
                                   "random"])
def test_any_flipped_byte_fails_verify(repo_dir: Path, tmp_path: Path, where: str) -> None:
    """Wherever one byte of a pack flips, verify exits non-zero and names the point."""
    import random

    img = make_image(tmp_path / "d.img", 2)
    with Repository.open(repo_dir, writable=True) as repo:
        p = backup_image(repo, [img], source="vm1", mode="full")
    packs = sorted((repo_dir / "packs").rglob("*.pack"))
    assert len(packs) == 1
    size = packs[0].stat().st_size
    offset = {"pack-header": 3, "entry-header": 40 + 20, "payload": 40 + 56 + 100,
              "table": size - 32 - 20, "footer": size - 10,
              "random": random.Random(4).randrange(0, size)}[where]
    flip_byte(packs[0], offset)
    with Repository.open(repo_dir) as repo:
        rep = verify(repo)
    assert not rep.ok
    assert p.name in rep.damaged_points
