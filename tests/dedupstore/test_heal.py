"""The store heals instead of spreading damage (issue 8, items 1-4 and 6).

Damaged chunks are marked by verify and replaced by the next backup or from good copies;
incrementals never reuse a damaged or missing id; GC never deletes a pack it cannot account
for and spares what readers may still read; `rebuild_index` salvages damaged packs; every
record read back from the index is checked.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import lmdb
import msgpack
import pytest
from testlib import assert_logs, flip_byte, make_image, sha256_file

from dedupstore import (
    ZERO_ID,
    ChunkCorrupt,
    ChunkId,
    Locked,
    Point,
    Repository,
    StoreError,
    backup_image,
    backup_tree,
    disk_readers,
    gc,
    live_readers,
    rebuild_index,
    repair_chunks,
    restore_image,
    restore_tree,
    verify,
)
from dedupstore._imagepoint import block_map
from dedupstore._pack import pack_path
from dedupstore.formats import ENTRY_HEADER, ENTRY_HEADER_CRC_SPAN, PACK_HEADER


def _block_ids(repo: Repository, p: Point) -> list[ChunkId]:
    return [c for c, _fp in block_map(repo, p.manifest["disks"][0]).entries() if c != ZERO_ID]


def _damage_chunk(repo_dir: Path, repo: Repository, cid: bytes) -> None:
    """Flip one byte in the middle of the indexed payload of `cid`."""
    loc = repo.index.lookup(cid)
    assert loc is not None
    info = repo.index.pack_info(loc[0])
    assert info is not None
    repo.forget_pack_fd(loc[0])
    flip_byte(pack_path(repo_dir, str(info["tier"]), loc[0]), loc[1] + loc[2] // 2)


def _restore_sha(repo: Repository, p: Point, out: Path) -> str:
    restore_image(repo, p, out)
    return sha256_file(out)


@pytest.mark.parametrize("mode", ["full", "incremental"])
def test_damaged_chunk_is_marked_and_the_next_backup_replaces_it(
    repo_dir: Path, tmp_path: Path, mode: str
) -> None:
    img = make_image(tmp_path / "d.img", 4)
    with Repository.open(repo_dir, writable=True) as repo:
        p1 = backup_image(repo, [img], source="vm1", mode="full")
        cid = _block_ids(repo, p1)[0]
        _damage_chunk(repo_dir, repo, cid)
    with Repository.open(repo_dir) as repo:  # verify marks from a read-only open
        rep = verify(repo)
        assert not rep.ok and p1.name in rep.damaged_points
        assert rep.marked_bad == 1
        marks = repo.bad_chunks()
        assert list(marks) == [cid] and marks[ChunkId(cid)]["points"] == [p1.name]
    with Repository.open(repo_dir, writable=True) as repo:
        assert not repo.has(cid)  # a bad chunk counts as absent
        p2 = backup_image(repo, [img], source="vm1", mode=mode)
        assert p2.manifest["stats"]["new_chunks"] == 1  # only the damaged block, again
        assert repo.bad_chunks() == {}
    with Repository.open(repo_dir) as repo:
        assert verify(repo).ok
        assert _restore_sha(repo, repo.resolve(p1.name), tmp_path / "o.img") == sha256_file(img)


def test_incremental_does_not_reuse_an_id_the_index_lacks(repo_dir: Path, tmp_path: Path) -> None:
    """The fingerprint shortcut asks the index: a chunk gone from it is stored again."""
    img = make_image(tmp_path / "d.img", 4)
    with Repository.open(repo_dir, writable=True) as repo:
        p1 = backup_image(repo, [img], source="vm1", mode="full")
        gone = _block_ids(repo, p1)[0]
        repo.index.commit(delete_chunks=[gone])
        p2 = backup_image(repo, [img], source="vm1")
        assert p2.mode == "incremental" and repo.has(gone)
        assert verify(repo).ok


def test_incremental_falls_back_to_a_full_pass_when_the_base_map_is_damaged(
    repo_dir: Path, tmp_path: Path
) -> None:
    img = make_image(tmp_path / "d.img", 4)
    with Repository.open(repo_dir, writable=True) as repo:
        p1 = backup_image(repo, [img], source="vm1", mode="full")
        page = next(iter(block_map(repo, p1.manifest["disks"][0]).page_ids()))
        _damage_chunk(repo_dir, repo, page)
        with assert_logs("unreadable.*full pass", count=1):
            p2 = backup_image(repo, [img], source="vm1")
        assert p2.mode == "incremental"
        assert any("full pass" in n for n in p2.manifest["notes"])
        assert _restore_sha(repo, p2, tmp_path / "o.img") == sha256_file(img)
        # the chain goes on, and the damaged page was stored afresh: p1 reads again too
        p3 = backup_image(repo, [img], source="vm1")
        assert "notes" not in p3.manifest
        assert verify(repo).ok
        assert _restore_sha(repo, p1, tmp_path / "o1.img") == sha256_file(img)


def test_repair_chunks_uses_a_good_copy_and_drops_the_damaged_one(
    repo_dir: Path, tmp_path: Path
) -> None:
    img = make_image(tmp_path / "d.img", 4)
    with Repository.open(repo_dir, writable=True) as repo:
        p1 = backup_image(repo, [img], source="vm1", mode="full")
        cid = _block_ids(repo, p1)[0]
        first = repo.index.lookup(cid)
        # a second stored copy of the same chunk (as a crash salvage or a copy leaves)
        data = repo.get(cid)
        codec, payload = repo.codec.seal(1, cid, data)  # type: ignore[arg-type]
        repo.put_sealed(1, cid, codec, payload, len(data))
        repo.flush()
        second = repo.index.lookup(cid)
        assert first is not None and second is not None and second[0] != first[0]
        _damage_chunk(repo_dir, repo, cid)
        assert not verify(repo).ok
        rep = repair_chunks(repo)
        assert rep.ok and list(rep.replaced) == [cid.hex()]
        assert repo.index.lookup(cid) == first and repo.bad_chunks() == {}
        assert rep.packs_rewritten == 1  # the damaged copy's pack is gone
        assert repo.index.pack_info(second[0]) is None
        assert verify(repo).ok
        assert _restore_sha(repo, p1, tmp_path / "o.img") == sha256_file(img)


def test_repair_chunks_reports_no_good_copy_and_incrementals_do_not_reuse_it(
    repo_dir: Path, tmp_path: Path
) -> None:
    img = make_image(tmp_path / "d.img", 4)
    with Repository.open(repo_dir, writable=True) as repo:
        p1 = backup_image(repo, [img], source="vm1", mode="full")
        cid = _block_ids(repo, p1)[0]
        _damage_chunk(repo_dir, repo, cid)
        assert not verify(repo).ok
        rep = repair_chunks(repo)
        assert not rep.ok and rep.unrepairable == {cid.hex(): [p1.name]}
        # the incremental's fingerprint matches p1's entry, but the id is damaged: stored anew
        p2 = backup_image(repo, [img], source="vm1")
        assert p2.manifest["stats"]["new_chunks"] == 1
        assert verify(repo).ok
        assert repair_chunks(repo).marked == 0


def _foreign_pack(repo_dir: Path, repo: Repository) -> tuple[Path, bytes]:
    """A copy of an indexed pack under a new id, with its header destroyed."""
    src = next(iter(sorted((repo_dir / "packs").rglob("*.pack"))))
    pid = int(src.stem, 16) + 1000
    dest = pack_path(repo_dir, "capacity", pid)
    dest.parent.mkdir(parents=True, exist_ok=True)
    data = bytearray(src.read_bytes())
    data[:8] = b"garbage!"
    dest.write_bytes(bytes(data))
    return dest, bytes(data)


def test_gc_quarantines_an_unindexed_pack_it_did_not_write(repo_dir: Path, tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 2)
    with Repository.open(repo_dir, writable=True) as repo:
        backup_image(repo, [img], source="vm1", mode="full")
        dest, data = _foreign_pack(repo_dir, repo)
    with assert_logs("ignoring unreadable pack"), Repository.open(repo_dir, writable=True) as repo:
        pass
    with assert_logs("ignoring unreadable pack"), Repository.open(repo_dir, writable=True) as repo:
        with assert_logs("moved unindexed pack .* to .*quarantine", count=1):
            rep = gc(repo, grace_s=0)
        assert rep.packs_quarantined == 1 and not dest.exists()
    (kept,) = (repo_dir / "quarantine").iterdir()
    assert kept.read_bytes() == data


def test_gc_deletes_only_its_own_unfinished_pack(repo_dir: Path, tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 2)
    with Repository.open(repo_dir, writable=True) as repo:
        backup_image(repo, [img], source="vm1", mode="full")
        repo.put(1, os.urandom(1000))  # type: ignore[arg-type]
        pending = repo._pending
        assert pending is not None
        mine = pending.writer.path
        pending.writer.abort()
        repo._pending = None
        assert int(mine.stem, 16) in repo.writing_packs()
    # a writer that cannot index it (its header is gone) leaves it; gc may delete it: ours
    with open(mine, "r+b") as fh:
        fh.write(b"garbage!")
    with assert_logs("ignoring unreadable pack"), Repository.open(repo_dir, writable=True) as repo:
        with assert_logs("deleting unindexed pack", count=1):
            rep = gc(repo, grace_s=0)
        assert rep.packs_deleted >= 1 and rep.packs_quarantined == 0
        assert not mine.exists() and repo.writing_packs() == set()
        assert verify(repo).ok


def test_rebuild_index_salvages_a_pack_with_damaged_header_table_and_entry(
    repo_dir: Path, tmp_path: Path
) -> None:
    img = make_image(tmp_path / "d.img", 4)
    with Repository.open(repo_dir, writable=True) as repo:
        p1 = backup_image(repo, [img], source="vm1", mode="full")
        ids = _block_ids(repo, p1)
        victim = ids[len(ids) // 2]
        loc = repo.index.lookup(victim)
        assert loc is not None
        n_chunks = repo.index.chunk_count()
    (pack,) = sorted((repo_dir / "packs").rglob("*.pack"))
    assert int(pack.stem, 16) == loc[0]
    flip_byte(pack, 3)  # header magic
    flip_byte(pack, pack.stat().st_size - 40)  # the table (its crc no longer matches)
    flip_byte(pack, loc[1] - ENTRY_HEADER.size + 10)  # one entry's header, mid-pack
    shutil.rmtree(repo_dir / "index")
    with assert_logs("ignoring unreadable pack"), Repository.open(repo_dir, writable=True) as repo:
        rep = rebuild_index(repo)
        assert rep.points == 1
        assert repo.index.chunk_count() == n_chunks - 1  # all but the damaged entry
        assert not repo.has(victim)
        # the next backup stores the lost block again; gc rewrites the damaged pack
        backup_image(repo, [img], source="vm1")
        gc(repo, grace_s=0)
        assert verify(repo).ok
        assert _restore_sha(repo, repo.resolve(p1.name), tmp_path / "o.img") == sha256_file(img)


def test_gc_keeps_deleted_points_for_the_grace_period(repo_dir: Path, tmp_path: Path) -> None:
    a = make_image(tmp_path / "a.img", 4, seed=1)
    b = make_image(tmp_path / "b.img", 4, seed=2)
    with Repository.open(repo_dir, writable=True) as repo:
        pa = backup_image(repo, [a], source="a", mode="full")
        backup_image(repo, [b], source="b", mode="full")
        repo.delete_point(pa)
        rep = gc(repo)  # default grace: 24 h
        assert rep.deleted_chunks == 0 and rep.deleted_points_kept == 1
        rep = gc(repo, grace_s=0)
        assert rep.deleted_chunks > 0 and rep.deleted_points_purged == 1
        assert repo.deleted_points() == []
        assert verify(repo).ok


def test_a_reader_survives_prune_and_gc(repo_dir: Path, tmp_path: Path) -> None:
    a = make_image(tmp_path / "a.img", 4, seed=1)
    with Repository.open(repo_dir, writable=True) as repo:
        pa = backup_image(repo, [a], source="a", mode="full")
    with Repository.open(repo_dir) as reader:
        (disk,) = disk_readers(reader, reader.resolve(pa.name))
        head = disk.pread(0, 1 << 20)
        (lease,) = live_readers(repo_dir)
        assert lease.pid == os.getpid() and lease.points == [pa.name]
        with Repository.open(repo_dir, writable=True) as repo:
            repo.delete_point(repo.resolve(pa.name))
            rep = gc(repo, grace_s=0)
            assert rep.deleted_chunks == 0 and rep.deleted_points_kept == 1
            with pytest.raises(Locked, match=rf"live readers: PID {os.getpid()} \("):
                rebuild_index(repo)
        rest = disk.pread(1 << 20, disk.size - (1 << 20))
        assert head + rest == a.read_bytes()
    assert live_readers(repo_dir) == []
    with Repository.open(repo_dir, writable=True) as repo:
        rep = gc(repo, grace_s=0)
        assert rep.deleted_chunks > 0 and rep.deleted_points_purged == 1


def test_the_lease_of_a_killed_reader_is_removed(repo_dir: Path) -> None:
    code = (
        "import sys; from dedupstore import Repository\n"
        f"r = Repository.open({str(repo_dir)!r})\n"
        "print('open', flush=True); sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "open\n"
        (lease,) = live_readers(repo_dir)
        assert lease.pid == proc.pid and "Repository.open" in lease.command
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert live_readers(repo_dir) == []
        assert list((repo_dir / "readers").iterdir()) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _raw_point_value(repo_dir: Path, key: bytes) -> bytes:
    env = lmdb.open(str(repo_dir / "index"), max_dbs=16)
    try:
        db = env.open_db(b"points")
        with env.begin(db=db) as txn:
            return bytes(txn.get(key))
    finally:
        env.close()


def _put_raw_point_value(repo_dir: Path, key: bytes, value: bytes) -> None:
    env = lmdb.open(str(repo_dir / "index"), max_dbs=16)
    try:
        db = env.open_db(b"points")
        with env.begin(db=db, write=True) as txn:
            txn.put(key, value)
    finally:
        env.close()


def test_a_damaged_index_record_is_an_error_naming_it(repo_dir: Path, tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 1)
    with Repository.open(repo_dir, writable=True) as repo:
        p1 = backup_image(repo, [img], source="vm1", mode="full")
    key = b"vm1\0" + p1.id.encode()
    raw = bytearray(_raw_point_value(repo_dir, key))
    raw[len(raw) // 2] ^= 0x01
    _put_raw_point_value(repo_dir, key, bytes(raw))
    with Repository.open(repo_dir) as repo, pytest.raises(StoreError, match=f"vm1@{p1.id}"):
        repo.list_points()


def test_a_manifest_that_does_not_match_its_id_is_refused(repo_dir: Path, tmp_path: Path) -> None:
    """A record (written in the pre-checksum format) whose manifest was swapped decodes
    fine: only re-hashing it against its chunk id shows it is not the point's manifest."""
    img = make_image(tmp_path / "d.img", 1)
    with Repository.open(repo_dir, writable=True) as repo:
        p1 = backup_image(repo, [img], source="vm1", mode="full")
        forged = {**p1.manifest, "disks": []}
        data = msgpack.packb(forged)
        codec, payload = repo.codec.seal(5, p1.manifest_id, data)  # type: ignore[arg-type]
    rec = {"c": p1.manifest_id, "m": payload, "codec": int(codec), "raw": len(data), "lock": None}
    _put_raw_point_value(repo_dir, b"vm1\0" + p1.id.encode(), msgpack.packb(rec))
    with (
        Repository.open(repo_dir) as repo,
        pytest.raises(ChunkCorrupt, match=f"catalogue record of vm1@{p1.id}"),
    ):
        repo.resolve(p1.name)


def test_verify_rehashes_chunks_of_a_plain_repository(tmp_path: Path) -> None:
    """A payload changed with its crc fixed up passes every crc: only the id shows it."""
    root = tmp_path / "r"
    Repository.create(root, compression="none")
    img = make_image(tmp_path / "d.img", 2)
    with Repository.open(root, writable=True) as repo:
        p1 = backup_image(repo, [img], source="vm1", mode="full")
        cid = _block_ids(repo, p1)[0]
        loc = repo.index.lookup(cid)
        info = repo.index.pack_info(loc[0]) if loc else None
        assert loc is not None and info is not None
    path = pack_path(root, str(info["tier"]), loc[0])
    blob = bytearray(path.read_bytes())
    blob[loc[1] + 5] ^= 0x55
    head = loc[1] - ENTRY_HEADER.size
    fields = list(ENTRY_HEADER.unpack_from(blob, head))
    fields[7] = zlib.crc32(blob[loc[1] : loc[1] + loc[2]])
    new_head = bytearray(ENTRY_HEADER.pack(*fields))
    new_head[ENTRY_HEADER_CRC_SPAN:] = zlib.crc32(new_head[:ENTRY_HEADER_CRC_SPAN]).to_bytes(
        4, "little"
    )
    blob[head : head + ENTRY_HEADER.size] = new_head
    path.write_bytes(bytes(blob))
    with Repository.open(root) as repo:
        rep = verify(repo)
        assert rep.bad_chunks[cid].endswith("content does not match its id")
        assert p1.name in rep.damaged_points
    assert PACK_HEADER.size == 40


def test_a_damaged_files_cache_record_is_a_miss_not_wrong_data(
    repo_dir: Path, tmp_path: Path
) -> None:
    src = tmp_path / "tree"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(300_000))
    with Repository.open(repo_dir, writable=True) as repo:
        backup_tree(repo, src, source="docs")
    env = lmdb.open(str(repo_dir / "index"), max_dbs=16)
    try:
        db = env.open_db(b"files")
        with env.begin(db=db, write=True) as txn:
            key = b"docs\0f"
            raw = bytearray(txn.get(key))
            raw[-3] ^= 0x01
            txn.put(key, bytes(raw))
    finally:
        env.close()
    with Repository.open(repo_dir, writable=True) as repo:
        with assert_logs(r"index record files:docs@f is damaged", count=1):
            p2 = backup_tree(repo, src, source="docs")
        assert p2.manifest["stats"]["cached_files"] == 0
        restore_tree(repo, p2, tmp_path / "out")
    assert (tmp_path / "out" / "f").read_bytes() == (src / "f").read_bytes()


def test_repair_chunks_restores_a_damaged_manifest_from_its_catalogue_record(
    repo_dir: Path, tmp_path: Path
) -> None:
    img = make_image(tmp_path / "d.img", 2)
    with Repository.open(repo_dir, writable=True) as repo:
        p1 = backup_image(repo, [img], source="vm1", mode="full")
        _damage_chunk(repo_dir, repo, p1.manifest_id)
        rep = verify(repo)
        assert rep.marked_bad == 1 and p1.name in rep.damaged_points
        fixed = repair_chunks(repo)
        assert fixed.ok and list(fixed.replaced) == [p1.manifest_id.hex()]
        assert fixed.packs_rewritten == 1
        assert verify(repo).ok
        assert _restore_sha(repo, p1, tmp_path / "o.img") == sha256_file(img)
