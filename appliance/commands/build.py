"""Build sub-commands: `build rescue [--out DIR]`, `build iso --out FILE`,
`build installer-iso --out FILE` (rescue + the appliance installer).

Thin: runs the build-time `kernel` package as a subprocess (`python -m kernel ...`); nothing at
runtime may import `kernel`. Failures are one line (the kernel tool's own message).
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from .._ui import UserError

log = logging.getLogger(__name__)

DEFAULT_RESCUE_DIR = Path("var/rescue")


def register(sub: Any) -> None:
    b = sub.add_parser("build", help="build boot media: the rescue system, the ISO")
    bsub = b.add_subparsers(dest="build_command", metavar="WHAT")
    bsub.required = True
    r = bsub.add_parser("rescue", help="rescue kernel + initramfs (vmlinuz, initrd.img)")
    r.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_RESCUE_DIR,
        help=f"output directory (default {DEFAULT_RESCUE_DIR})",
    )
    r.set_defaults(func=cmd_rescue)
    i = bsub.add_parser("iso", help="hybrid bootable ISO of the rescue system (CD or USB)")
    i.add_argument("--out", type=Path, required=True, help="ISO file to write")
    i.add_argument("--cmdline", help="kernel command line (default: the rescue default)")
    i.add_argument("--no-uefi", action="store_true", help="BIOS only (no GRUB EFI boot image)")
    i.set_defaults(func=cmd_iso)
    n = bsub.add_parser(
        "installer-iso",
        help="hybrid ISO: the rescue system (default) + an 'install' entry writing the appliance "
        "to a disk",
    )
    n.add_argument("--out", type=Path, required=True, help="ISO file to write")
    n.add_argument("--install-dst", default="/dev/sda", help="disk the installer overwrites")
    n.add_argument("--default", default="linux", choices=["linux", "install"],
                   help="entry booted when nobody chooses (linux = rescue)")  # fmt: skip
    n.add_argument("--menu-timeout", type=int, default=5, help="seconds the boot prompt waits")
    n.add_argument("--no-uefi", action="store_true", help="BIOS only (no GRUB EFI boot image)")
    n.add_argument("--unattended", action="store_true",
                   help="the installer erases the disk without asking for 'yes' and generates "
                   "the admin password (printed once)")  # fmt: skip
    n.set_defaults(func=cmd_installer_iso)


def run_kernel_tool(args: list[str], *, timeout_s: float = 600) -> list[str]:
    """Run `python -m kernel ARGS`; return its stdout lines. Raises UserError (one line)."""
    cmd = [sys.executable, "-m", "kernel", *args]
    log.info("running %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                              timeout=timeout_s)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise UserError(f"kernel {args[0]} build timed out after {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        msg = lines[-1] if lines else f"exit status {proc.returncode}"
        raise UserError(msg.removeprefix("kernel: error: ").strip() or msg)
    return proc.stdout.split()


def build_rescue(out: Path) -> tuple[Path, Path]:
    """(vmlinuz, initrd.img) built into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    lines = run_kernel_tool(["rescue", str(out.resolve())])
    if len(lines) != 2:
        raise UserError(f"kernel rescue printed {lines!r}, expected two paths")
    return Path(lines[0]), Path(lines[1])


def cmd_rescue(args: argparse.Namespace) -> int:
    kernel, initrd = build_rescue(args.out)
    print(kernel)
    print(initrd)
    return 0


def cmd_iso(args: argparse.Namespace) -> int:
    out: Path = args.out
    if out.exists() and out.is_dir():
        raise UserError(f"{out} is a directory; give the ISO file name")
    extra = ["--cmdline", args.cmdline] if args.cmdline else []
    extra += ["--no-uefi"] if args.no_uefi else []
    run_kernel_tool(["iso", "--out", str(out.resolve()), *extra])
    print(out)
    return 0


def cmd_installer_iso(args: argparse.Namespace) -> int:
    out: Path = args.out
    if out.exists() and out.is_dir():
        raise UserError(f"{out} is a directory; give the ISO file name")
    run_kernel_tool([
        "iso", "--out", str(out.resolve()), "--with-installer",
        "--install-dst", args.install_dst, "--default", args.default,
        "--menu-timeout", str(args.menu_timeout), *(["--no-uefi"] if args.no_uefi else []),
        *(["--unattended"] if args.unattended else []),
    ])  # fmt: skip
    print(out)
    return 0
