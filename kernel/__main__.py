"""Command line of the build-time ``kernel`` package.

    python -m kernel testdisk OUT --marker M [--size-mib 16]
    python -m kernel rescue OUTDIR
    python -m kernel iso --out OUT [--cmdline "..."] [--kernel K --initrd I]
                         [--with-installer [--install-dst /dev/sda] [--default install]
                          [--menu-timeout S]]
    python -m kernel appliance-image OUT [--size-mib N]

``iso`` without ``--kernel/--initrd`` packs the rescue system; ``--with-installer`` adds the
``install`` boot entry that writes the appliance disk image (shipped on the ISO) to a disk.
Failures print one line on stderr (``kernel: error: ...``) and exit with status 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

from kernel.initramfs import KernelBuildError
from kernel.installer import build_appliance_image, installer_iso_extras
from kernel.iso import DEFAULT_MENU_TIMEOUT_S, RESCUE_LABEL, IsoEntry, build_iso
from kernel.rescue import RESCUE_CMDLINE, build_rescue
from kernel.testdisk import build_boot_disk

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kernel", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("testdisk", help="build a tiny bootable raw test disk")
    t.add_argument("out", type=Path)
    t.add_argument("--marker", required=True, help="printed by the guest as '<M> BOOTED'")
    t.add_argument("--size-mib", type=int, default=16)
    t.add_argument("--iscsi", action="store_true",
                   help="the guest can run from the iSCSI LUN it SAN-booted from")  # fmt: skip

    r = sub.add_parser("rescue", help="build the rescue kernel + initramfs into OUTDIR")
    r.add_argument("outdir", type=Path)

    i = sub.add_parser("iso", help="build a hybrid bootable ISO")
    i.add_argument("--out", type=Path, required=True)
    i.add_argument("--cmdline", default=RESCUE_CMDLINE)
    i.add_argument("--kernel", type=Path, help="default: the rescue kernel")
    i.add_argument("--initrd", type=Path, help="default: the rescue initramfs")
    i.add_argument("--with-installer", action="store_true",
                   help="add the 'install' entry and the appliance disk image")  # fmt: skip
    i.add_argument("--install-dst", default="/dev/sda", help="disk the installer overwrites")
    i.add_argument("--unattended", action="store_true",
                   help="the installer erases --install-dst without asking for 'yes' and "
                   "generates the admin password (printed once)")  # fmt: skip
    i.add_argument("--default", default=RESCUE_LABEL,
                   help=f"entry booted by default ({RESCUE_LABEL} = rescue, install)")  # fmt: skip
    i.add_argument("--menu-timeout", type=int, default=DEFAULT_MENU_TIMEOUT_S,
                   help="seconds the boot prompt waits (with --with-installer)")  # fmt: skip
    i.add_argument("--no-uefi", action="store_true",
                   help="BIOS only: leave out the UEFI boot image (GRUB)")  # fmt: skip

    a = sub.add_parser("appliance-image", help="build the bootable appliance disk image")
    a.add_argument("out", type=Path)
    a.add_argument("--size-mib", type=int, help="default: just big enough (+ slack)")
    return p


def _iso(args: argparse.Namespace, kernel: Path, initrd: Path) -> None:
    entries: list[IsoEntry] = []
    files: dict[str, Path] = {}
    if args.with_installer:
        entries, files = installer_iso_extras(dst=args.install_dst, unattended=args.unattended)
    elif args.default != RESCUE_LABEL:
        raise KernelBuildError(f"--default {args.default} needs --with-installer")
    elif args.unattended:
        raise KernelBuildError("--unattended needs --with-installer")
    build_iso(args.out, kernel, initrd, args.cmdline, extra_entries=entries, extra_files=files,
              default=args.default, menu_timeout_s=args.menu_timeout,
              uefi=not args.no_uefi)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "testdisk":
            build_boot_disk(args.out, marker=args.marker, size_mib=args.size_mib,
                            iscsi=args.iscsi)  # fmt: skip
            print(args.out)
        elif args.command == "rescue":
            kernel, initrd = build_rescue(args.outdir)
            print(kernel)
            print(initrd)
        elif args.command == "iso":
            if (args.kernel is None) != (args.initrd is None):
                raise KernelBuildError("give both --kernel and --initrd, or neither")
            if args.kernel is None:
                with tempfile.TemporaryDirectory(prefix="rescue-") as td:
                    kernel, initrd = build_rescue(Path(td))
                    _iso(args, kernel, initrd)
            else:
                _iso(args, args.kernel, args.initrd)
            print(args.out)
        elif args.command == "appliance-image":
            print(build_appliance_image(args.out, size_mib=args.size_mib))
    except (KernelBuildError, OSError) as exc:
        print(f"kernel: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
