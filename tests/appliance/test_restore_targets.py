"""A whole-disk restore refuses targets in use and asks before overwriting data (item 15).

Real loop devices (losetup), real ext4 mounts, real swap; everything is detached, unmounted
and switched off in `finally` blocks, and helper processes are stopped by PID.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from testlib import make_image, run_cli, sha256_file

MIB = 1 << 20


def sh(*cmd: str | Path) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    return proc.stdout


@pytest.fixture
def point(tmp_path: Path) -> tuple[str, Path]:
    """(repository, source image) with one 4 MiB image point `vm@latest`."""
    img = make_image(tmp_path / "disk.img", 4)
    repo = str(tmp_path / "r")
    run_cli("--repo", repo, "init")
    run_cli("--repo", repo, "backup", "image", str(img), "--source", "vm")
    return repo, img


@contextlib.contextmanager
def loop_device(backing: Path, *, partscan: bool = False) -> Iterator[Path]:
    if shutil.which("losetup") is None or not Path("/dev/loop-control").exists():
        pytest.skip("loop devices unavailable")
    args = ["losetup", "-f", "--show", *(["-P"] if partscan else []), str(backing)]
    dev = Path(sh(*args).strip())
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", str(dev)], check=True)


@contextlib.contextmanager
def mounted(dev: Path, mnt: Path) -> Iterator[Path]:
    mnt.mkdir()
    sh("mount", "-t", "ext4", dev, mnt)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def backing_file(path: Path, size: int, fill: bytes = b"\0") -> Path:
    with path.open("wb") as fh:
        if fill == b"\0":
            fh.truncate(size)
        else:
            fh.write(fill * size)
    return path


def wait_for(path: Path, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def refused(repo: str, dest: Path, *extra: str) -> str:
    res = run_cli("--repo", repo, "restore", "vm@latest", str(dest), *extra, check=False, input="")
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    return res.stderr


def test_mounted_device_is_refused_even_with_force(point: tuple[str, Path], tmp_path: Path) -> None:
    repo, _img = point
    back = backing_file(tmp_path / "back.img", 8 * MIB)
    with loop_device(back) as dev:
        sh("mkfs.ext4", "-q", "-F", dev)
        with mounted(dev, tmp_path / "mnt") as mnt:
            (mnt / "live.txt").write_bytes(b"live data\n")
            err = refused(repo, dev, "--force")
            assert f"{dev} is in use" in err and f"mounted at {mnt}" in err
            assert (mnt / "live.txt").read_bytes() == b"live data\n"
        sh("e2fsck", "-fn", dev)  # the filesystem was not touched


def test_mounted_partition_is_refused(point: tuple[str, Path], tmp_path: Path) -> None:
    repo, _img = point
    back = backing_file(tmp_path / "back.img", 16 * MIB)
    subprocess.run(["sfdisk", "-q", str(back)], input="label: dos\n2048,,L\n", text=True,
                   check=True, capture_output=True)  # fmt: skip
    with loop_device(back, partscan=True) as dev:
        sysfs = Path(f"/sys/class/block/{dev.name}/{dev.name}p1/dev")
        if not sysfs.exists():  # some kernels scan loop partitions only when asked
            sh("partx", "-a", dev)
        wait_for(sysfs)
        part = Path(f"{dev}p1")
        if not part.exists():  # /dev without devtmpfs/udev: make the node from sysfs
            major, minor = map(int, sysfs.read_text().split(":"))
            part = tmp_path / f"{dev.name}p1"
            os.mknod(part, 0o600 | stat.S_IFBLK, os.makedev(major, minor))
        sh("mkfs.ext4", "-q", "-F", part)
        with mounted(part, tmp_path / "mnt"):
            err = refused(repo, dev, "--force")
        assert f"partition {part.name} is mounted at {tmp_path / 'mnt'}" in err
        sh("e2fsck", "-fn", part)  # the filesystem was not touched


def test_swap_device_is_refused(point: tuple[str, Path], tmp_path: Path) -> None:
    repo, _img = point
    back = backing_file(tmp_path / "back.img", 8 * MIB)
    with loop_device(back) as dev:
        sh("mkswap", dev)
        sh("swapon", dev)
        try:
            err = refused(repo, dev, "--force")
        finally:
            subprocess.run(["swapoff", str(dev)], check=True)
    assert "is active swap" in err


def test_exclusively_open_device_is_refused(point: tuple[str, Path], tmp_path: Path) -> None:
    """Someone else holds the kernel's exclusive claim (as a mount or an MD array would)."""
    repo, _img = point
    back = backing_file(tmp_path / "back.img", 8 * MIB, b"\xa5")
    with loop_device(back) as dev:
        holder = subprocess.Popen(
            [sys.executable, "-c",
             f"import os,sys; fd=os.open({str(dev)!r}, os.O_RDONLY|os.O_EXCL); "
             "print('ready', flush=True); sys.stdin.read()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
            err = refused(repo, dev, "--force")
        finally:
            holder.kill()
            holder.wait()
    assert "open exclusively" in err
    assert back.read_bytes() == b"\xa5" * (8 * MIB)


def test_a_holder_of_the_device_is_refused(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A device-mapper or MD holder (LVM, RAID) makes a device in use. This host kernel has
    neither dm nor md (PLATFORM.md), so no real holder can be made here: the sysfs directory
    the check reads is a copy of a real loop device's entry with a holder added, the way the
    kernel lists one under /sys/dev/block/M:N/holders/."""
    from appliance import _targets

    back = backing_file(tmp_path / "back.img", 4 * MIB)
    with loop_device(back) as dev:
        rdev = os.stat(dev).st_rdev
        fake = tmp_path / "sys-dev-block"
        holders = fake / f"{os.major(rdev)}:{os.minor(rdev)}" / "holders"
        holders.mkdir(parents=True)
        assert _targets.in_use(_targets.inspect_target(Path(dev))) is None
        (holders / "md127").mkdir()
        monkeypatch.setattr(_targets, "_SYS_DEV_BLOCK", fake)
        why = _targets.in_use(_targets.inspect_target(Path(dev)))
    assert why is not None and "held by md127" in why


def test_device_holding_data_needs_force(point: tuple[str, Path], tmp_path: Path) -> None:
    repo, img = point
    back = backing_file(tmp_path / "back.img", 4 * MIB, b"\xa5")
    with loop_device(back) as dev:
        err = refused(repo, dev)
        assert "holds data" in err and "--force" in err
        assert back.read_bytes() == b"\xa5" * (4 * MIB)
        run_cli("--repo", repo, "restore", "vm@latest", str(dev), "--force", input="")
    assert sha256_file(back) == sha256_file(img)


def test_blank_device_needs_no_confirmation(point: tuple[str, Path], tmp_path: Path) -> None:
    repo, img = point
    back = backing_file(tmp_path / "back.img", 4 * MIB)
    with loop_device(back) as dev:
        run_cli("--repo", repo, "restore", "vm@latest", str(dev), input="")
    assert sha256_file(back) == sha256_file(img)


def test_file_targets(point: tuple[str, Path], tmp_path: Path) -> None:
    """A new file or an empty/sparse one is written; one with data needs --force."""
    repo, img = point
    run_cli("--repo", repo, "restore", "vm@latest", str(tmp_path / "new.img"), input="")
    assert sha256_file(tmp_path / "new.img") == sha256_file(img)
    sparse = backing_file(tmp_path / "sparse.img", 64 * MIB)
    run_cli("--repo", repo, "restore", "vm@latest", str(sparse), input="")
    assert sha256_file(sparse) == sha256_file(img)
    full = tmp_path / "full.img"
    full.write_bytes(b"precious")
    err = refused(repo, full)
    assert f"{full} (file, 8 B) holds data; pass --force" in err
    assert full.read_bytes() == b"precious"
    run_cli("--repo", repo, "restore", "vm@latest", str(full), "--force", input="")
    assert sha256_file(full) == sha256_file(img)


def test_file_backing_a_loop_device_is_refused(point: tuple[str, Path], tmp_path: Path) -> None:
    repo, _img = point
    back = backing_file(tmp_path / "back.img", 4 * MIB, b"\xa5")
    with loop_device(back) as dev:
        err = refused(repo, back, "--force")
        assert f"backs {dev}" in err
    assert back.read_bytes() == b"\xa5" * (4 * MIB)


def test_typed_confirmation_on_a_terminal(point: tuple[str, Path], tmp_path: Path) -> None:
    repo, img = point
    target = tmp_path / "target.img"
    target.write_bytes(b"precious")

    def restore_typing(answer: str) -> subprocess.CompletedProcess[str]:
        master, slave = os.openpty()
        try:
            os.write(master, answer.encode() + b"\n")
            return subprocess.run(
                [str(Path(sys.executable).parent / "appliance"), "--repo", repo, "restore",
                 "vm@latest", str(target)],
                stdin=slave, capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
        finally:
            os.close(slave)
            os.close(master)

    no = restore_typing("yes")  # the target's name is asked for, not "yes"
    assert no.returncode == 2 and "not confirmed" in no.stderr, no.stderr
    assert "Type 'target.img' to overwrite it" in no.stdout
    assert target.read_bytes() == b"precious"
    ok = restore_typing("target.img")
    assert ok.returncode == 0, ok.stderr
    assert sha256_file(target) == sha256_file(img)


def test_restore_image_claims_the_device(point: tuple[str, Path], tmp_path: Path) -> None:
    """The library call opens a block device O_EXCL: a mounted one fails, nothing written."""
    from dedupstore import Locked, Repository, restore_image

    repo, _img = point
    back = backing_file(tmp_path / "back.img", 8 * MIB)
    with loop_device(back) as dev:
        sh("mkfs.ext4", "-q", "-F", dev)
        with (
            mounted(dev, tmp_path / "mnt"),
            Repository.open(Path(repo)) as r,
            pytest.raises(Locked, match="in use"),
        ):
            restore_image(r, r.resolve("vm@latest"), dev)
        sh("e2fsck", "-fn", dev)
