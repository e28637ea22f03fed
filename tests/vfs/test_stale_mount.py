"""A mount whose daemon was killed (kill -9) is recognised and cleared (issue 8 item 17).

The kernel keeps such a mount listed while every access fails with ENOTCONN; `os.path.ismount`
says no. Both `appliance umount MNT` and `appliance mount MNT` must lazily unmount it, say so
in one line, and (for mount) go on to mount.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vfs_testutil import REPO_ROOT, appliance_cmd, fuse_available


def _listed(mnt: Path) -> bool:
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return any(line.split()[4] == str(mnt) for line in lines)


def _kill_server(repo: Path, mnt: Path) -> None:
    """Run `appliance mount --foreground MNT`, wait for the mount, then SIGKILL it by PID."""
    proc = subprocess.Popen(
        appliance_cmd(repo, "mount", "--foreground", str(mnt)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(mnt):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "mount did not appear"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    # The state users meet: listed by the kernel, and once the kernel's cached attributes of
    # MNT expire (the repository root's are live: one second) every access fails.
    assert _listed(mnt)
    deadline = time.monotonic() + 30
    while True:
        try:
            os.stat(mnt)
        except OSError as exc:
            assert exc.errno == errno.ENOTCONN
            break
        assert time.monotonic() < deadline, "stat of the dead mount kept succeeding"
        time.sleep(0.1)
    assert not os.path.ismount(mnt)


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    if not fuse_available():
        pytest.skip("/dev/fuse or fusermount3 missing")
    m = tmp_path / "mnt"
    m.mkdir()
    try:
        yield m
    finally:
        while _listed(m):  # stale or live: a lazy unmount clears either; a daemon then exits
            subprocess.run(["fusermount3", "-u", "-z", str(m)], check=True)


def _run(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        appliance_cmd(repo, *args),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO_ROOT,
    )


def test_umount_clears_a_stale_mount(image_repo: Path, mnt: Path) -> None:
    _kill_server(image_repo, mnt)
    res = _run(image_repo, "umount", str(mnt))
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("\n") == 1 and f"cleared a stale mount at {mnt}" in res.stderr
    assert not _listed(mnt)
    again = _run(image_repo, "umount", str(mnt))
    assert again.returncode != 0 and "not mounted" in again.stderr


def test_mount_clears_a_stale_mount_and_mounts(image_repo: Path, mnt: Path) -> None:
    _kill_server(image_repo, mnt)
    res = _run(image_repo, "mount", str(mnt))
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("\n") == 1 and f"cleared a stale mount at {mnt}" in res.stderr
    assert os.listdir(mnt) == ["vm1"]  # the new daemon serves it
    done = _run(image_repo, "umount", str(mnt))
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert not _listed(mnt)


FOREIGN_SERVER = """
import sys, pyfuse3, trio
pyfuse3.init(pyfuse3.Operations(), sys.argv[1], {"ro", "fsname=someone-else", "subtype=other"})
print("ready", flush=True)
trio.run(pyfuse3.main)
"""


def test_a_stale_mount_not_ours_is_left_alone(image_repo: Path, mnt: Path) -> None:
    """Another program's dead FUSE mount: named, with the command that clears it, not cleared."""
    proc = subprocess.Popen(
        [sys.executable, "-c", FOREIGN_SERVER, str(mnt)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert _listed(mnt)
    for cmd in ("umount", "mount"):
        res = _run(image_repo, cmd, str(mnt))
        assert res.returncode == 2, res.stderr
        assert "a stale FUSE mount of someone-else (fuse.other), not ours" in res.stderr
        assert f"fusermount3 -u -z {mnt}" in res.stderr
        assert _listed(mnt)
