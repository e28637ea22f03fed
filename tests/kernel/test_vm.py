"""VM tests for kernel/: the test disk, the rescue ISO, and a full bare-metal restore over NBD.

Each guest is Debian's kernel under QEMU TCG (about 6-10 s per boot here); every boot is bounded by
a timeout and every process (QEMU, qemu-nbd) is stopped by PID, even on failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from subprocess import Popen

import pytest
from testlib import sha256_file
from vmutil import free_tcp_port, managed_process, run_qemu, wait_tcp

from kernel.iso import GRUB_BANNER, build_iso
from kernel.rescue import RESCUE_CMDLINE, restore_cmdline
from kernel.testdisk import (
    PARTITION_START_LBA,
    SECTOR,
    build_boot_disk,
    guest_pattern,
    guest_write_lba,
)

log = logging.getLogger(__name__)

pytestmark = [pytest.mark.vm, pytest.mark.slow]

BOOT_TIMEOUT_S = 90
FAIL_ON = ("Kernel panic", "No bootable device", "RESTORE FAILED", "NO DISK")


def read_sector(path: Path, lba: int) -> bytes:
    with path.open("rb") as f:
        f.seek(lba * SECTOR)
        return f.read(SECTOR)


def boot_test_disk(disk: Path, marker: str, log_path: Path) -> str:
    """Boot a test disk from a raw file until it powers off; check its output; return the log."""
    expected_read = hashlib.sha256(read_sector(disk, PARTITION_START_LBA)).hexdigest()
    result = run_qemu(
        ["-drive", f"file={disk},format=raw,if=ide"],
        serial_log=log_path,
        wait_for=f"{marker} DONE",
        fail_on=FAIL_ON,
        timeout_s=BOOT_TIMEOUT_S,
        expect_exit=True,
    )
    log.info("test disk %s: DONE after %.1fs", marker, result.elapsed_s)
    assert f"{marker} BOOTED" in result.log
    assert f"READ {expected_read}" in result.log
    lba = guest_write_lba(disk.stat().st_size)
    assert f"WROTE {lba}" in result.log
    assert read_sector(disk, lba) == guest_pattern(marker)
    return result.log


def test_testdisk_boots_from_raw_file(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    build_boot_disk(disk, marker="TD1")
    before = disk.read_bytes()
    boot_test_disk(disk, "TD1", tmp_path / "serial.log")
    after = disk.read_bytes()
    lba = guest_write_lba(len(before))
    # the guest changed exactly its one sector
    assert before[: lba * SECTOR] == after[: lba * SECTOR]
    assert before[(lba + 1) * SECTOR :] == after[(lba + 1) * SECTOR :]


@pytest.mark.parametrize("medium", ["cdrom", "usb"])
def test_rescue_iso_boots_with_bios(
    tmp_path: Path, rescue_files: tuple[Path, Path], medium: str
) -> None:
    """SeaBIOS boots the hybrid ISO as a CD (El Torito, isolinux) and as a USB disk (MBR)."""
    kernel, initrd = rescue_files
    iso = tmp_path / "rescue.iso"
    build_iso(iso, kernel, initrd, RESCUE_CMDLINE)
    media = (["-cdrom", str(iso)] if medium == "cdrom"
             else ["-drive", f"file={iso},format=raw,if=ide,snapshot=on"])  # fmt: skip
    result = run_qemu(
        media,
        serial_log=tmp_path / "serial.log",
        wait_for="starting a shell",
        fail_on=FAIL_ON,
        timeout_s=BOOT_TIMEOUT_S,
        memory_mib=128,  # QEMU's default: `qemu-system-x86_64 -cdrom rescue.iso` must work
    )
    log.info("rescue ISO (BIOS, %s): shell after %.1fs", medium, result.elapsed_s)
    assert "RESCUE READY" in result.log
    assert "ISOLINUX" in result.log


OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


@pytest.mark.parametrize("medium", ["cdrom", "usb"])
def test_rescue_iso_boots_uefi(tmp_path: Path, rescue_files: tuple[Path, Path],
                               medium: str) -> None:  # fmt: skip
    """OVMF boots the same ISO through its UEFI El Torito image (CD) or its ESP partition (USB)."""
    if not (OVMF_CODE.exists() and OVMF_VARS.exists()):
        pytest.skip("UEFI firmware missing (apt-get install ovmf)")
    kernel, initrd = rescue_files
    iso = tmp_path / "rescue.iso"
    build_iso(iso, kernel, initrd, RESCUE_CMDLINE)
    vars_fd = tmp_path / "OVMF_VARS.fd"
    shutil.copyfile(OVMF_VARS, vars_fd)
    media = (["-cdrom", str(iso)] if medium == "cdrom"
             else ["-drive", f"file={iso},format=raw,if=ide,snapshot=on"])  # fmt: skip
    result = run_qemu(
        ["-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
         "-drive", f"if=pflash,format=raw,file={vars_fd}", *media],
        serial_log=tmp_path / "serial.log",
        wait_for="starting a shell",
        fail_on=(*FAIL_ON, "error: "),  # a GRUB error stops at its menu: fail at once
        timeout_s=BOOT_TIMEOUT_S,
        memory_mib=512,  # Debian's GRUB 2.06 EFI loader says "out of memory" at 256 MiB
    )  # fmt: skip
    log.info("rescue ISO (UEFI, %s): shell after %.1fs", medium, result.elapsed_s)
    assert GRUB_BANNER in result.log  # UEFI path: GRUB, not isolinux
    assert "ISOLINUX" not in result.log
    assert "RESCUE READY" in result.log


@contextlib.contextmanager
def serve_raw(image: Path, export: str, port: int, log_path: Path) -> Iterator[Popen[bytes]]:
    """qemu-nbd serving ``image`` read-only as ``export`` on 127.0.0.1:``port`` (stopped by PID)."""
    cmd = ["qemu-nbd", "--read-only", "--persistent", "--shared=8", "--format=raw",
           f"--export-name={export}", "--bind=127.0.0.1", f"--port={port}", str(image)]  # fmt: skip
    with managed_process(cmd, log_path=log_path) as proc:
        wait_tcp("127.0.0.1", port)
        yield proc


needs_qemu_nbd = pytest.mark.skipif(
    shutil.which("qemu-nbd") is None, reason="qemu-nbd (qemu-utils) missing"
)


@needs_qemu_nbd
@pytest.mark.parametrize("zero", [True, False], ids=["dest-is-zero", "dest-dirty"])
def test_rescue_restores_disk_over_nbd(
    tmp_path: Path, rescue_files: tuple[Path, Path], zero: bool
) -> None:
    kernel, initrd = rescue_files
    source = tmp_path / "source.img"
    build_boot_disk(source, marker="RESTORED")
    source_sha = sha256_file(source)
    size = source.stat().st_size
    target = tmp_path / "target.img"
    with target.open("wb") as f:
        f.truncate(size)
        if not zero:  # a used disk: garbage everywhere, nbdcopy must zero the holes
            f.write(b"\xa5" * size)

    port = free_tcp_port()
    with serve_raw(source, "point", port, tmp_path / "qemu-nbd.log") as nbd:
        qemu_args = [
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", restore_cmdline(f"nbd://10.0.2.2:{port}/point", zero=zero),
            "-drive", f"file={target},format=raw,if=ide",
            "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0",
        ]  # fmt: skip
        result = run_qemu(
            qemu_args,
            serial_log=tmp_path / "rescue.log",
            wait_for="RESTORE OK",
            fail_on=FAIL_ON,
            timeout_s=BOOT_TIMEOUT_S,
            expect_exit=True,  # restore.reboot=1 + -no-reboot: QEMU exits
        )
        assert nbd.poll() is None, "qemu-nbd died during the restore"
    log.info("rescue restore: RESTORE OK after %.1fs", result.elapsed_s)
    m = re.search(r"RESTORE OK (\d+)", result.log)
    assert m and int(m.group(1)) == size
    assert sha256_file(target) == source_sha
    if zero:  # --destination-is-zero: zero extents were skipped, the target stayed sparse
        assert target.stat().st_blocks * 512 < size

    boot_test_disk(target, "RESTORED", tmp_path / "target.log")


@needs_qemu_nbd
def test_rescue_restores_two_disks_in_order(
    tmp_path: Path, rescue_files: tuple[Path, Path]
) -> None:
    """restore.src/restore.dst lists: disk0 onto /dev/sda, disk1 onto /dev/sdb."""
    kernel, initrd = rescue_files
    sources = [tmp_path / "disk0.img", tmp_path / "disk1.img"]
    build_boot_disk(sources[0], marker="TWODISK")
    sources[1].write_bytes(os.urandom(6 << 20) + bytes(2 << 20))
    targets = [tmp_path / "t0.img", tmp_path / "t1.img"]
    for src, dst in zip(sources, targets, strict=True):
        with dst.open("wb") as f:
            f.truncate(src.stat().st_size)
    ports = [free_tcp_port(), free_tcp_port()]
    with contextlib.ExitStack() as stack:
        for i, (src, port) in enumerate(zip(sources, ports, strict=True)):
            stack.enter_context(serve_raw(src, f"d{i}", port, tmp_path / f"qemu-nbd{i}.log"))
        cmdline = restore_cmdline(
            f"nbd://10.0.2.2:{ports[0]}/d0,nbd://10.0.2.2:{ports[1]}/d1",
            dst="/dev/sda,/dev/sdb", zero=True,
        )
        result = run_qemu(
            ["-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
             "-drive", f"file={targets[0]},format=raw,if=ide,index=0",
             "-drive", f"file={targets[1]},format=raw,if=ide,index=1",
             "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"],
            serial_log=tmp_path / "rescue.log", wait_for="RESTORE OK", fail_on=FAIL_ON,
            timeout_s=BOOT_TIMEOUT_S, expect_exit=True,
        )  # fmt: skip
    assert f"-> /dev/sda ({sources[0].stat().st_size} bytes)" in result.log
    assert f"-> /dev/sdb ({sources[1].stat().st_size} bytes)" in result.log
    total = sum(src.stat().st_size for src in sources)
    assert re.search(rf"RESTORE OK {total}\b", result.log)
    for src, dst in zip(sources, targets, strict=True):
        assert sha256_file(dst) == sha256_file(src)
    boot_test_disk(targets[0], "TWODISK", tmp_path / "t0.log")


def test_rescue_reports_failure_and_stays(
    tmp_path: Path, rescue_files: tuple[Path, Path]
) -> None:
    kernel, initrd = rescue_files
    target = tmp_path / "target.img"
    with target.open("wb") as f:
        f.truncate(16 << 20)
    port = free_tcp_port()  # nothing listens there
    qemu_args = [
        "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", restore_cmdline(f"nbd://10.0.2.2:{port}/point"),
        "-drive", f"file={target},format=raw,if=ide",
        "-netdev", "user,id=n0", "-device", "e1000,netdev=n0",
    ]  # fmt: skip
    # a failed restore never reboots (restore.reboot=1 is for success): the machine stays in
    # the rescue system with the reason on its console
    result = run_qemu(
        qemu_args,
        serial_log=tmp_path / "rescue.log",
        wait_for="RESCUE HALTED",
        fail_on=tuple(x for x in FAIL_ON if x != "RESTORE FAILED"),
        timeout_s=BOOT_TIMEOUT_S,
    )
    assert not result.exited
    assert "RESTORE FAILED cannot reach" in result.log and "RESTORE OK" not in result.log
    assert "DHCP eth0" in result.log  # the e1000 driver came up
