"""Tiny bootable test disks: MBR + syslinux + FAT16 with Debian's kernel and a busybox initramfs.

This module owns the test-disk format that other packages' VM tests boot (from a raw file, NBD,
iSCSI, ...) to prove that a disk image made it through backup/restore intact.

Disk layout (``size_mib`` MiB, 512-byte sectors, ``S = size_mib * 2048`` sectors):

* LBA 0: syslinux ``mbr.bin`` boot code + a DOS partition table,
* LBA 2048 .. S-2049: partition 1 (type 0x06, bootable), FAT16 holding ``vmlinuz``,
  ``initrd.gz``, ``syslinux.cfg`` and syslinux's ``ldlinux.sys``/``ldlinux.c32``,
* the last MiB is unpartitioned; the guest writes its pattern at ``LBA = S - 64``.

The guest's ``/init`` (busybox ``sh``) takes its parameters from the kernel command line, so one
cached initramfs serves every marker:

* ``testdisk.marker=M`` — printed as ``M BOOTED`` and ``M DONE``,
* ``testdisk.read=N`` (default 0) — sector ``2048 + N`` is read and printed as ``READ <sha256>``.

SAN-capable disks (``iscsi=True``, ``python -m kernel testdisk --iscsi``) also carry Debian's
``iscsistart`` and the iSCSI/iBFT/NIC modules: SAN-booted by iPXE, the guest finds iPXE's iBFT,
brings up that NIC and logs in to the LUN itself, which then is its ``/dev/sda``.

Then it writes :func:`guest_pattern` (``GUEST-WROTE-<marker>\\n`` repeated, 512 bytes) to
``S - 64``, runs ``sync``, prints ``WROTE <lba>`` and ``M DONE``, and powers off.
"""

from __future__ import annotations

import hashlib
import logging
import re
import subprocess
import tempfile
from pathlib import Path

from kernel.initramfs import (
    BootFiles,
    CpioWriter,
    KernelBuildError,
    ModuleTree,
    add_base_layout,
    add_binaries,
    add_busybox,
    add_modules,
    file_fingerprint,
    find_kernel,
    library_closure,
    require_tool,
    write_cached,
)

log = logging.getLogger(__name__)

SECTOR = 512
PARTITION_START_LBA = 2048
#: The guest writes its pattern this many sectors before the end of the disk.
GUEST_WRITE_FROM_END = 64
MIN_SIZE_MIB = 12
BASE_CMDLINE = "console=ttyS0 panic=-1 quiet"
MBR_BIN = Path("/usr/lib/syslinux/mbr/mbr.bin")

#: Storage drivers the test initramfs loads (plus deps). Softdeps of crc_t10dif / crc64_rocksoft
#: come first so ``sd_mod`` does not ask for a usermode ``modprobe``.
DISK_MODULES = (
    "crct10dif_generic",
    "crc64_rocksoft_generic",
    "scsi_mod",
    "sd_mod",
    "libata",
    "ata_piix",
    "ata_generic",
    "virtio_pci",
    "virtio_blk",
)

_MARKER_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")

#: The guest's start, shared by every test guest: mounts, marker, modules, then waits for
#: the first disk and sets `$dev` and `$sectors` (other guests append their own body).
INIT_HEAD = r"""#!/bin/sh
# DR Appliance test-disk init (kernel/testdisk.py)
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
marker=UNKNOWN
read_n=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        testdisk.marker=*) marker="${arg#testdisk.marker=}" ;;
        testdisk.read=*) read_n="${arg#testdisk.read=}" ;;
    esac
done
echo "$marker BOOTED"
while read -r mod; do insmod "$mod" 2>/dev/null; done < /lib/modules/load.order
# SAN-capable disks (build_boot_disk(iscsi=True)) log in to the iSCSI target iPXE booted from
[ -x /sbin/san-attach ] && /sbin/san-attach "$marker"
dev=
i=0
while [ -z "$dev" ] && [ $i -lt 150 ]; do
    for d in vda sda; do [ -b "/dev/$d" ] && dev=$d; done
    [ -n "$dev" ] || sleep 0.1
    i=$((i + 1))
done
if [ -z "$dev" ]; then
    echo "$marker NO DISK"
    poweroff -f
fi
sectors=$(cat "/sys/block/$dev/size")
"""

#: `/sbin/san-attach` of SAN-capable test disks: when iPXE left an iBFT (it SAN-booted us), bring
#: up the NIC it names with its address and log in to its target with Debian's `iscsistart`,
#: as an OS installed on an iSCSI LUN does; the LUN then appears as /dev/sda.
SAN_ATTACH = r"""#!/bin/sh
marker=$1
ibft=/sys/firmware/ibft
[ -d $ibft/target0 ] || exit 0
mac=$(cat $ibft/ethernet0/mac)
ifname=
for n in /sys/class/net/*; do
    [ "$(cat "$n/address")" = "$mac" ] && ifname=${n##*/}
done
[ -n "$ifname" ] || { echo "SAN FAILED no NIC with MAC $mac"; exit 1; }
eth=$ibft/ethernet0
ifconfig "$ifname" "$(cat $eth/ip-addr)" netmask "$(cat $eth/subnet-mask)" up
mkdir -p /etc/iscsi /run/lock /var/lock
if ! iscsistart -b >/tmp/iscsistart.log 2>&1; then
    echo "SAN FAILED iscsistart:"
    cat /tmp/iscsistart.log
    exit 1
fi
echo "SAN ATTACHED $(cat $ibft/target0/target-name) via $ifname"
"""

#: Modules SAN-capable disks add: the QEMU NIC, the iSCSI initiator and the iBFT reader.
ISCSI_MODULES = ("virtio_net", "e1000", "crc32c_generic", "iscsi_tcp", "iscsi_ibft")

INIT_SCRIPT = INIT_HEAD + r"""
hex=$(dd if="/dev/$dev" bs=512 skip=$((2048 + read_n)) count=1 2>/dev/null | sha256sum)
echo "READ ${hex%% *}"
lba=$((sectors - 64))
yes "GUEST-WROTE-$marker" | head -c 512 > /tmp/pattern
dd if=/tmp/pattern of="/dev/$dev" bs=512 seek=$lba count=1 conv=notrunc,fsync 2>/dev/null
sync
echo "WROTE $lba"
echo "$marker DONE"
poweroff -f
"""


def _check_marker(marker: str) -> None:
    if not _MARKER_RE.match(marker):
        raise KernelBuildError(
            f"bad marker {marker!r}: use 1-64 characters from A-Z a-z 0-9 _ . : -"
        )


def guest_pattern(marker: str) -> bytes:
    """The 512 bytes the guest writes: ``GUEST-WROTE-<marker>\\n`` repeated and truncated."""
    line = f"GUEST-WROTE-{marker}\n".encode()
    return (line * (SECTOR // len(line) + 1))[:SECTOR]


def guest_write_lba(disk_bytes: int) -> int:
    """LBA of the sector the guest writes on a disk of ``disk_bytes``."""
    return disk_bytes // SECTOR - GUEST_WRITE_FROM_END


def marker_cmdline(marker: str, read_n: int = 0) -> str:
    """Kernel command line for the test initramfs (for ``-kernel/-initrd/-append`` boots too)."""
    _check_marker(marker)
    extra = f" testdisk.read={int(read_n)}" if read_n else ""
    return f"{BASE_CMDLINE} testdisk.marker={marker}{extra}"


def build_initramfs(
    init_script: str = INIT_SCRIPT, cache_name: str = "testdisk", *, iscsi: bool = False
) -> BootFiles:
    """Debian's kernel and the (cached) test initramfs; the marker comes from the cmdline.

    Other test guests pass their own `/init` (usually `INIT_HEAD` + a body). ``iscsi`` adds
    `/sbin/san-attach` (:data:`SAN_ATTACH`), `iscsistart` with its libraries and
    :data:`ISCSI_MODULES`.
    """
    kernel, version = find_kernel()
    tree = ModuleTree.load(version)
    modules = (*DISK_MODULES, *ISCSI_MODULES) if iscsi else DISK_MODULES
    order = tree.load_order(modules)
    binaries = [Path(require_tool("iscsistart", "open-iscsi")).resolve()] if iscsi else []
    libs = library_closure(binaries)
    key = [
        init_script,
        SAN_ATTACH if iscsi else "",
        file_fingerprint(Path("/bin/busybox")),
        version,
        *(file_fingerprint(tree.root / rel) for rel in order),
        *(file_fingerprint(p) for p in (*binaries, *libs)),
    ]

    def build() -> bytes:
        cpio = CpioWriter()
        add_base_layout(cpio)
        add_busybox(cpio)
        add_modules(cpio, tree, modules)
        add_binaries(cpio, binaries, "sbin", libs)
        if iscsi:
            cpio.file("sbin/san-attach", SAN_ATTACH.encode(), 0o755)
        cpio.file("init", init_script.encode(), 0o755)
        return cpio.finish()

    initrd = write_cached(key, cache_name + ("-iscsi" if iscsi else ""), build, compress=True)
    return BootFiles(kernel=kernel, initrd=initrd)


def _run(cmd: list[str], *, stdin: str | None = None) -> None:
    log.debug("run %s", cmd)
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise KernelBuildError(
            f"{Path(cmd[0]).name} failed ({proc.returncode}): {detail[-1] if detail else ''}"
        )


def build_boot_disk(out: Path, *, marker: str, size_mib: int = 16, iscsi: bool = False) -> None:
    """Write a bootable raw disk image of ``size_mib`` MiB to ``out`` (see module docstring).

    ``iscsi``: the guest can also run from an iSCSI LUN it was SAN-booted from (iBFT).
    """
    _check_marker(marker)
    if size_mib < MIN_SIZE_MIB:
        raise KernelBuildError(f"size_mib must be >= {MIN_SIZE_MIB}, got {size_mib}")
    mkfs = require_tool("mkfs.vfat", "dosfstools")
    mcopy = require_tool("mcopy", "mtools")
    syslinux = require_tool("syslinux", "syslinux")
    sfdisk = require_tool("sfdisk", "fdisk")
    if not MBR_BIN.is_file():
        raise KernelBuildError(f"{MBR_BIN} missing (apt-get install syslinux-common)")
    boot = build_initramfs(iscsi=iscsi)

    total = size_mib * 2048
    part_sectors = total - PARTITION_START_LBA - 2048
    volume_id = hashlib.sha256(marker.encode()).hexdigest()[:8]
    cfg = (
        "DEFAULT linux\nPROMPT 0\nTIMEOUT 0\n"
        f"LABEL linux\n  KERNEL /vmlinuz\n  INITRD /initrd.gz\n"
        f"  APPEND {marker_cmdline(marker)}\n"
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".testdisk-") as td:
        tmp = Path(td)
        fat = tmp / "fat.img"
        _run([
            mkfs, "-C", "-F", "16", "-h", str(PARTITION_START_LBA), "-i", volume_id,
            "-n", "DRTESTDISK", str(fat), str(part_sectors // 2),
        ])  # fmt: skip
        (tmp / "syslinux.cfg").write_text(cfg)
        for src, name in ((boot.kernel, "vmlinuz"), (boot.initrd, "initrd.gz"),
                          (tmp / "syslinux.cfg", "syslinux.cfg")):  # fmt: skip
            _run([mcopy, "-i", str(fat), "-o", str(src), f"::/{name}"])
        _run([syslinux, "--install", str(fat)])

        disk = tmp / "disk.img"
        with disk.open("wb") as f:
            f.truncate(total * SECTOR)
        _run(
            [sfdisk, "--no-reread", "--no-tell-kernel", "-q", str(disk)],
            stdin=(
                f"label: dos\nlabel-id: 0x{volume_id}\n"
                f"start={PARTITION_START_LBA}, size={part_sectors}, type=6, bootable\n"
            ),
        )
        with disk.open("r+b") as f, fat.open("rb") as src_f:
            f.seek(PARTITION_START_LBA * SECTOR)
            while chunk := src_f.read(1 << 20):
                f.write(chunk)
            f.seek(0)
            f.write(MBR_BIN.read_bytes()[:440])
        disk.replace(out)
    log.info("built test disk %s (%d MiB, marker %s)", out, size_mib, marker)
