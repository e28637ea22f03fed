"""Bootable hybrid ISO images (BIOS and UEFI) for the rescue system and the appliance installer.

This module owns the ISO layout::

    /isolinux/isolinux.bin   BIOS El Torito boot image (no emulation, boot-info-table)
    /isolinux/ldlinux.c32    isolinux core module
    /isolinux/isolinux.cfg   one entry, no prompt: KERNEL /boot/vmlinuz, INITRD /boot/initrd.img
    /isolinux/boot.cat       boot catalogue
    /boot/grub/efi.img       UEFI El Torito image: a FAT ESP holding only EFI/BOOT/BOOTX64.EFI
    /boot/grub/grub.cfg      the same entries as isolinux.cfg, for GRUB
    /boot/grub/<tag>.id      how BOOTX64.EFI finds this ISO (a random tag per build)
    /boot/vmlinuz, /boot/initrd.img

built with ``xorriso -as mkisofs -isohybrid-mbr isohdpfx.bin ... -eltorito-alt-boot -e
boot/grub/efi.img -isohybrid-gpt-basdat``, so the same file boots as a CD-ROM (``-cdrom``), as a
hard disk / USB stick (raw ``-drive``), and as a CD over NBD, with BIOS (isolinux) or UEFI firmware.
BOOTX64.EFI is Debian's GRUB (``grub-efi-amd64-bin``) made by ``grub-mkimage`` with a small embedded
config that searches for the tag file and loads ``/boot/grub/grub.cfg`` from the ISO, so the kernel
and initrd are stored once, in the ISO 9660 tree, not again inside the ESP.

Extra boot entries (``extra_entries``, e.g. the appliance installer from ``kernel.installer``) and
extra files (``extra_files``: ISO path -> host file) may be added; with extra entries isolinux shows
a ``boot:`` prompt for ``menu_timeout_s`` seconds (on the console and on serial) and then boots the
``default`` entry (``linux``, the rescue system, unless told otherwise).
"""

from __future__ import annotations

import logging
import secrets
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
GRUB_EFI_DIR = Path("/usr/lib/grub/x86_64-efi")
EFI_IMG = "boot/grub/efi.img"
GRUB_CFG = "boot/grub/grub.cfg"
#: What BOOTX64.EFI needs: read the ISO (or the USB stick's partitions), find it, show a menu on
#: the serial port and the screen, and boot a Linux kernel through its EFI stub.
GRUB_MODULES = (
    "iso9660", "fat", "part_gpt", "part_msdos", "search", "search_fs_file", "configfile",
    "normal", "linux", "echo", "serial", "terminal", "test", "sleep", "boot", "gzio",
    "efi_gop", "efi_uga", "all_video",
)  # fmt: skip
#: GRUB prints this before the menu: tests and people can see which loader booted the ISO.
GRUB_BANNER = "DR Appliance UEFI boot (GRUB)"


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


def _grub_quote(cmdline: str) -> str:
    """Each word in single quotes: GRUB's parser would expand ``$`` and split on ``;``."""
    words = cmdline.split()
    if any("'" in w for w in words):
        raise KernelBuildError("kernel command line for GRUB must not contain single quotes")
    return " ".join(f"'{w}'" for w in words)


def grub_cfg(
    cmdline: str,
    *,
    extra_entries: Sequence[IsoEntry] = (),
    default: str = RESCUE_LABEL,
    menu_timeout_s: int = DEFAULT_MENU_TIMEOUT_S,
) -> str:
    """GRUB's configuration with the same entries, default and timeout as :func:`isolinux_cfg`."""
    # the same validation (labels, default, timeout, one-line command lines)
    isolinux_cfg(cmdline, extra_entries=extra_entries, default=default,
                 menu_timeout_s=menu_timeout_s)  # fmt: skip
    rescue = IsoEntry(RESCUE_LABEL, "/boot/vmlinuz", "/boot/initrd.img", cmdline,
                      "the rescue system (bare-metal restore, shell)")  # fmt: skip
    entries = [rescue, *extra_entries]
    timeout = menu_timeout_s if extra_entries else 0
    out = [
        "serial --unit=0 --speed=115200",
        "terminal_input serial console",
        "terminal_output serial console",
        f"echo '{GRUB_BANNER}'",
        f"set default='{default}'",
        f"set timeout={timeout}",
    ]
    for e in entries:
        title = f"{e.label}: {e.description or e.cmdline}".replace("'", "")
        out += [
            f"menuentry '{title}' --id '{e.label}' {{",
            f"  linux {e.kernel} {_grub_quote(e.cmdline)}",
            f"  initrd {e.initrd}",
            "}",
        ]
    return "\n".join(out) + "\n"


def build_grub_efi(out: Path, tag_file: str, cfg_path: str, work: Path) -> None:
    """Write GRUB as a standalone ``BOOTX64.EFI`` to ``out``: it finds the filesystem holding
    ``tag_file`` and runs ``cfg_path`` from it (both absolute paths in that filesystem)."""
    mkimage = require_tool("grub-mkimage", "grub-common")
    if not (GRUB_EFI_DIR / "linux.mod").is_file():
        raise KernelBuildError(f"{GRUB_EFI_DIR} missing (apt-get install grub-efi-amd64-bin)")
    early = work / "early.cfg"
    early.write_text(
        f"search --no-floppy --set=root --file {tag_file}\n"
        f"set prefix=($root){Path(cfg_path).parent!s}\n"
        f"configfile ($root){cfg_path}\n"
    )
    _run([mkimage, "-O", "x86_64-efi", "-d", str(GRUB_EFI_DIR), "-o", str(out),
          "-p", str(Path(cfg_path).parent), "-c", str(early), *GRUB_MODULES])  # fmt: skip


def build_efi_image(dest: Path, tag_file: str, work: Path) -> None:
    """Write the FAT ESP image holding GRUB's EFI/BOOT/BOOTX64.EFI that finds ``tag_file``."""
    mkfs = require_tool("mkfs.vfat", "dosfstools")
    mmd, mcopy = require_tool("mmd", "mtools"), require_tool("mcopy", "mtools")
    efi = work / "BOOTX64.EFI"
    build_grub_efi(efi, tag_file, "/" + GRUB_CFG, work)
    kib = (efi.stat().st_size // 1024 + 1024) // 1024 * 1024 + 1024  # >= 1 MiB of slack
    dest.unlink(missing_ok=True)
    _run([mkfs, "-C", "-n", "EFIBOOT", str(dest), str(kib)])
    _run([mmd, "-i", str(dest), "::/EFI", "::/EFI/BOOT"])
    _run([mcopy, "-i", str(dest), str(efi), "::/EFI/BOOT/BOOTX64.EFI"])


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        name = Path(cmd[0]).name
        raise KernelBuildError(f"{name} failed ({proc.returncode}): {lines[-1] if lines else ''}")


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
    uefi: bool = True,
) -> None:
    """Write a hybrid ISO to ``out`` that boots ``kernel``/``initrd`` with BIOS (and UEFI).

    ``extra_entries``/``extra_files``/``default``/``menu_timeout_s``: see the module docstring.
    ``uefi=False`` leaves out the UEFI boot image (no GRUB needed).
    """
    cfg = isolinux_cfg(
        cmdline, extra_entries=extra_entries, default=default, menu_timeout_s=menu_timeout_s
    )
    gcfg = grub_cfg(
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
        efi_args: list[str] = []
        if uefi:
            (root / "boot" / "grub").mkdir(parents=True, exist_ok=True)
            tag = f"/boot/grub/{secrets.token_hex(8)}.id"
            (root / tag.lstrip("/")).write_text("DR Appliance ISO\n")
            (root / GRUB_CFG).write_text(gcfg)
            build_efi_image(root / EFI_IMG, tag, Path(td))
            efi_args = ["-eltorito-alt-boot", "-e", EFI_IMG, "-no-emul-boot",
                        "-isohybrid-gpt-basdat"]  # fmt: skip
        tmp_iso = Path(td) / "out.iso"
        cmd = [
            xorriso, "-as", "mkisofs", "-quiet", "-o", str(tmp_iso),
            "-V", volume_id, "-r", "-J",
            "-isohybrid-mbr", str(ISOHDPFX_BIN),
            "-c", "isolinux/boot.cat", "-b", "isolinux/isolinux.bin",
            "-no-emul-boot", "-boot-load-size", "4", "-boot-info-table",
            *efi_args,
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
