"""Real FUSE mounts of real repositories: raw disks, partitions, file trees, live points,
corrupt chunks, loop devices, the daemon and signals."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
from vfs_testutil import (
    MIB,
    MTIME_NS,
    Images,
    appliance_cmd,
    backup,
    make_tree,
    mounted,
    new_repo,
    run,
    sha256_file,
)

from dedupstore import Repository, backup_tree

pytestmark = pytest.mark.fuse

BLOCK = 65536


def test_raw_disks_match_sources(image_repo: Path, images: Images, tmp_path: Path) -> None:
    with mounted(image_repo, tmp_path / "mnt") as m:
        latest = m.mnt / "vm1" / "latest"
        pid = os.readlink(latest)
        assert sorted(os.listdir(m.mnt / "vm1")) == sorted([pid, "latest"])
        assert sorted(os.listdir(latest)) == ["disk0", "disk0.img", "disk1", "disk1.img"]
        assert sha256_file(latest / "disk0.img") == sha256_file(images.disk0)
        assert sha256_file(latest / "disk1.img") == sha256_file(images.disk1)
        st = os.stat(latest / "disk0.img")
        assert stat.S_ISREG(st.st_mode) and st.st_size == images.disk0.stat().st_size
        with pytest.raises(OSError) as exc:
            os.open(latest / "disk0.img", os.O_RDWR)
        assert exc.value.errno in (errno.EROFS, errno.EACCES)


def test_files_inside_partitions(image_repo: Path, images: Images, tmp_path: Path) -> None:
    with mounted(image_repo, tmp_path / "mnt") as m:
        disk0 = m.mnt / "vm1" / "latest" / "disk0"
        assert sorted(os.listdir(disk0)) == ["p1", "p2", "p3"]
        for root in (disk0 / "p1", m.mnt / "vm1" / "latest" / "disk1" / "fs"):
            assert {"dir", "hello.txt", "small.bin", "link-to-hello"} <= set(os.listdir(root))
            for rel, data in images.files.items():
                assert (root / rel).read_bytes() == data, rel
            assert os.readlink(root / "link-to-hello") == "hello.txt"
            a, b = os.stat(root / "hello.txt"), os.stat(root / "dir" / "hardlink.txt")
            assert a.st_ino == b.st_ino and a.st_nlink == 2
            st = os.stat(root / "dir" / "sub" / "big.bin")
            assert st.st_mtime_ns == MTIME_NS and stat.S_IMODE(st.st_mode) == 0o644
        for name, data in images.fat_files.items():  # FAT partition
            assert (disk0 / "p2" / name).read_bytes() == data
        # p3's filesystem is smashed: an empty directory and a log line, the rest mounts.
        assert os.listdir(disk0 / "p3") == []
        assert "disk0/p3" in m.log_text()


def test_loop_mount_of_image_file(image_repo: Path, images: Images, tmp_path: Path) -> None:
    if shutil.which("losetup") is None or not os.path.exists("/dev/loop-control"):
        pytest.skip("no loop devices")
    target = tmp_path / "ext4"
    target.mkdir()
    with mounted(image_repo, tmp_path / "mnt") as m:
        img = m.mnt / "vm1" / "latest" / "disk0.img"
        loop = run("losetup", "-r", "-f", "--show", "-o", str(images.p1_offset),
                   "--sizelimit", str(16 * MIB), img).strip()
        try:
            run("mount", "-o", "ro", loop, target)
            try:
                for rel, data in images.files.items():
                    assert (target / rel).read_bytes() == data, rel
            finally:
                run("umount", target)
        finally:
            run("losetup", "-d", loop)


def test_single_point_mount(image_repo: Path, images: Images, tmp_path: Path) -> None:
    with mounted(image_repo, tmp_path / "mnt", "vm1@latest", "--allow-other") as m:
        assert sorted(os.listdir(m.mnt)) == ["disk0", "disk0.img", "disk1", "disk1.img"]
        opts = next(line.split()[3] for line in Path("/proc/mounts").read_text().splitlines()
                    if line.split()[1] == str(m.mnt))
        assert {"ro", "allow_other", "default_permissions"} <= set(opts.split(","))
        assert (m.mnt / "disk0" / "p1" / "hello.txt").read_bytes() == b"hello, world\n"


def test_new_point_appears_while_mounted(images: Images, tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    disk = tmp_path / "disk.img"
    shutil.copyfile(images.disk1, disk)
    first = backup(repo, [disk])
    with mounted(repo, tmp_path / "mnt") as m:
        src = m.mnt / "vm1"
        assert os.listdir(src) == sorted([first, "latest"])
        _ = (src / "latest" / "disk0.img").read_bytes()  # warm caches on the old point
        with disk.open("r+b") as f:
            f.seek(5 * MIB)
            f.write(b"second point" * 1000)
        second = backup(repo, [disk])
        deadline = time.monotonic() + 10
        while second not in os.listdir(src):
            assert time.monotonic() < deadline, "new point never appeared"
            time.sleep(0.2)
        deadline = time.monotonic() + 10
        while os.readlink(src / "latest") != second:
            assert time.monotonic() < deadline, "latest never moved"
            time.sleep(0.2)
        assert sha256_file(src / second / "disk0.img") == sha256_file(disk)
        assert sha256_file(src / "latest" / "disk0.img") == sha256_file(disk)
        assert sha256_file(src / first / "disk0.img") == sha256_file(images.disk1)
        assert "vm1" in os.listdir(m.mnt)


def _corrupt_block_of(repo_root: Path, block: bytes) -> None:
    """Flip one byte in the middle of the stored payload of the chunk holding `block`."""
    from dedupstore._pack import pack_path  # test-only peek at the on-disk layout

    with Repository.open(repo_root) as repo:
        loc = repo.index.lookup(repo.chunk_id(block))
        assert loc is not None
        pack_id, offset, stored_len = loc[0], loc[1], loc[2]
        info = repo.index.pack_info(pack_id)
        assert info is not None
        path = pack_path(repo_root, str(info["tier"]), pack_id)
    assert path.is_relative_to(repo_root / "packs")
    with path.open("r+b") as f:
        f.seek(offset + stored_len // 2)
        byte = f.read(1)
        f.seek(offset + stored_len // 2)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_corrupt_chunk_fails_only_its_reads(images: Images, tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    backup(repo, [images.disk1])
    disk = images.disk1.read_bytes()
    big = images.files["dir/sub/big.bin"]
    # A 64 KiB block of the disk that lies wholly inside big.bin (random data: unique).
    bad = next(i for i in range(len(disk) // BLOCK) if disk[i * BLOCK : (i + 1) * BLOCK] in big)
    _corrupt_block_of(repo, disk[bad * BLOCK : (bad + 1) * BLOCK])
    with mounted(repo, tmp_path / "mnt") as m:
        point = m.mnt / "vm1" / "latest"
        fd = os.open(point / "disk0.img", os.O_RDONLY)
        try:
            with pytest.raises(OSError) as exc:
                os.pread(fd, 4096, bad * BLOCK + 100)
            assert exc.value.errno == errno.EIO
            assert os.pread(fd, 4096, 0) == disk[:4096]
            assert os.pread(fd, BLOCK, (bad + 1) * BLOCK) == disk[(bad + 1) * BLOCK :
                                                                  (bad + 2) * BLOCK]
        finally:
            os.close(fd)
        fs = point / "disk0" / "fs"
        with pytest.raises(OSError) as exc:
            (fs / "dir" / "sub" / "big.bin").read_bytes()
        assert exc.value.errno == errno.EIO
        for rel in ("hello.txt", "small.bin", "dir/medium.bin", "dir/text.txt"):
            assert (fs / rel).read_bytes() == images.files[rel], rel
        assert os.path.ismount(m.mnt)
        assert "checksum mismatch" in m.log_text()


def test_file_tree_point(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    files = make_tree(src)
    os.chown(src / "small.bin", 1234, 5678)
    os.chmod(src / "small.bin", 0o640)
    os.setxattr(src / "hello.txt", "user.color", b"blue")
    os.mkfifo(src / "fifo")
    (src / "dir" / "sparse").write_bytes(b"")
    with (src / "dir" / "sparse").open("r+b") as f:
        f.seek(3 * MIB)
        f.write(b"end")
    os.utime(src / "small.bin", ns=(MTIME_NS, MTIME_NS + 123456789))
    repo = new_repo(tmp_path / "repo")
    with Repository.open(repo, writable=True) as r:
        backup_tree(r, src, source="fs1")
    with mounted(repo, tmp_path / "mnt") as m:
        root = m.mnt / "fs1" / "latest" / "files"
        for rel, data in files.items():
            assert (root / rel).read_bytes() == data, rel
        st = os.stat(root / "small.bin")
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o640)
        assert st.st_mtime_ns == MTIME_NS + 123456789
        assert os.readlink(root / "link-to-hello") == "hello.txt"
        a, b = os.stat(root / "hello.txt"), os.stat(root / "dir" / "hardlink.txt")
        assert a.st_ino == b.st_ino and a.st_nlink == 2
        assert os.getxattr(root / "hello.txt", "user.color") == b"blue"
        assert "user.color" in os.listxattr(root / "hello.txt")
        with pytest.raises(OSError) as exc:
            os.getxattr(root / "hello.txt", "user.nope")
        assert exc.value.errno == errno.ENODATA
        assert stat.S_ISFIFO(os.lstat(root / "fifo").st_mode)
        sparse = (root / "dir" / "sparse").read_bytes()
        assert len(sparse) == 3 * MIB + 3 and sparse[-3:] == b"end" and not any(sparse[:-3])


def _servers_of(mnt: Path) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"mount" in argv and str(mnt).encode() in argv:
                pids.append(int(d.name))
    return pids


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper that is not us counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_daemon_mount_busy_umount(image_repo: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        proc = subprocess.run(appliance_cmd(image_repo, "mount", str(mnt)), capture_output=True,
                              text=True, timeout=30, check=False)
        assert proc.returncode == 0, proc.stderr
        assert os.path.ismount(mnt)  # up when the command returns
        fd = os.open(mnt / "vm1" / "latest" / "disk0.img", os.O_RDONLY)
        try:
            busy = subprocess.run(appliance_cmd(image_repo, "umount", str(mnt)),
                                  capture_output=True, text=True, check=False)
            assert busy.returncode != 0
            assert f"{mnt} is busy" in busy.stderr
        finally:
            os.close(fd)
        servers = _servers_of(mnt)
        assert servers, "no daemon found"
        ok = subprocess.run(appliance_cmd(image_repo, "umount", str(mnt)), capture_output=True,
                            text=True, check=False)
        assert ok.returncode == 0, ok.stderr
        assert not os.path.ismount(mnt)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in servers):
            assert time.monotonic() < deadline, "daemon still running after umount"
            time.sleep(0.1)
        again = subprocess.run(appliance_cmd(image_repo, "umount", str(mnt)),
                               capture_output=True, text=True, check=False)
        assert again.returncode != 0 and "not mounted" in again.stderr
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


def test_mount_errors_are_one_line(image_repo: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run(appliance_cmd(image_repo, "mount", str(mnt), "vm9@latest"),
                          capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and "vm9" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.ismount(mnt)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_cleanly(image_repo: Path, tmp_path: Path, signum: int) -> None:
    with mounted(image_repo, tmp_path / "mnt") as m:
        assert os.listdir(m.mnt) == ["vm1"]
        m.proc.send_signal(signum)
        assert m.proc.wait(timeout=15) == 0, m.log_text()
        assert not os.path.ismount(m.mnt)
