"""`appliance key ...` end to end (issue 8 item 18): the old passphrase is refused afterwards
with a clear one-line error and a non-zero exit; new passphrases never on the command line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from testlib import make_image, run_cli, sha256_file

OLD = {"APPLIANCE_PASSPHRASE": "old pass"}


def _refused(r: str, pw: str) -> None:
    res = run_cli("--repo", r, "points", env={"APPLIANCE_PASSPHRASE": pw}, check=False)
    assert res.returncode != 0
    assert "wrong passphrase" in res.stderr and "Traceback" not in res.stderr


def _restores(r: str, pw: str, img: Path, out: Path) -> None:
    run_cli("--repo", r, "restore", "vm1@latest", str(out), env={"APPLIANCE_PASSPHRASE": pw})
    assert sha256_file(out) == sha256_file(img)
    out.unlink()


def test_key_passwd_add_remove_export_import(tmp_path: Path) -> None:
    r = str(tmp_path / "r")
    img = make_image(tmp_path / "disk.img", 2)
    out = tmp_path / "out.img"
    run_cli("--repo", r, "init", "--encryption", "aes-256-gcm", env=OLD)
    run_cli("--repo", r, "backup", "image", str(img), "--source", "vm1", env=OLD)
    export = tmp_path / "key.json"
    paper = tmp_path / "key.txt"
    run_cli("--repo", r, "key", "export", str(export))
    assert oct(export.stat().st_mode & 0o777) == "0o600"
    paper.write_text(run_cli("--repo", r, "key", "export", "--paper").stdout)
    assert "DR Appliance repository key" in paper.read_text()

    # passwd: a wrong current passphrase is refused before anything changes
    bad = run_cli(
        "--repo",
        r,
        "key",
        "passwd",
        check=False,
        env={"APPLIANCE_PASSPHRASE": "nope", "APPLIANCE_NEW_PASSPHRASE": "x"},
    )
    assert bad.returncode != 0 and "wrong passphrase" in bad.stderr
    no_new = run_cli("--repo", r, "key", "passwd", env=OLD, check=False, input="")
    assert no_new.returncode != 0 and "APPLIANCE_NEW_PASSPHRASE" in no_new.stderr
    run_cli("--repo", r, "key", "passwd",
            env={**OLD, "APPLIANCE_NEW_PASSPHRASE": "new pass"})  # fmt: skip
    _refused(r, "old pass")
    _restores(r, "new pass", img, out)

    # a second key, then remove the first with it
    run_cli(
        "--repo",
        r,
        "key",
        "add",
        "--name",
        "offsite",
        env={"APPLIANCE_PASSPHRASE": "new pass", "APPLIANCE_NEW_PASSPHRASE": "second"},
    )
    keys = json.loads(run_cli("--repo", r, "key", "list", "--json").stdout)
    assert [k["name"] for k in keys] == ["default", "offsite"]
    _restores(r, "second", img, out)
    run_cli("--repo", r, "key", "remove", keys[0]["id"], env={"APPLIANCE_PASSPHRASE": "second"})
    _refused(r, "new pass")
    last = run_cli("--repo", r, "key", "remove", keys[1]["id"], check=False,
                   env={"APPLIANCE_PASSPHRASE": "second"})  # fmt: skip
    assert last.returncode != 0 and "last key" in last.stderr

    # import the export (the original key, old passphrase) back
    run_cli("--repo", r, "key", "import", str(export), env=OLD)
    _restores(r, "old pass", img, out)
    run_cli("--repo", r, "key", "import", "--paper", str(paper), env=OLD)
    assert len(json.loads(run_cli("--repo", r, "key", "list", "--json").stdout)) == 2

    # unencrypted repository: a clear error
    p = str(tmp_path / "plain")
    run_cli("--repo", p, "init")
    res = run_cli("--repo", p, "key", "list", check=False)
    assert res.returncode != 0 and "not encrypted" in res.stderr


def test_mount_daemon_environ_holds_no_passphrase(tmp_path: Path) -> None:
    """`appliance mount` forks a long-lived daemon: the passphrase it was started with must
    not be readable in /proc/<pid>/environ for the daemon's life."""
    if not Path("/dev/fuse").exists():
        pytest.skip("/dev/fuse missing")
    r = str(tmp_path / "r")
    img = make_image(tmp_path / "disk.img", 1)
    run_cli("--repo", r, "init", "--encryption", "aes-256-gcm", env=OLD)
    run_cli("--repo", r, "backup", "image", str(img), "--source", "vm1", env=OLD)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run_cli("--repo", r, "mount", str(mnt), "vm1@latest", env=OLD)
    try:
        daemons = [
            int(pid) for pid in os.listdir("/proc") if pid.isdigit()
            and str(mnt).encode() in _read(f"/proc/{pid}/cmdline")
        ]  # fmt: skip
        assert daemons
        for pid in daemons:
            assert OLD["APPLIANCE_PASSPHRASE"].encode() not in _read(f"/proc/{pid}/environ")
        assert sha256_file(mnt / "disk0.img") == sha256_file(img)
    finally:
        run_cli("umount", str(mnt), check=False)


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError:
        return b""
