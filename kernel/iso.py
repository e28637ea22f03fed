"""Bootable hybrid ISO images (BIOS, isolinux) for the rescue system and the appliance installer.

This module owns the ISO layout::

    /isolinux/isolinux.bin   El Torito boot image (no emulation, boot-info-table)
    /isolinux/ldlinux.c32    isolinux core module
    /isolinux/isolinux.cfg   one entry, no prompt: KERNEL /boot/vmlinuz, INITRD /boot/initrd.img
    /isolinux/boot.cat       boot catalogue
    /boot/vmlinuz, /boot/initrd.img

built with ``xorriso -as mkisofs -isohybrid-mbr isohdpfx.bin``, so the same file boots as a
CD-ROM (``-cdrom``), as a hard disk / USB stick (raw ``-drive``), and as a CD over NBD.
BIOS only: there is no UEFI El Torito image.
"""

from __future__ import annotations

import logging
import subprocess
import tempfile
from pathlib import Path

from kernel.initramfs import KernelBuildError, require_tool

log = logging.getLogger(__name__)

ISOLINUX_BIN = Path("/usr/lib/ISOLINUX/isolinux.bin")
ISOHDPFX_BIN = Path("/usr/lib/ISOLINUX/isohdpfx.bin")
LDLINUX_C32 = Path("/usr/lib/syslinux/modules/bios/ldlinux.c32")
DEFAULT_VOLUME_ID = "DR_APPLIANCE"


def isolinux_cfg(cmdline: str) -> str:
    """The isolinux configuration: boot the one kernel immediately, console also on serial."""
    if "\n" in cmdline:
        raise KernelBuildError("kernel command line must be a single line")
    return (
        "SERIAL 0 115200\n"
        "DEFAULT linux\nPROMPT 0\nTIMEOUT 0\n"
        "LABEL linux\n  KERNEL /boot/vmlinuz\n  INITRD /boot/initrd.img\n"
        f"  APPEND {cmdline}\n"
    )


def build_iso(
    out: Path, kernel: Path, initrd: Path, cmdline: str, *, volume_id: str = DEFAULT_VOLUME_ID
) -> None:
    """Write a hybrid BIOS-bootable ISO to ``out`` that boots ``kernel``/``initrd``."""
    xorriso = require_tool("xorriso", "xorriso")
    for path, pkg in ((ISOLINUX_BIN, "isolinux"), (ISOHDPFX_BIN, "isolinux"),
                      (LDLINUX_C32, "syslinux-common")):  # fmt: skip
        if not path.is_file():
            raise KernelBuildError(f"{path} missing (apt-get install {pkg})")
    for path in (Path(kernel), Path(initrd)):
        if not path.is_file():
            raise KernelBuildError(f"{path} does not exist")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".iso-") as td:
        root = Path(td) / "root"
        (root / "isolinux").mkdir(parents=True)
        (root / "boot").mkdir()
        (root / "isolinux" / "isolinux.bin").write_bytes(ISOLINUX_BIN.read_bytes())
        (root / "isolinux" / "ldlinux.c32").write_bytes(LDLINUX_C32.read_bytes())
        (root / "isolinux" / "isolinux.cfg").write_text(isolinux_cfg(cmdline))
        # hard links would be cheaper, but kernel/initrd may live on another filesystem
        (root / "boot" / "vmlinuz").write_bytes(Path(kernel).read_bytes())
        (root / "boot" / "initrd.img").write_bytes(Path(initrd).read_bytes())
        tmp_iso = Path(td) / "out.iso"
        cmd = [
            xorriso, "-as", "mkisofs", "-quiet", "-o", str(tmp_iso),
            "-V", volume_id, "-r", "-J",
            "-isohybrid-mbr", str(ISOHDPFX_BIN),
            "-c", "isolinux/boot.cat", "-b", "isolinux/isolinux.bin",
            "-no-emul-boot", "-boot-load-size", "4", "-boot-info-table",
            str(root),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            raise KernelBuildError(
                f"xorriso failed ({proc.returncode}): {lines[-1] if lines else ''}"
            )
        tmp_iso.replace(out)
    log.info("built ISO %s", out)
