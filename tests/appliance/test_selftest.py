"""`appliance selftest`: the real store, NBD and FUSE paths on a throw-away repository."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from testlib import run_cli


@pytest.mark.fuse
@pytest.mark.nbd_client
def test_selftest_passes_here_and_cleans_up(tmp_path: Path) -> None:
    env = {"TMPDIR": str(tmp_path)}
    res = run_cli("selftest", "--json", env=env)
    out = json.loads(res.stdout)
    assert out["ok"] is True
    assert [(s["name"], s["status"]) for s in out["steps"]] == [
        ("store", "ok"), ("nbd", "ok"), ("fuse", "ok")]  # fmt: skip
    assert list(tmp_path.iterdir()) == []  # its temporary directory is gone, nothing mounted
    text = run_cli("selftest", env=env).stdout.splitlines()
    assert text[-1] == "selftest OK"


def test_selftest_skips_what_this_machine_lacks(tmp_path: Path) -> None:
    """Without nbdkit and fusermount3 on PATH those parts are skipped, not failed."""
    keep = tmp_path / "kept"
    res = run_cli("selftest", "--json", "--keep", str(keep),
                  env={"PATH": "/nonexistent"})  # fmt: skip
    out = json.loads(res.stdout)
    assert out["ok"] is True
    assert [(s["name"], s["status"]) for s in out["steps"]] == [
        ("store", "ok"), ("nbd", "skipped"), ("fuse", "skipped")]  # fmt: skip
    assert "nbdkit not installed" in out["steps"][1]["detail"]
    (work,) = keep.iterdir()  # --keep leaves the repository for a look
    assert (work / "repo" / "config.json").is_file()
    assert not os.path.ismount(work / "mnt")
