"""iPXE scripts: the chain script every client gets first and the per-machine boot scripts.

Pure functions from plain values (URLs, URIs, an IQN) to script text; no I/O, no store, no
processes. The caller (``appliance/``) decides what a machine boots and passes the addresses
the *client* must use (the appliance as the client sees it, e.g. 10.0.2.2 under QEMU slirp).

Debian's iPXE (2019) does HTTP, iSCSI and TFTP but not HTTPS.
"""

from __future__ import annotations

import logging
import re

log = logging.getLogger(__name__)

# IQN (RFC 3720 3.2.6.3.1): iqn.YYYY-MM.reversed.domain[:anything]
_IQN_RE = re.compile(r"^iqn\.\d{4}-\d{2}\.[a-z0-9.-]+(:[a-z0-9.:_-]+)?$")
_SAFE_ARG_RE = re.compile(r"^[\x21-\x7e]+$")  # printable, no spaces

RESCUE_KERNEL = "vmlinuz"
RESCUE_INITRD = "initrd.img"
#: SCSI LUN the disk is on: tgt's LUN 0 is its controller, so the disk is LUN 1.
DISK_LUN = 1


class ScriptError(ValueError):
    """A value that cannot be put into an iPXE script safely."""


def _check_arg(what: str, value: str) -> str:
    if not _SAFE_ARG_RE.match(value) or "${" in value:
        raise ScriptError(f"bad {what} {value!r}: must be printable without spaces or ${{")
    return value


def chain_script(http_base: str) -> str:
    """The first script (TFTP or DHCP filename): fetch this machine's own script by MAC."""
    base = _check_arg("HTTP base URL", http_base.rstrip("/"))
    return (
        "#!ipxe\n"
        "# DR Appliance: fetch the boot script for this machine\n"
        f"chain --autofree {base}/boot/${{netX/mac:hexhyp}}.ipxe || goto failed\n"
        "exit\n"
        ":failed\n"
        "echo DR Appliance: no boot script (${errno}); booting the local disk\n"
        "exit\n"
    )


def rescue_script(http_base: str, cmdline: str) -> str:
    """Boot the rescue kernel+initramfs from the appliance's HTTP server with ``cmdline``."""
    base = _check_arg("HTTP base URL", http_base.rstrip("/"))
    if "\n" in cmdline or "${" in cmdline:
        raise ScriptError("kernel command line must be one line without ${")
    return (
        "#!ipxe\n"
        "# DR Appliance: bare-metal restore through the rescue system\n"
        "echo DR Appliance: booting the rescue system\n"
        f"kernel {base}/rescue/{RESCUE_KERNEL} initrd={RESCUE_INITRD} {cmdline}\n"
        f"initrd {base}/rescue/{RESCUE_INITRD}\n"
        "boot\n"
    )


def iscsi_root_path(host: str, port: int, iqn: str, lun: int = DISK_LUN) -> str:
    """iPXE/RFC 4173 root path ``iscsi:<server>:<protocol>:<port>:<lun>:<targetname>``."""
    _check_arg("host", host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    if not 0 < port < 65536:
        raise ScriptError(f"bad iSCSI port {port}")
    if not _IQN_RE.match(iqn):
        raise ScriptError(f"bad iSCSI target name {iqn!r}")
    return f"iscsi:{host}::{port}:{lun}:{iqn}"


def sanboot_script(root_path: str, chap: tuple[str, str] | None = None) -> str:
    """Boot from a SAN disk (iSCSI root path); iPXE describes it in the iBFT for the OS.

    ``chap`` = (user, secret): iPXE logs in with them and hands them on in the iBFT, so the
    OS's initiator logs in the same way.
    """
    _check_arg("root path", root_path)
    creds = ""
    if chap is not None:
        user, secret = (_check_arg("CHAP user", chap[0]), _check_arg("CHAP secret", chap[1]))
        creds = f"set username {user}\nset password {secret}\n"
    return (
        "#!ipxe\n"
        "# DR Appliance: SAN boot of a backup point (writes go to an overlay)\n"
        f"{creds}"
        f"echo DR Appliance: SAN boot {root_path}\n"
        f"sanboot {root_path}\n"
    )


def local_script() -> str:
    """Boot the local disk. BIOS: iPXE boots drive 0x80 itself (if that fails, ``exit`` hands
    back to the BIOS, which tries its next boot device). UEFI has no BIOS drive numbers:
    ``exit`` returns to the firmware's boot manager, which goes on to the next boot entry."""
    return (
        "#!ipxe\n"
        "# DR Appliance: boot the local disk\n"
        "echo DR Appliance: booting the local disk\n"
        "iseq ${platform} efi && goto firmware ||\n"
        "sanboot --no-describe --drive 0x80 || goto firmware\n"
        ":firmware\n"
        "exit\n"
    )


def error_script(message: str) -> str:
    """Say why this machine gets nothing on its console, wait, and leave network boot."""
    text = " ".join(message.split())
    if any(c in text for c in "$\\"):
        raise ScriptError(f"message not safe for iPXE: {message!r}")
    return f"#!ipxe\necho DR Appliance: {text}\nsleep 10\nexit\n"


def spent_script(mac: str, retry_s: int = 30) -> str:
    """The answer to a second fetch of a machine's script: its secrets went out with the first
    one. It names the fix and asks again every ``retry_s`` (``pxe assign`` re-arms it), never
    falling through to the local disk (after a failed restore that disk is half-written)."""
    mac = _check_arg("MAC", mac)
    return (
        "#!ipxe\n"
        ":spent\n"
        f"echo DR Appliance: the boot script of {mac} was already handed out; "
        f"run 'appliance pxe assign {mac} ...' to boot it again (retrying in {retry_s} s)\n"
        f"sleep {int(retry_s)}\n"
        "chain --autofree ${cwuri} || goto spent\n"
    )


def unassigned_script(mac: str) -> str:
    """Machines nobody assigned: say so and leave (the BIOS tries its next boot device)."""
    return f"#!ipxe\necho DR Appliance: no assignment for {mac}; leaving network boot\nexit\n"
