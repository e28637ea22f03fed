"""Build-only tests for kernel/ (no VM): disk layout, initramfs contents, ISO, CLI, vmutil."""

from __future__ import annotations

import gzip
import os
import re
import struct
import subprocess
import time
from pathlib import Path

import pytest
from vmutil import QemuError, free_tcp_port, qemu_vm, run_qemu

from kernel.__main__ import main
from kernel.initramfs import CpioWriter, KernelBuildError, ModuleTree, find_kernel
from kernel.iso import IsoEntry, build_iso, grub_cfg
from kernel.rescue import build_rescue_initramfs, restore_cmdline
from kernel.testdisk import (
    MBR_BIN,
    build_boot_disk,
    build_initramfs,
    guest_pattern,
    guest_write_lba,
    marker_cmdline,
)


def cpio_list(data: bytes) -> dict[str, int]:
    """name -> mode of every entry in a newc archive (parsed independently of CpioWriter)."""
    entries: dict[str, int] = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        pos += filesize + (-filesize % 4)
        if name == "TRAILER!!!":
            return entries
        entries[name] = mode


def test_cpio_writer_is_readable_by_gnu_cpio(tmp_path: Path) -> None:
    w = CpioWriter()
    w.file("a/b/hello.txt", b"hello\n")
    w.symlink("bin/sh", "/bin/busybox")
    w.chardev("dev/console", 5, 1)
    archive = w.finish()
    listing = subprocess.run(
        ["cpio", "-t", "--quiet"], input=archive, capture_output=True, check=True
    ).stdout.decode()
    assert set(listing.split()) == {"a", "a/b", "a/b/hello.txt", "bin", "bin/sh", "dev",
                                    "dev/console"}  # fmt: skip
    subprocess.run(["cpio", "-id", "--quiet"], input=archive, cwd=tmp_path, check=True)
    assert (tmp_path / "a/b/hello.txt").read_bytes() == b"hello\n"
    assert os.readlink(tmp_path / "bin/sh") == "/bin/busybox"


def test_module_load_order_puts_deps_first() -> None:
    _, version = find_kernel()
    order = ModuleTree.load(version).load_order(["sd_mod", "ata_piix", "virtio_blk"])
    names = [Path(p).name.split(".")[0] for p in order]
    assert names.index("scsi_common") < names.index("scsi_mod") < names.index("sd_mod")
    assert names.index("libata") < names.index("ata_piix")
    assert names.index("virtio") < names.index("virtio_blk")
    assert len(names) == len(set(names))
    with pytest.raises(KernelBuildError):
        ModuleTree.load(version).load_order(["no_such_module_xyz"])


def test_testdisk_layout(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    build_boot_disk(disk, marker="LAYOUT", size_mib=16)
    data = disk.read_bytes()
    assert len(data) == 16 << 20
    assert data[:440] == MBR_BIN.read_bytes()[:440]
    assert data[510:512] == b"\x55\xaa"
    boot_flag, ptype = data[446], data[446 + 4]
    start, count = struct.unpack_from("<II", data, 446 + 8)
    assert (boot_flag, ptype, start) == (0x80, 0x06, 2048)
    assert start + count <= guest_write_lba(len(data))
    vbr = data[2048 * 512 : 2049 * 512]
    assert vbr[54:62] == b"FAT16   "
    assert struct.unpack_from("<I", vbr, 28)[0] == 2048  # hidden sectors = partition offset
    assert b"testdisk.marker=LAYOUT" in data


def test_testdisk_rebuild_is_fast(tmp_path: Path) -> None:
    build_boot_disk(tmp_path / "a.img", marker="A")
    t0 = time.monotonic()
    build_boot_disk(tmp_path / "b.img", marker="B")
    assert time.monotonic() - t0 < 1.0
    assert build_initramfs() == build_initramfs()


def test_testdisk_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(KernelBuildError, match="bad marker"):
        build_boot_disk(tmp_path / "x.img", marker="has space")
    with pytest.raises(KernelBuildError, match="size_mib"):
        build_boot_disk(tmp_path / "x.img", marker="OK", size_mib=4)
    assert not (tmp_path / "x.img").exists()


def test_guest_pattern_and_cmdline() -> None:
    pat = guest_pattern("M1")
    assert len(pat) == 512
    assert pat.startswith(b"GUEST-WROTE-M1\nGUEST-WROTE-M1\n")
    assert guest_write_lba(16 << 20) == 32768 - 64
    assert marker_cmdline("M1") == "console=ttyS0 panic=-1 quiet testdisk.marker=M1"


def test_testdisk_initramfs_contents() -> None:
    entries = cpio_list(gzip.decompress(build_initramfs().initrd.read_bytes()))
    for name in ("init", "bin/busybox", "bin/sh", "dev/console", "lib/modules/load.order",
                 "lib/modules/ata_piix.ko", "lib/modules/sd_mod.ko",
                 "lib/modules/virtio_blk.ko"):  # fmt: skip
        assert name in entries, name


def test_rescue_initramfs_contents() -> None:
    entries = cpio_list(gzip.decompress(build_rescue_initramfs().initrd.read_bytes()))
    for name in ("init", "usr/bin/nbdcopy", "usr/bin/nbdinfo", "lib64/ld-linux-x86-64.so.2",
                 "lib/x86_64-linux-gnu/libnbd.so.0", "lib/x86_64-linux-gnu/libc.so.6",
                 "usr/share/udhcpc/default.script", "sbin/udhcpc", "sbin/reboot",
                 "lib/modules/virtio_net.ko", "lib/modules/e1000.ko"):  # fmt: skip
        assert name in entries, name
    # ICU's 30 MiB data library is replaced by an empty stub: the whole initramfs must fit
    # in RAM next to the kernel in QEMU's default 128 MiB
    icu = [n for n in entries if re.search(r"libicudata\.so\.\d+$", n)]
    assert icu, "libnbd -> libxml2 -> ICU should be in the closure"
    assert len(gzip.decompress(build_rescue_initramfs().initrd.read_bytes())) < 40 << 20


def test_restore_cmdline() -> None:
    cmd = restore_cmdline("nbd://10.0.2.2:10809/pt", zero=True)
    assert cmd.split()[-4:] == ["restore.src=nbd://10.0.2.2:10809/pt", "restore.dst=/dev/sda",
                                "restore.zero=1", "restore.reboot=1"]  # fmt: skip
    with pytest.raises(KernelBuildError):
        restore_cmdline("http://x/y")
    with pytest.raises(KernelBuildError):
        restore_cmdline("nbd://h/x y")
    two = restore_cmdline("nbd://h/a,nbd://h/b", dst="/dev/vda,/dev/vdb")
    assert "restore.src=nbd://h/a,nbd://h/b restore.dst=/dev/vda,/dev/vdb " in two
    with pytest.raises(KernelBuildError, match="2 restore source"):
        restore_cmdline("nbd://h/a,nbd://h/b")  # one destination for two disks
    with pytest.raises(KernelBuildError, match="bad restore source"):
        restore_cmdline("nbd://h/a,http://h/b", dst="/dev/sda,/dev/sdb")


def test_iso_is_hybrid(tmp_path: Path) -> None:
    boot = build_initramfs()
    iso = tmp_path / "t.iso"
    build_iso(iso, boot.kernel, boot.initrd, "console=ttyS0")
    with iso.open("rb") as f:
        head = f.read(0x8010)
    assert head[510:512] == b"\x55\xaa"  # isohybrid MBR
    assert head[0x8001:0x8006] == b"CD001"
    report = subprocess.run(["xorriso", "-indev", str(iso), "-report_el_torito", "plain"],
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert re.search(r"boot img :\s+1\s+BIOS", report)
    assert re.search(r"boot img :\s+2\s+UEFI", report)
    # the ESP image is also a partition of the USB-stick view (type 0xef)
    assert subprocess.run(["sfdisk", "--dump", str(iso)], capture_output=True, text=True,
                          check=True).stdout.count("type=ef") == 1  # fmt: skip
    bios_only = tmp_path / "b.iso"
    build_iso(bios_only, boot.kernel, boot.initrd, "console=ttyS0", uefi=False)
    assert "UEFI" not in subprocess.run(
        ["xorriso", "-indev", str(bios_only), "-report_el_torito", "plain"],
        capture_output=True, text=True, check=True).stdout  # fmt: skip
    with pytest.raises(KernelBuildError, match="does not exist"):
        build_iso(tmp_path / "u.iso", tmp_path / "nope", boot.initrd, "x")


def test_grub_cfg_mirrors_isolinux_entries() -> None:
    entry = IsoEntry("install", "/boot/vmlinuz", "/boot/install.img", "console=ttyS0 a=$x;b",
                     "write the appliance to a disk")  # fmt: skip
    cfg = grub_cfg("console=ttyS0 quiet", extra_entries=[entry], default="install",
                   menu_timeout_s=7)  # fmt: skip
    assert "set default='install'\nset timeout=7\n" in cfg
    assert "  linux /boot/vmlinuz 'console=ttyS0' 'quiet'\n  initrd /boot/initrd.img\n" in cfg
    # $ and ; reach the kernel as they are: single quotes stop GRUB's expansion
    assert "  linux /boot/vmlinuz 'console=ttyS0' 'a=$x;b'\n  initrd /boot/install.img\n" in cfg
    assert "--id 'linux'" in cfg and "--id 'install'" in cfg
    assert "set timeout=0" in grub_cfg("c")  # rescue only: no menu wait
    with pytest.raises(KernelBuildError, match="single quotes"):
        grub_cfg("a='b'")
    with pytest.raises(KernelBuildError):
        grub_cfg("c", default="install")


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["testdisk", str(tmp_path / "d.img"), "--marker", "bad marker"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kernel: error: bad marker") and err.count("\n") == 1
    assert main(["iso", "--out", str(tmp_path / "x.iso"), "--kernel", "/nonexistent"]) == 1
    assert "both --kernel and --initrd" in capsys.readouterr().err
    assert main(["testdisk", str(tmp_path / "ok.img"), "--marker", "CLI"]) == 0
    assert (tmp_path / "ok.img").stat().st_size == 16 << 20


def test_free_tcp_port() -> None:
    port = free_tcp_port()
    assert 1024 <= port <= 65535


def test_run_qemu_reports_early_exit(tmp_path: Path) -> None:
    with pytest.raises(QemuError, match="exited"):
        run_qemu(["-no-such-option"], serial_log=tmp_path / "s.log", wait_for="X", timeout_s=10)


def test_qemu_vm_timeout_kills_guest(tmp_path: Path) -> None:
    with pytest.raises(QemuError, match="timeout"):  # noqa: SIM117
        with qemu_vm(["-nodefaults"], serial_log=tmp_path / "s.log") as vm:
            pid = vm.pid
            vm.wait_for("never printed", timeout_s=1.5)
    assert pid is not None
    assert vm.proc is not None and vm.proc.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
