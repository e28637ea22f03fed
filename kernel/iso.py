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

Extra boot entries (``extra_entries``, e.g. the appliance installer from ``kernel.installer``) and
extra files (``extra_files``: ISO path -> host file) may be added; with extra entries isolinux shows
a ``boot:`` prompt for ``menu_timeout_s`` seconds (on the console and on serial) and then boots the
``default`` entry (``linux``, the rescue system, unless told otherwise).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kernel.initramfs import KernelBuildError, require_tool

log = logging.getLogger(__name__)

ISOLINUX_BIN = Path("/usr/lib/ISOLINUX/isolinux.bin")
ISOHDPFX_BIN = Path("/usr/lib/ISOLINUX/isohdpfx.bin")
LDLINUX_C32 = Path("/usr/lib/syslinux/modules/bios/ldlinux.c32")
DEFAULT_VOLUME_ID = "DR_APPLIANCE"
RESCUE_LABEL = "linux"
#: Shown above the ``boot:`` prompt when there is more than one entry.
BOOT_MSG = "/isolinux/boot.msg"
DEFAULT_MENU_TIMEOUT_S = 5


@dataclass(frozen=True)
class IsoEntry:
    """One more isolinux boot entry; ``kernel``/``initrd`` are paths inside the ISO."""

    label: str
    kernel: str
    initrd: str
    cmdline: str
    description: str = ""  #: one line for the boot prompt's help text


def _entry_cfg(label: str, kernel: str, initrd: str, cmdline: str) -> str:
    if any("\n" in x for x in (label, kernel, initrd, cmdline)):
        raise KernelBuildError("kernel command line must be a single line")
    if not label or any(c.isspace() for c in label):
        raise KernelBuildError(f"bad boot entry label {label!r}")
    return f"LABEL {label}\n  KERNEL {kernel}\n  INITRD {initrd}\n  APPEND {cmdline}\n"


def isolinux_cfg(
    cmdline: str,
    *,
    extra_entries: Sequence[IsoEntry] = (),
    default: str = RESCUE_LABEL,
    menu_timeout_s: int = DEFAULT_MENU_TIMEOUT_S,
) -> str:
    """The isolinux configuration, console also on serial.

    Without extra entries: boot the rescue kernel immediately. With them: a ``boot:`` prompt
    listing the labels, ``default`` after ``menu_timeout_s`` seconds (0: immediately).
    """
    labels = [RESCUE_LABEL, *(e.label for e in extra_entries)]
    if default not in labels:
        raise KernelBuildError(f"unknown default boot entry {default!r} (have {labels})")
    if len(set(labels)) != len(labels):
        raise KernelBuildError(f"duplicate boot entry labels {labels}")
    rescue = _entry_cfg(RESCUE_LABEL, "/boot/vmlinuz", "/boot/initrd.img", cmdline)
    if not extra_entries:
        return f"SERIAL 0 115200\nDEFAULT {default}\nPROMPT 0\nTIMEOUT 0\n{rescue}"
    if menu_timeout_s < 0:
        raise KernelBuildError("menu timeout must be >= 0")
    prompt = 1 if menu_timeout_s else 0
    return (
        f"SERIAL 0 115200\nDISPLAY {BOOT_MSG}\nDEFAULT {default}\nPROMPT {prompt}\n"
        f"TIMEOUT {menu_timeout_s * 10}\n{rescue}"
        + "".join(_entry_cfg(e.label, e.kernel, e.initrd, e.cmdline) for e in extra_entries)
    )


def boot_message(extra_entries: Sequence[IsoEntry], default: str, menu_timeout_s: int) -> str:
    """The text above the ``boot:`` prompt: the entries and what happens without an answer."""
    lines = ["DR Appliance boot entries (type one and press Enter):",
             f"  {RESCUE_LABEL:<10} the rescue system (bare-metal restore, shell)"]  # fmt: skip
    lines += [f"  {e.label:<10} {e.description or e.cmdline}" for e in extra_entries]
    lines.append(f"'{default}' boots in {menu_timeout_s} s.")
    return "\r\n".join(lines) + "\r\n"


def build_iso(
    out: Path,
    kernel: Path,
    initrd: Path,
    cmdline: str,
    *,
    volume_id: str = DEFAULT_VOLUME_ID,
    extra_entries: Sequence[IsoEntry] = (),
    extra_files: Mapping[str, Path] | None = None,
    default: str = RESCUE_LABEL,
    menu_timeout_s: int = DEFAULT_MENU_TIMEOUT_S,
) -> None:
    """Write a hybrid BIOS-bootable ISO to ``out`` that boots ``kernel``/``initrd``.

    ``extra_entries``/``extra_files``/``default``/``menu_timeout_s``: see the module docstring.
    """
    cfg = isolinux_cfg(
        cmdline, extra_entries=extra_entries, default=default, menu_timeout_s=menu_timeout_s
    )
    extra_files = dict(extra_files or {})
    for iso_path, src in extra_files.items():
        if not iso_path.startswith("/") or ".." in iso_path.split("/"):
            raise KernelBuildError(f"bad ISO path {iso_path!r}")
        if not Path(src).is_file():
            raise KernelBuildError(f"{src} does not exist")
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
        (root / "isolinux" / "isolinux.cfg").write_text(cfg)
        if extra_entries:
            (root / BOOT_MSG.lstrip("/")).write_text(
                boot_message(extra_entries, default, menu_timeout_s)
            )
        # hard links would be cheaper, but kernel/initrd may live on another filesystem
        (root / "boot" / "vmlinuz").write_bytes(Path(kernel).read_bytes())
        (root / "boot" / "initrd.img").write_bytes(Path(initrd).read_bytes())
        for iso_path, src in extra_files.items():
            dest = root / iso_path.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
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
