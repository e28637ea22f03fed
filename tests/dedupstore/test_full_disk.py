"""A full disk is a clear error that loses nothing: earlier points stay intact."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from testlib import make_image, run_cli, sha256_file


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)],
                         capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {res.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_backup_on_full_disk(small_fs: Path, tmp_path: Path) -> None:
    repo = str(small_fs / "repo")
    small = make_image(tmp_path / "small.img", 4, seed=1)
    big = tmp_path / "big.img"
    big.write_bytes(os.urandom(40 << 20))  # incompressible, larger than the filesystem
    run_cli("--repo", repo, "init")
    run_cli("--repo", repo, "backup", "image", str(small), "--source", "ok", "--mode", "full")
    res = run_cli("--repo", repo, "backup", "image", str(big), "--source", "big", check=False)
    assert res.returncode != 0
    assert "no space left" in res.stderr.lower()
    assert "Traceback" not in res.stderr
    # nothing half-made is visible, the earlier point is intact and verifies
    pts = run_cli("--repo", repo, "points").stdout
    assert "ok@" in pts and "big@" not in pts
    # free space again by removing the salvage leftovers through the next writer + gc
    gc = run_cli("--repo", repo, "gc", warnings_ok=True)
    assert "deleting unindexed pack" in gc.stderr  # the half-written pack, named
    assert run_cli("--repo", repo, "verify").returncode == 0
    run_cli("--repo", repo, "restore", "ok@latest", str(tmp_path / "out.img"))
    assert sha256_file(tmp_path / "out.img") == sha256_file(small)
