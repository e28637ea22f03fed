"""kill -9 of a backup at any moment: no half point, verify clean, the re-run reuses data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from testlib import BIN, make_image, run_cli, sha256_file

from dedupstore import Kind, Repository, verify


def _pack_count(repo: Path) -> int:
    return sum(1 for _ in (repo / "packs").glob("*/*/*"))


@pytest.mark.slow
@pytest.mark.parametrize("after_packs", [0, 6, 18])
def test_kill_during_backup(tmp_path: Path, after_packs: int) -> None:
    """Kill when the backup has written `after_packs` packs (0: as soon as it has started)."""
    repo = tmp_path / "repo"
    img = make_image(tmp_path / "disk.img", 400, seed=3)
    run_cli("--repo", str(repo), "init")
    # small packs (~30 for this image) so a kill lands between sealed packs as well as inside one
    cfg = json.loads((repo / "config.json").read_text())
    cfg["pack_target_bytes"] = 4 << 20
    (repo / "config.json").write_text(json.dumps(cfg))
    proc = subprocess.Popen([str(BIN / "appliance"), "--repo", str(repo), "backup", "image",
                             str(img), "--source", "vm1", "--mode", "full"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while (proc.poll() is None and time.monotonic() < deadline
           and _pack_count(repo) <= after_packs):
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    print("backup exit status", proc.returncode, "packs at kill", _pack_count(repo))
    with Repository.open(repo) as r:  # a reader sees no half point: a visible point is whole
        visible = [p for p in r.list_points() if p.source == "vm1"]
        assert verify(r).ok
    if visible:  # the kill landed after the commit: the point must restore exactly
        out = tmp_path / "early.img"
        run_cli("--repo", str(repo), "restore", "vm1@latest", str(out))
        assert sha256_file(out) == sha256_file(img)
        out.unlink()
    with Repository.open(repo, writable=True) as r:  # the next writer salvages
        salvaged = r.index.chunk_count()
        assert verify(r).ok
    done = run_cli("--repo", str(repo), "backup", "image", str(img), "--source", "vm1",
                   "--mode", "full", "--json")
    st = json.loads(done.stdout)["stats"]
    if salvaged > 10 and not visible:
        # what the killed run stored is reused, not stored again
        assert st["new_chunks"] <= st["hashed_blocks"] - salvaged + 10
    out = tmp_path / "out.img"
    run_cli("--repo", str(repo), "restore", "vm1@latest", str(out))
    assert sha256_file(out) == sha256_file(img)
    assert run_cli("--repo", str(repo), "verify").returncode == 0


def test_torn_pack_tail_is_salvaged(repo_dir: Path, tmp_path: Path) -> None:
    """An unsealed pack cut in the middle of an entry keeps every entry before the cut."""
    from dedupstore import Kind

    r = Repository.open(repo_dir, writable=True)
    ids = [r.put(Kind.FILE, os.urandom(30_000)).chunk_id for _ in range(10)]
    assert r._pending is not None
    r._pending.writer._drain()
    path = r._pending.writer.path
    # simulate the crash: the process dies, the file is cut mid-entry
    os.close(r._pending.writer._fd)
    r._pending.writer._fd = -1
    r._pending = None
    r.close()
    size = path.stat().st_size
    os.truncate(path, size - 5000)
    with Repository.open(repo_dir, writable=True) as r2:
        got = [r2.has(c) for c in ids]
        assert got == [True] * 9 + [False]
        for c in ids[:9]:
            assert len(r2.get(c, verify_id=True)) == 30_000
    print(sys.version)


def test_headerless_pack_is_removed_and_garbage_pack_kept(repo_dir: Path) -> None:
    """A pack killed before its header is empty: dropped. One with a garbage header is kept."""
    import logging

    from testlib import assert_logs

    from dedupstore._pack import pack_path

    empty, garbage = pack_path(repo_dir, "capacity", 0xF0), pack_path(repo_dir, "capacity", 0xF1)
    for p in (empty, garbage):
        p.parent.mkdir(parents=True, exist_ok=True)
    empty.write_bytes(b"DRP")
    garbage.write_bytes(os.urandom(4096))
    with assert_logs(r"ignoring unreadable pack .*00000000000000f1\.pack", count=1), \
            Repository.open(repo_dir, writable=True) as r:
        assert verify(r).ok
    assert not empty.exists()
    assert garbage.exists()  # not ours to delete: a rebuild or a person may want it
    with assert_logs("ignoring unreadable pack", level=logging.WARNING), \
            Repository.open(repo_dir, writable=True) as r:
        assert r.put(Kind.FILE, b"x" * 1000).chunk_id  # ids move past both files
