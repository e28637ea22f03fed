"""Issue 8's acceptance, as written: a damaged chunk heals through the CLI; gc, repair and
readers behave as the healing store promises."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from testlib import BIN, flip_byte, make_image, run_cli

from dedupstore import ZERO_ID, Repository
from dedupstore._imagepoint import block_map
from dedupstore._pack import pack_path


def _flip_block_payload(r: Path, point_ref: str) -> None:
    """Flip one byte inside the payload of a block of the point, in its pack file."""
    with Repository.open(r) as repo:
        p = repo.resolve(point_ref)
        cid = next(
            c for c, _fp in block_map(repo, p.manifest["disks"][0]).entries() if c != ZERO_ID
        )
        loc = repo.index.lookup(cid)
        assert loc is not None
        info = repo.index.pack_info(loc[0])
        assert info is not None
        path = pack_path(r, str(info["tier"]), loc[0])
    flip_byte(path, loc[1] + loc[2] // 2)


@pytest.mark.parametrize("mode", ["full", "incremental"])
def test_acceptance_a_damaged_chunk_is_replaced_by_the_next_backup(
    tmp_path: Path, mode: str
) -> None:
    r = tmp_path / "R"
    disk = make_image(tmp_path / "disk.img", 8)
    run_cli("--repo", str(r), "init")
    run_cli("--repo", str(r), "backup", "image", str(disk), "--source", "vm1")
    first = json.loads(run_cli("--repo", str(r), "points", "--json").stdout)[0]["name"]
    _flip_block_payload(r, first)
    bad = run_cli("--repo", str(r), "verify", check=False)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert f"DAMAGED {first}" in bad.stdout and "marked 1 damaged chunk" in bad.stdout
    run_cli("--repo", str(r), "backup", "image", str(disk), "--source", "vm1", "--mode", mode)
    good = run_cli("--repo", str(r), "verify", check=False)
    assert good.returncode == 0, good.stdout + good.stderr
    out = tmp_path / "out.img"
    run_cli("--repo", str(r), "restore", first, str(out))
    assert subprocess.run(["cmp", str(out), str(disk)]).returncode == 0
    # the damaged copy still sits, unindexed, in its pack: gc drops it, verify stays clean
    run_cli("--repo", str(r), "gc", "--grace", "0")
    assert run_cli("--repo", str(r), "verify").returncode == 0


def test_repair_chunks_and_verify_repair_report_chunks_without_a_good_copy(
    tmp_path: Path,
) -> None:
    r = tmp_path / "R"
    disk = make_image(tmp_path / "disk.img", 4)
    run_cli("--repo", str(r), "init")
    run_cli("--repo", str(r), "backup", "image", str(disk), "--source", "vm1")
    _flip_block_payload(r, "vm1@latest")
    res = run_cli("--repo", str(r), "verify", "--repair", check=False)
    assert res.returncode == 1
    assert "NO GOOD COPY of chunk" in res.stdout and "vm1@" in res.stdout
    res = run_cli("--repo", str(r), "repair", "--chunks", "--json", check=False)
    assert res.returncode == 1 and len(json.loads(res.stdout)["unrepairable"]) == 1
    run_cli("--repo", str(r), "backup", "image", str(disk), "--source", "vm1")
    assert run_cli("--repo", str(r), "verify").returncode == 0
    res = run_cli("--repo", str(r), "repair", "--chunks")
    assert "0 chunk(s) marked damaged" in res.stdout


def test_gc_grace_and_a_live_reader_keep_a_deleted_point_readable(tmp_path: Path) -> None:
    r = tmp_path / "R"
    disk = make_image(tmp_path / "disk.img", 4)
    run_cli("--repo", str(r), "init")
    run_cli("--repo", str(r), "backup", "image", str(disk), "--source", "vm1")
    code = (
        "import sys; from dedupstore import Repository, disk_readers\n"
        f"repo = Repository.open({str(r)!r})\n"
        "(d,) = disk_readers(repo, repo.resolve('vm1@latest'))\n"
        "print('open', flush=True); sys.stdin.readline()\n"
        "sys.stdout.buffer.write(d.pread(0, d.size)); sys.stdout.flush()\n"
    )
    reader = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert reader.stdout is not None and reader.stdin is not None
        assert reader.stdout.readline() == b"open\n"
        run_cli("--repo", str(r), "delete", "vm1@latest")
        gc = json.loads(run_cli("--repo", str(r), "gc", "--grace", "0", "--json").stdout)
        assert gc["deleted_chunks"] == 0 and gc["deleted_points_kept"] == 1
        refused = run_cli("--repo", str(r), "repair", "--rebuild-index", check=False)
        assert refused.returncode != 0
        assert f"PID {reader.pid} (" in refused.stderr and "Traceback" not in refused.stderr
        assert (r / "index").is_dir()
        reader.stdin.write(b"go\n")
        reader.stdin.flush()
        data = reader.stdout.read()
        assert reader.wait(timeout=60) == 0
        assert data == disk.read_bytes()
    finally:
        if reader.poll() is None:
            reader.send_signal(signal.SIGKILL)
            reader.wait()
    gc = json.loads(run_cli("--repo", str(r), "gc", "--grace", "0", "--json").stdout)
    assert gc["deleted_chunks"] > 0 and gc["deleted_points_purged"] == 1
    res = run_cli("--repo", str(r), "repair", "--rebuild-index")
    assert "0 points" in res.stdout


def test_a_fuse_mount_reads_a_point_pruned_and_collected_meanwhile(tmp_path: Path) -> None:
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        pytest.skip("/dev/fuse or fusermount3 missing")
    r = tmp_path / "R"
    disk = make_image(tmp_path / "disk.img", 8)
    run_cli("--repo", str(r), "init")
    run_cli("--repo", str(r), "backup", "image", str(disk), "--source", "vm1")
    first = json.loads(run_cli("--repo", str(r), "points", "--json").stdout)[0]["id"]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = (tmp_path / "mount.log").open("wb")
    server = subprocess.Popen(
        [str(BIN / "appliance"), "--repo", str(r), "mount", "--foreground", str(mnt)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt):
            assert server.poll() is None, (tmp_path / "mount.log").read_text()
            assert time.monotonic() < deadline, "the mount did not appear"
            time.sleep(0.05)
        with open(mnt / "vm1" / first / "disk0.img", "rb") as fh:
            head = fh.read(1 << 20)
            run_cli("--repo", str(r), "delete", f"vm1@{first}")
            gc = json.loads(run_cli("--repo", str(r), "gc", "--grace", "0", "--json").stdout)
            assert gc["deleted_chunks"] == 0 and gc["deleted_points_kept"] == 1
            rest = fh.read()
        assert head + rest == disk.read_bytes()
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        try:
            server.wait(timeout=30)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
            log.close()
    gc = json.loads(run_cli("--repo", str(r), "gc", "--grace", "0", "--json").stdout)
    assert gc["deleted_chunks"] > 0
