"""The appliance disk image and the installer that writes it to a disk from the ISO.

This module owns two build products:

**The appliance disk image** (:func:`build_appliance_image`): a bootable raw disk holding the
appliance itself, made only from what is installed on the build machine (no debootstrap):

* LBA 0: syslinux ``mbr.bin`` + a DOS partition table,
* partition 1 (FAT16, type 0x06, bootable, :data:`BOOT_PART_MIB` MiB): syslinux (BIOS) and
  GRUB as ``/EFI/BOOT/BOOTX64.EFI`` with ``/grub.cfg`` (UEFI), Debian's kernel and a small
  busybox initramfs whose ``/init`` loads the disk + ext4 modules, mounts partition 2
  read-write and ``switch_root``\\ s into it,
* partition 2 (ext4, type 0x83, the rest of the disk), built with ``mkfs.ext4 -d DIR`` (no loop
  device, no mount): busybox, Debian's ``/usr/bin/python3.11`` with its stdlib (minus tests, IDLE,
  tkinter, ...), every shared library the interpreter and the extension modules load (``ldd``),
  the venv's site-packages minus development tools, the project's packages (``appliance``,
  ``dedupstore``, ``vfs``, ``nbd``, ``pxe``, ``image``; byte-compiled), an ``appliance`` command and
  ``/sbin/init`` (:data:`ROOT_INIT`).

The root also carries the host tools the appliance runs (:data:`APPLIANCE_TOOLS`: nbdkit with
its Python plugin, nbdcopy/nbdinfo, fusermount3) with their libraries, and the boot initramfs
loads ``fuse`` and the NIC drivers. The installed system's ``/sbin/init`` prints ``APPLIANCE
INSTALLED SYSTEM READY``, runs DHCP (``APPLIANCE NET <if> <addr>``) and prints ``APPLIANCE ROOT
<size>K`` (the root filesystem's size); on first boot it runs ``appliance
--repo /var/lib/appliance/repo init`` and ``appliance selftest`` (store, NBD export, FUSE mount
on a throw-away repository), later boots ``appliance ... points``; it
prints ``APPLIANCE RESULT rc=N``, then starts the services named by ``appliance.services``
(default ``nbd``: ``appliance nbd serve --listen 0.0.0.0:10809 --tls-psk`` :data:`NBD_PSK_PATH`,
log in /var/log; ``none``) and runs ``getty`` on the console: ``root`` logs in with the admin
password. ``appliance.halt=1`` powers off after the result instead.

Safe defaults (nothing open without a secret): the image holds no ``/etc/shadow`` (root locked);
the installer stores the admin password's SHA-512 crypt hash there (:data:`ADMIN_SH`), and an
image booted without the installer generates one at first boot and prints it once
(``ADMIN PASSWORD <pw>``). NBD leaves the machine only over TLS: the first start of the ``nbd``
service writes a random pre-shared key (``appliance:<64 hex>``, 0600) to :data:`NBD_PSK_PATH`;
clients use a copy of that file (``nbdinfo --list
'nbds://appliance@HOST:10809/?tls-psk-file=FILE'``).

**The installer initramfs** (:func:`build_installer_initramfs`): busybox + disk/CD-ROM/iso9660
modules; its ``/init`` (:data:`INSTALLER_INIT`) finds the install medium (``/dev/sr*``, then any
disk holding an iso9660 filesystem with the image), and writes ``install.src`` (default
:data:`ISO_IMAGE_PATH`, gzip) onto ``install.dst`` (default ``/dev/sda``) with ``gunzip | dd``,
grows partition 2 and its ext4 to the end of the disk (``sfdisk -N 2``, ``e2fsck``, ``resize2fs``;
``install.grow=0`` skips it), prints ``INSTALL OK <bytes>`` (or ``INSTALL FAILED <reason>``) and
powers off (``install.reboot=1``: reboots). It never writes to the medium it booted from.
Before writing it prints ``INSTALL CONFIRM ...`` and waits (``install.confirm_timeout``, default
600 s) for ``yes`` on the console; anything else, or silence, powers off with the disk untouched.
``install.confirm=0`` (an ISO built ``--unattended``) skips the question. Then it asks for the
admin (root) password, typed twice without echo (``INSTALL PASSWORD ...``); an empty answer,
silence, three failed tries or ``install.password=generate`` (``--unattended``) generate one,
printed once as ``ADMIN PASSWORD <pw>`` before ``INSTALL OK``. After writing, it mounts the new
root and stores only the password's salted hash in ``/etc/shadow``.
:func:`installer_iso_extras` gives :func:`kernel.iso.build_iso` the extra boot entry and files.

Every product is cached under :func:`kernel.initramfs.cache_dir`, keyed by its inputs (paths,
sizes and mtimes of every copied file, the scripts, the size); a new appliance image replaces
(deletes) the older cached ones, as each is a few hundred MiB.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import logging
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from kernel.initramfs import (
    BootFiles,
    CpioWriter,
    KernelBuildError,
    ModuleTree,
    add_base_layout,
    add_busybox,
    add_modules,
    cache_dir,
    file_fingerprint,
    find_kernel,
    require_tool,
    shared_libraries,
    write_cached,
)
from kernel.iso import IsoEntry, build_grub_efi
from kernel.rescue import UDHCPC_SCRIPT
from kernel.testdisk import DISK_MODULES, MBR_BIN, PARTITION_START_LBA, SECTOR

log = logging.getLogger(__name__)

#: Bump when the image layout changes so that stale cache entries are not reused.
IMAGE_FORMAT_VERSION = "4"

PYTHON = Path("/usr/bin/python3.11")
PYTHON_STDLIB = Path("/usr/lib/python3.11")
#: Project packages copied into the installed system.
PROJECT_PACKAGES = ("appliance", "dedupstore", "vfs", "nbd", "pxe", "image")
#: Where the venv's site-packages and the project land (on Debian's default ``sys.path``).
DIST_PACKAGES = "usr/lib/python3/dist-packages"
#: Stdlib parts the appliance never needs.
STDLIB_EXCLUDE = (
    "test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "distutils",
    "config-3.11-*", "pydoc_data", "turtle.py", "EXTERNALLY-MANAGED",
)  # fmt: skip
#: Development-only distributions in the venv (top-level names, fnmatch, case-insensitive).
SITE_EXCLUDE = (
    "mypy", "mypy-*", "mypyc", "*__mypyc*", "mypy_extensions*", "librt", "librt-*",
    "ast_serialize", "ast_serialize-*", "_pytest", "pytest", "pytest-*", "pytest_*", "py.py",
    "hypothesis", "hypothesis-*", "_hypothesis_*", "pip", "pip-*", "setuptools", "setuptools-*",
    "_distutils_hack", "distutils-precedence.pth", "wheel", "wheel-*", "ruff", "ruff-*",
    "importlinter", "import_linter-*", "grimp", "grimp-*", "pygments", "pygments-*", "rich",
    "rich-*", "markdown_it", "markdown_it_py-*", "mdurl", "mdurl-*", "pathspec", "pathspec-*",
    "iniconfig", "iniconfig-*", "pluggy", "pluggy-*", "click", "click-*", "__editable__*",
    "dr_appliance*",
)  # fmt: skip

BOOT_PART_MIB = 32
#: ext4 root: content size x this + slack (journal, inodes, the repository's first data).
ROOT_SLACK_FACTOR = 1.4
ROOT_SLACK_MIB = 64
APPLIANCE_MODULES = (*DISK_MODULES, "ahci", "crc32c_generic", "ext4", "fuse",
                     "virtio_net", "e1000", "e1000e")  # fmt: skip
#: Host tools the installed appliance runs (with their libraries): the NBD server and clients,
#: and FUSE's unmount helper. nbdkit's Python plugin comes along from its plugin directory.
APPLIANCE_TOOLS = (("nbdkit", "nbdkit"), ("nbdcopy", "libnbd-bin"), ("nbdinfo", "libnbd-bin"),
                   ("fusermount3", "fuse3"))  # fmt: skip
NBDKIT_PYTHON_PLUGIN = "nbdkit-python-plugin.so"
#: The boot partition's tag file (``/<prefix><random>.id``) that its GRUB searches for.
UEFI_TAG_PREFIX = "dr-appliance-boot-"
#: ext4 lets the installer mount the written root to store the admin password's hash.
INSTALLER_MODULES = (*DISK_MODULES, "ahci", "cdrom", "sr_mod", "isofs", "crc32c_generic", "ext4")
#: Host tools the installer uses to grow the root partition and filesystem to the whole disk.
INSTALLER_BINARIES = (("sfdisk", "fdisk"), ("e2fsck", "e2fsprogs"), ("resize2fs", "e2fsprogs"))
APPLIANCE_CMDLINE = "console=ttyS0 panic=-1 quiet appliance.root=/dev/sda2"
INSTALLER_CMDLINE = "console=ttyS0 panic=-1 quiet install.dst=/dev/sda"
#: The compressed appliance image inside the ISO filesystem.
ISO_IMAGE_PATH = "/install/appliance.img.gz"
ISO_INSTALLER_INITRD = "/boot/install.img"
INSTALL_LABEL = "install"
REPO_PATH = "/var/lib/appliance/repo"
READY_MARKER = "APPLIANCE INSTALLED SYSTEM READY"
#: The installed system's NBD TLS pre-shared key (``IDENTITY:hexkey``, 0600), made at first boot.
NBD_PSK_PATH = "/var/lib/appliance/nbd.psk"
NBD_PSK_IDENTITY = "appliance"
NBD_PORT = 10809
#: The console line that shows a generated admin password, once (at install or first boot).
ADMIN_PASSWORD_MARKER = "ADMIN PASSWORD "  # noqa: S105 (a console marker, not a secret)
#: Length of a generated admin password (57-character alphabet: about 93 bits).
ADMIN_PASSWORD_CHARS = 16

#: Shell functions both the installer and the installed system's init use for the admin (root)
#: password. Random bytes come from /dev/random, which blocks only until the kernel's RNG is
#: seeded (never weak bytes at early boot). The hash is SHA-512 crypt(3) (``$6$``) by busybox
#: ``mkpasswd``, which busybox ``login`` checks; the password itself never touches a disk.
#: busybox's /etc/shadow parser rejects a line whose numeric fields are empty (login then
#: refuses every password), so the line carries them all.
ADMIN_SH = r"""
random_chars() {  # random_chars N: N characters without look-alikes (0/O, 1/l/I)
    rc_out=
    while [ ${#rc_out} -lt "$1" ]; do
        rc_out="$rc_out$(head -c 256 /dev/random | tr -dc 'A-HJ-NP-Za-km-z2-9')"
    done
    printf '%s\n' "$rc_out" | cut -c "1-$1"
}
write_shadow() {  # write_shadow ROOT: root's password (one line on stdin) into ROOT/etc/shadow
    ws_salt=$(random_chars 16)
    ws_hash=$(mkpasswd -m sha512 -P 0 -S "$ws_salt") || return 1
    case "$ws_hash" in '$6$'*) ;; *) return 1 ;; esac
    ws_days=$(( $(date +%s) / 86400 ))
    ( umask 077 && printf 'root:%s:%s:0:99999:7:::\n' "$ws_hash" "$ws_days" \
        > "$1/etc/shadow.new" ) || return 1
    chmod 600 "$1/etc/shadow.new" && mv "$1/etc/shadow.new" "$1/etc/shadow"
}
"""
_CACHED_IMAGE_RE = re.compile(r"^appliance-[0-9a-f]{16}\.img(\.gz)?$")

BOOT_INIT = r"""#!/bin/sh
# DR Appliance installed-system boot init (kernel/installer.py): mount the root, switch to it.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
root=/dev/sda2
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        appliance.root=*) root="${arg#appliance.root=}" ;;
    esac
done
while read -r mod; do insmod "$mod" 2>/dev/null; done < /lib/modules/load.order
i=0
while [ ! -b "$root" ] && [ $i -lt 150 ]; do sleep 0.1; i=$((i + 1)); done
mkdir -p /newroot
if ! mount -t ext4 -o rw "$root" /newroot; then
    echo "APPLIANCE BOOT FAILED cannot mount $root"
    poweroff -f
fi
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot /sbin/init
"""

ROOT_INIT = r"""#!/bin/sh
# DR Appliance installed-system init (kernel/installer.py)
export PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
export HOME=/root LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
hostname appliance
@ADMIN_SH@
halt=0
services=nbd
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        appliance.halt=*) halt="${arg#appliance.halt=}" ;;
        appliance.services=*) services="${arg#appliance.services=}" ;;
    esac
done
echo "APPLIANCE INSTALLED SYSTEM READY"
ip link set lo up
net_up() {  # DHCP on the first interface that gets a lease
    for n in /sys/class/net/*; do
        n=${n##*/}
        [ "$n" = lo ] && continue
        ip link set "$n" up 2>/dev/null
        if udhcpc -i "$n" -n -q -t 3 -T 1 -s /usr/share/udhcpc/default.script >/dev/null 2>&1
        then
            echo "APPLIANCE NET $n $(ip -4 -o addr show dev "$n" | awk '{print $4}')"
            return 0
        fi
    done
    echo "APPLIANCE NET none (no DHCP lease)"
}
net_up
if [ ! -e /etc/shadow ]; then
    # an image written without the installer: generate the admin password, show it once
    pw=$(random_chars @PW_CHARS@)
    if printf '%s\n' "$pw" | write_shadow ""; then
        echo "ADMIN PASSWORD $pw"
        echo "APPLIANCE ADMIN root password generated, shown once above (change: passwd -a sha512)"
    else
        echo "APPLIANCE ADMIN cannot set a root password: console login stays locked"
    fi
    pw=
fi
set -- $(df -k / | tail -n 1)
echo "APPLIANCE ROOT ${2}K"
if [ -e /var/lib/appliance/repo/config.json ]; then
    echo "APPLIANCE RUN points"
    appliance --repo /var/lib/appliance/repo points 2>&1
    rc=$?
else
    echo "APPLIANCE RUN init"
    mkdir -p /var/lib/appliance
    appliance --repo /var/lib/appliance/repo init 2>&1
    rc=$?
    # first boot: prove the installed stack works (store, nbdkit + plugin, FUSE)
    echo "APPLIANCE RUN selftest"
    appliance selftest 2>&1 || rc=$?
fi
echo "APPLIANCE RESULT rc=$rc"
sync
if [ "$halt" = 1 ]; then
    mount -o remount,ro / 2>/dev/null
    poweroff -f
fi
mkdir -p /var/log
for svc in $(echo "$services" | tr , ' '); do
    case "$svc" in
        nbd)
            # NBD off loopback only with TLS: a pre-shared key made here once, kept 0600
            psk=@PSK_PATH@
            if [ ! -s "$psk" ]; then
                key=$(head -c 32 /dev/random | od -An -tx1 -v | tr -d ' \n')
                ( umask 077 && echo "@PSK_ID@:$key" > "$psk.new" ) && mv "$psk.new" "$psk" \
                    && echo "APPLIANCE NBD PSK created $psk (clients need a copy)"
                key=
            fi
            chmod 600 "$psk"
            setsid appliance --repo /var/lib/appliance/repo nbd serve \
                --listen 0.0.0.0:@NBD_PORT@ --tls-psk "$psk" > /var/log/appliance-nbd.log 2>&1 &
            echo "APPLIANCE SERVICE nbd 0.0.0.0:@NBD_PORT@ pid $! tls-psk $psk identity @PSK_ID@"
            ;;
        none) ;;
        *) echo "APPLIANCE SERVICE $svc unknown (known: nbd, none)" ;;
    esac
done
# the console needs a login (root, the admin password); getty respawns after each logout
tty=$(awk '{print $NF}' /sys/class/tty/console/active 2>/dev/null)
[ -c "/dev/$tty" ] || tty=ttyS0
while :; do getty -L 115200 "$tty" vt100; sleep 1; done
"""
ROOT_INIT = (
    ROOT_INIT.replace("@ADMIN_SH@", ADMIN_SH.strip())
    .replace("@PW_CHARS@", str(ADMIN_PASSWORD_CHARS))
    .replace("@PSK_PATH@", NBD_PSK_PATH)
    .replace("@PSK_ID@", NBD_PSK_IDENTITY)
    .replace("@NBD_PORT@", str(NBD_PORT))
)

APPLIANCE_SCRIPT = """#!/usr/bin/python3
# DR Appliance command (kernel/installer.py), like the `appliance` console script.
import sys

from appliance.cli import main

sys.exit(main())
"""

INSTALLER_INIT = r"""#!/bin/sh
# DR Appliance installer init (kernel/installer.py): write the appliance image to a disk.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
src=/install/appliance.img.gz
dst=/dev/sda
do_reboot=0
do_grow=1
do_confirm=1
confirm_timeout=600
password=ask
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        install.confirm=*) do_confirm="${arg#install.confirm=}" ;;
        install.password=*) password="${arg#install.password=}" ;;
        install.confirm_timeout=*) confirm_timeout="${arg#install.confirm_timeout=}" ;;
        install.grow=*) do_grow="${arg#install.grow=}" ;;
        install.src=*) src="${arg#install.src=}" ;;
        install.dst=*) dst="${arg#install.dst=}" ;;
        install.reboot=*) do_reboot="${arg#install.reboot=}" ;;
    esac
done
while read -r mod; do insmod "$mod" 2>/dev/null; done < /lib/modules/load.order
echo "INSTALLER READY"

fail() { echo "INSTALL FAILED $*"; return 1; }
@ADMIN_SH@
read_secret() {  # read_secret VAR PROMPT: one line from the console, not echoed
    stty -echo < /dev/console 2>/dev/null
    echo "INSTALL PASSWORD $2"  # after stty: what is typed once the prompt shows is not echoed
    IFS= read -r -t "$confirm_timeout" "$1" < /dev/console
    stty echo < /dev/console 2>/dev/null
    echo
}

ask_password() {  # sets pw (empty: generate one); asks unless install.password=generate
    pw=
    [ "$password" = ask ] || return 0
    tries=0
    while [ $tries -lt 3 ]; do
        tries=$((tries + 1))
        p1=
        read_secret p1 "type the admin (root) password, or Enter to generate one:"
        [ -n "$p1" ] || return 0
        if [ ${#p1} -lt 8 ]; then
            echo "INSTALL PASSWORD too short (at least 8 characters)"
            continue
        fi
        p2=
        read_secret p2 "again:"
        if [ "$p1" = "$p2" ]; then
            pw=$p1
            p1= p2=
            return 0
        fi
        echo "INSTALL PASSWORD the two entries differ"
    done
    p1= p2=
    echo "INSTALL PASSWORD none set after 3 tries: generating one"
}

root_part() {
    case "$dst" in
        *[0-9]) echo "${dst}p2" ;;
        *) echo "${dst}2" ;;
    esac
}

set_password() {  # store the hash of $pw (generated if empty) on the installed root
    part=$(root_part)
    # grow() re-read the partition table; without it the kernel may not know partition 2 yet
    [ "$do_grow" = 1 ] && [ -b "$part" ] || blockdev --rereadpt "$dst" 2>/dev/null
    i=0
    while [ ! -b "$part" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    generated=0
    if [ -z "$pw" ]; then
        pw=$(random_chars @PW_CHARS@)
        generated=1
    fi
    mkdir -p /target
    mount -t ext4 "$part" /target || { fail "cannot mount $part for the admin password"; return 1; }
    if ! printf '%s\n' "$pw" | write_shadow /target; then
        umount /target
        fail "cannot store the admin password on $part"
        return 1
    fi
    umount /target || { fail "cannot unmount $part"; return 1; }
    if [ "$generated" = 1 ]; then
        echo "ADMIN PASSWORD $pw"
        echo "INSTALL PASSWORD generated for root (shown once, above: note it now)"
    else
        echo "INSTALL PASSWORD set for root"
    fi
    pw=
}

find_medium() {
    mkdir -p /cdrom
    i=0
    while [ $i -lt 100 ]; do
        for d in /dev/sr* /dev/sd? /dev/vd? /dev/nvme?n?; do
            [ -b "$d" ] || continue
            [ "$d" = "$dst" ] && continue
            if mount -t iso9660 -o ro "$d" /cdrom 2>/dev/null; then
                if [ -f "/cdrom$src" ]; then
                    medium=$d
                    return 0
                fi
                umount /cdrom
            fi
        done
        sleep 0.2
        i=$((i + 1))
    done
    return 1
}

grow() {
    part=$(root_part)
    echo ", +" | sfdisk -q --no-reread --no-tell-kernel -N 2 "$dst" >/dev/null 2>&1 \
        || { echo "INSTALL WARNING cannot grow partition 2 of $dst"; return 1; }
    blockdev --rereadpt "$dst" 2>/dev/null
    i=0
    while [ ! -b "$part" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    e2fsck -fy "$part" >/dev/null 2>&1
    resize2fs "$part" >/dev/null 2>&1 \
        || { echo "INSTALL WARNING resize2fs $part failed"; return 1; }
    echo "INSTALL GROW $part $(( $(cat "/sys/class/block/${part##*/}/size") * 512 ))"
}

install() {
    i=0
    while [ ! -b "$dst" ] && [ $i -lt 150 ]; do sleep 0.1; i=$((i + 1)); done
    [ -b "$dst" ] || { fail "no target disk $dst"; return 1; }
    find_medium || { fail "no medium holding $src"; return 1; }
    # gzip's trailer holds the uncompressed size (mod 4 GiB; the image is smaller)
    need=$(tail -c 4 "/cdrom$src" | od -An -tu4 | tr -d ' ')
    have=$(( $(cat "/sys/class/block/${dst##*/}/size") * 512 ))
    [ "$need" -le "$have" ] || { fail "$dst too small ($have < $need bytes)"; return 1; }
    if [ "$do_confirm" != 0 ]; then
        echo "INSTALL CONFIRM this ERASES $dst ($have bytes). Type yes and Enter to install:"
        answer=
        read -r -t "$confirm_timeout" answer < /dev/console
        [ "$answer" = yes ] || { fail "not confirmed, $dst untouched"; return 1; }
    fi
    ask_password
    echo "INSTALL START $medium:$src -> $dst ($need bytes)"
    gunzip -c "/cdrom$src" | dd of="$dst" bs=1M conv=fsync 2>/dev/null \
        || { fail "write to $dst failed"; return 1; }
    sync
    [ "$do_grow" = 1 ] && grow
    set_password || return 1
    sync
    echo "INSTALL OK $need"
}

install
umount /cdrom 2>/dev/null
sync
if [ "$do_reboot" = 1 ]; then reboot -f; fi
poweroff -f
"""
INSTALLER_INIT = INSTALLER_INIT.replace("@ADMIN_SH@", ADMIN_SH.strip()).replace(
    "@PW_CHARS@", str(ADMIN_PASSWORD_CHARS)
)


# --------------------------------------------------------------------------------------------
# helpers


def _run(cmd: list[str], *, stdin: str | None = None) -> None:
    log.debug("run %s", cmd)
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise KernelBuildError(
            f"{Path(cmd[0]).name} failed ({proc.returncode}): {detail[-1] if detail else ''}"
        )


def _excluded(name: str, patterns: Iterable[str]) -> bool:
    low = name.lower()
    return any(fnmatch.fnmatchcase(low, p.lower()) for p in patterns)


def _walk_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in sorted(filenames):
            yield Path(dirpath) / f


def project_root_default() -> Path:
    """The source tree this ``kernel`` package lives in."""
    return Path(__file__).resolve().parent.parent


def site_packages(project_root: Path) -> Path:
    """The venv's site-packages of ``project_root`` (``.venv/lib/python3.11/site-packages``)."""
    path = project_root / ".venv" / "lib" / "python3.11" / "site-packages"
    if not path.is_dir():
        raise KernelBuildError(f"{path} missing: create the venv first (python3.11 -m venv .venv)")
    return path


def _root_sources(project_root: Path) -> list[tuple[Path, str, tuple[str, ...]]]:
    """(source dir, destination in the root fs, top-level exclusions) for every copied tree."""
    sources = [
        (PYTHON_STDLIB, "usr/lib/python3.11", STDLIB_EXCLUDE),
        (site_packages(project_root), DIST_PACKAGES, SITE_EXCLUDE),
    ]
    for pkg in PROJECT_PACKAGES:
        src = project_root / pkg
        if not (src / "__init__.py").is_file():
            raise KernelBuildError(f"project package {src} missing")
        sources.append((src, f"{DIST_PACKAGES}/{pkg}", ("__pycache__",)))
    return sources


def _copy_tree(src: Path, dst: Path, exclude: tuple[str, ...]) -> None:
    """Copy ``src`` to ``dst`` (mtimes kept, so .pyc stay valid), skipping excluded top-level
    entries, ``test``/``tests`` directories, and ``__pycache__`` if ``exclude`` names it."""
    dst.mkdir(parents=True, exist_ok=True)
    skip_pycache = "__pycache__" in exclude
    for entry in sorted(src.iterdir()):
        if _excluded(entry.name, exclude):
            continue
        target = dst / entry.name
        if entry.is_symlink():
            target.symlink_to(os.readlink(entry))
        elif entry.is_dir():
            shutil.copytree(
                entry,
                target,
                symlinks=True,
                ignore=shutil.ignore_patterns("__pycache__", "tests", "test")
                if skip_pycache
                else shutil.ignore_patterns("tests", "test"),
            )
        else:
            shutil.copy2(entry, target)


def _loader_deps(binary: Path) -> set[Path]:
    """Libraries ``binary`` (an executable or a .so) loads, via ``ldd``; missing ones logged."""
    proc = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
    libs: set[Path] = set()
    for line in proc.stdout.splitlines():
        line = line.strip()
        if "not found" in line:
            log.warning("%s: %s (skipped)", binary, line)
            continue
        path = line.split("=>")[-1].strip().split(" (")[0].strip()
        if path.startswith("/"):
            libs.add(Path(path))
    return libs


def _add_libraries(root: Path, binaries: Iterable[Path]) -> int:
    """Copy every library the ELF ``binaries`` need into ``root`` at the path ldd names."""
    libs: set[Path] = set()
    for b in binaries:
        libs |= _loader_deps(b)
    for lib in sorted(libs):
        target = root / str(lib).lstrip("/")
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(lib, target)
        target.chmod(0o755)
    return len(libs)


def _add_tools(root: Path) -> list[Path]:
    """Copy :data:`APPLIANCE_TOOLS` and nbdkit's Python plugin to their host paths in ``root``.

    Returns the copies (ELF files whose libraries the caller adds).
    """
    nbdkit = require_tool("nbdkit", "nbdkit")
    config = subprocess.run([nbdkit, "--dump-config"], capture_output=True, text=True,
                            check=True).stdout  # fmt: skip
    plugindir = next((line.split("=", 1)[1] for line in config.splitlines()
                      if line.startswith("plugindir=")), "")  # fmt: skip
    plugin = Path(plugindir) / NBDKIT_PYTHON_PLUGIN
    if not plugin.is_file():
        raise KernelBuildError(f"{plugin} missing (apt-get install nbdkit-plugin-python)")
    sources = [Path(require_tool(name, pkg)).resolve() for name, pkg in APPLIANCE_TOOLS]
    copied = []
    for src in [*sources, plugin]:
        dst = root / str(src).lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        copied.append(dst)
    return copied


def _is_elf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# the root filesystem and the boot initramfs


def populate_root(root: Path, *, project_root: Path) -> None:
    """Fill the directory ``root`` with the installed system's files (see module docstring)."""
    busybox = Path("/bin/busybox")
    if not busybox.is_file():
        raise KernelBuildError(f"{busybox} missing (apt-get install busybox-static)")
    if not PYTHON.is_file():
        raise KernelBuildError(f"{PYTHON} missing (apt-get install python3.11)")
    for d in ("dev", "proc", "sys", "tmp", "run", "root", "mnt", "etc", "var/lib/appliance",
              "bin", "sbin", "usr/bin", "usr/sbin", "usr/local/bin", "lib64"):  # fmt: skip
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "var/lib/appliance").chmod(0o700)  # the repository and the NBD key
    shutil.copy2(busybox, root / "bin/busybox")
    applets = subprocess.run(
        [str(busybox), "--list-full"], check=True, capture_output=True, text=True
    ).stdout.split()
    for applet in applets:
        target = root / applet
        if applet != "bin/busybox" and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to("/bin/busybox")
    shutil.copy2(PYTHON, root / "usr/bin/python3.11")
    (root / "usr/bin/python3").symlink_to("python3.11")
    for src, dest, exclude in _root_sources(project_root):
        _copy_tree(src, root / dest, exclude)
    # byte-compile (the project's sources come without __pycache__; stale .pyc are redone): the
    # guest cannot afford compiling on every start under emulation
    _run([str(PYTHON), "-m", "compileall", "-q", "-j", "0", str(root / DIST_PACKAGES)])
    elves = [root / "usr/bin/python3.11", *_add_tools(root)]
    for sub in ("usr/lib/python3.11", DIST_PACKAGES):
        elves += [p for p in _walk_files(root / sub)
                  if ".so" in p.name and not p.is_symlink() and _is_elf(p)]  # fmt: skip
    n = _add_libraries(root, elves)
    log.info("root fs: %d ELF files, %d shared libraries", len(elves), n)
    (root / "usr/local/bin/appliance").write_text(APPLIANCE_SCRIPT)
    (root / "usr/local/bin/appliance").chmod(0o755)
    (root / "sbin/init").unlink(missing_ok=True)
    (root / "sbin/init").write_text(ROOT_INIT)
    (root / "sbin/init").chmod(0o755)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")
    (root / "etc/hostname").write_text("appliance\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost appliance\n")
    (root / "etc/fstab").write_text("/dev/sda2 / ext4 rw 0 1\n")
    # a login shell starts from a clean environment: give it what the init has
    (root / "etc/profile").write_text(
        "export PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin\n"
        "export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu\n"
        "export LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 PS1='appliance# '\n"
    )
    (root / "etc/issue").write_text("DR Appliance: log in as root with the admin password\n\n")
    # no /etc/shadow: root is locked until the installer (or the first boot) sets the password
    (root / "root").chmod(0o700)
    (root / "etc/resolv.conf").write_text("")
    script = root / "usr/share/udhcpc/default.script"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(UDHCPC_SCRIPT)
    script.chmod(0o755)


def build_boot_initramfs() -> BootFiles:
    """Debian's kernel and the (cached) initramfs that mounts the ext4 root and switches to it."""
    kernel, version = find_kernel()
    tree = ModuleTree.load(version)
    order = tree.load_order(APPLIANCE_MODULES)
    key = [
        BOOT_INIT,
        version,
        file_fingerprint(Path("/bin/busybox")),
        *(file_fingerprint(tree.root / rel) for rel in order),
    ]

    def build() -> bytes:
        cpio = CpioWriter()
        add_base_layout(cpio)
        add_busybox(cpio)
        add_modules(cpio, tree, APPLIANCE_MODULES)
        cpio.file("init", BOOT_INIT.encode(), 0o755)
        return cpio.finish()

    return BootFiles(kernel=kernel, initrd=write_cached(key, "appliance-boot", build))


def build_installer_initramfs() -> BootFiles:
    """Debian's kernel and the (cached) installer initramfs (see module docstring)."""
    kernel, version = find_kernel()
    tree = ModuleTree.load(version)
    order = tree.load_order(INSTALLER_MODULES)
    binaries = [Path(require_tool(name, pkg)).resolve() for name, pkg in INSTALLER_BINARIES]
    libs: dict[Path, None] = {}
    for b in binaries:
        libs.update(dict.fromkeys(shared_libraries(b)))
    key = [
        INSTALLER_INIT,
        version,
        *(file_fingerprint(p) for p in (Path("/bin/busybox"), *binaries, *libs)),
        *(file_fingerprint(tree.root / rel) for rel in order),
    ]

    def build() -> bytes:
        cpio = CpioWriter()
        add_base_layout(cpio)
        cpio.mkdir("cdrom")
        add_busybox(cpio)
        add_modules(cpio, tree, INSTALLER_MODULES)
        for b in binaries:  # replaces busybox's applets of the same name, if any
            cpio.copy(f"usr/sbin/{b.name}", b, 0o755)
        for lib in libs:
            cpio.copy(str(lib), lib, 0o755)
        cpio.symlink("etc/mtab", "/proc/mounts")
        cpio.file("init", INSTALLER_INIT.encode(), 0o755)
        return cpio.finish()

    return BootFiles(kernel=kernel, initrd=write_cached(key, "installer", build))


# --------------------------------------------------------------------------------------------
# the disk image


def _image_key(project_root: Path, size_mib: int | None, boot: BootFiles) -> str:
    h = hashlib.sha256()
    for part in (IMAGE_FORMAT_VERSION, str(size_mib), ROOT_INIT, APPLIANCE_SCRIPT, UDHCPC_SCRIPT,
                 appliance_grub_cfg(),
                 APPLIANCE_CMDLINE, str(BOOT_PART_MIB), file_fingerprint(boot.kernel),
                 file_fingerprint(boot.initrd), file_fingerprint(PYTHON),
                 file_fingerprint(Path("/bin/busybox")), file_fingerprint(MBR_BIN)):  # fmt: skip
        h.update(part.encode() + b"\0")
    for src, dest, exclude in _root_sources(project_root):
        h.update(f"{dest}|{','.join(exclude)}\0".encode())
        for p in _walk_files(src):
            if "__pycache__" in p.parts:
                continue
            st = p.lstat()
            h.update(f"{p.relative_to(src)}:{st.st_size}:{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


def _tree_bytes(root: Path) -> int:
    total = 0
    for p in _walk_files(root):
        if not p.is_symlink():
            total += p.stat().st_size
    return total


def _write_image(out: Path, root: Path, boot: BootFiles, size_mib: int | None) -> None:
    mkfs_vfat = require_tool("mkfs.vfat", "dosfstools")
    mkfs_ext4 = require_tool("mkfs.ext4", "e2fsprogs")
    mcopy = require_tool("mcopy", "mtools")
    syslinux = require_tool("syslinux", "syslinux")
    sfdisk = require_tool("sfdisk", "fdisk")
    if not MBR_BIN.is_file():
        raise KernelBuildError(f"{MBR_BIN} missing (apt-get install syslinux-common)")
    content_mib = _tree_bytes(root) / (1 << 20)
    root_mib = int(content_mib * ROOT_SLACK_FACTOR) + ROOT_SLACK_MIB
    min_mib = 1 + BOOT_PART_MIB + root_mib
    if size_mib is None:
        size_mib = min_mib
    elif size_mib < min_mib:
        raise KernelBuildError(f"size_mib {size_mib} too small: the appliance needs {min_mib}")
    root_mib = size_mib - 1 - BOOT_PART_MIB
    boot_sectors = BOOT_PART_MIB * 2048
    root_start = PARTITION_START_LBA + boot_sectors
    root_sectors = root_mib * 2048
    tmp = out.parent
    fat = tmp / "boot.img"
    _run([mkfs_vfat, "-C", "-F", "16", "-h", str(PARTITION_START_LBA), "-n", "DRBOOT",
          str(fat), str(boot_sectors // 2)])  # fmt: skip
    cfg = tmp / "syslinux.cfg"
    cfg.write_text(
        "SERIAL 0 115200\nDEFAULT appliance\nPROMPT 0\nTIMEOUT 0\n"
        "LABEL appliance\n  KERNEL /vmlinuz\n  INITRD /initrd.gz\n"
        f"  APPEND {APPLIANCE_CMDLINE}\n"
    )
    for src, name in ((boot.kernel, "vmlinuz"), (boot.initrd, "initrd.gz"), (cfg, "syslinux.cfg")):
        _run([mcopy, "-i", str(fat), "-o", str(src), f"::/{name}"])
    _run([syslinux, "--install", str(fat)])
    _add_uefi_boot(fat, tmp)
    ext4 = tmp / "root.img"
    _run([mkfs_ext4, "-q", "-F", "-L", "appliance", "-E", "root_owner=0:0",
          "-d", str(root), str(ext4), f"{root_mib}M"])  # fmt: skip
    with out.open("wb") as f:
        f.truncate(size_mib << 20)
    _run(
        [sfdisk, "--no-reread", "--no-tell-kernel", "-q", str(out)],
        stdin=(
            "label: dos\n"
            f"start={PARTITION_START_LBA}, size={boot_sectors}, type=6, bootable\n"
            f"start={root_start}, size={root_sectors}, type=83\n"
        ),
    )
    with out.open("r+b") as f:
        for part, lba in ((fat, PARTITION_START_LBA), (ext4, root_start)):
            f.seek(lba * SECTOR)
            with part.open("rb") as src_f:
                while chunk := src_f.read(1 << 20):
                    if chunk.count(0) == len(chunk):
                        f.seek(len(chunk), os.SEEK_CUR)  # keep the image sparse
                    else:
                        f.write(chunk)
        f.seek(0)
        f.write(MBR_BIN.read_bytes()[:440])


def appliance_grub_cfg(cmdline: str = APPLIANCE_CMDLINE) -> str:
    """GRUB's twin of the boot partition's syslinux.cfg (UEFI firmware boots through it)."""
    return (
        "serial --unit=0 --speed=115200\n"
        "terminal_input serial console\nterminal_output serial console\n"
        "set timeout=0\n"
        "menuentry 'DR Appliance' {\n"
        f"  linux /vmlinuz {cmdline}\n"
        "  initrd /initrd.gz\n"
        "}\n"
    )


def _add_uefi_boot(fat: Path, work: Path) -> None:
    """Make the FAT boot partition UEFI-bootable too: GRUB as /EFI/BOOT/BOOTX64.EFI (the
    removable-media path firmware tries), finding this partition by a per-image tag file and
    reading /grub.cfg (:func:`appliance_grub_cfg`)."""
    mmd, mcopy = require_tool("mmd", "mtools"), require_tool("mcopy", "mtools")
    tag = f"/{UEFI_TAG_PREFIX}{secrets.token_hex(8)}.id"
    efi, cfg, tag_file = work / "BOOTX64.EFI", work / "grub.cfg", work / "tag.id"
    build_grub_efi(efi, tag, "/grub.cfg", work)
    cfg.write_text(appliance_grub_cfg())
    tag_file.write_text("DR Appliance boot partition\n")
    _run([mmd, "-i", str(fat), "::/EFI", "::/EFI/BOOT"])
    for src, name in ((efi, "EFI/BOOT/BOOTX64.EFI"), (cfg, "grub.cfg"), (tag_file, tag[1:])):
        _run([mcopy, "-i", str(fat), "-o", str(src), f"::/{name}"])


def cached_appliance_image(*, project_root: Path | None = None,
                           size_mib: int | None = None) -> Path:  # fmt: skip
    """The appliance disk image in the build cache, built if its inputs changed."""
    project_root = Path(project_root or project_root_default()).resolve()
    boot = build_boot_initramfs()
    key = _image_key(project_root, size_mib, boot)
    out = cache_dir() / f"appliance-{key}.img"
    if out.is_file():
        log.info("appliance image cache hit %s", out)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".appliance-") as td:
        tmp = Path(td)
        root = tmp / "root"
        populate_root(root, project_root=project_root)
        image = tmp / "disk.img"
        _write_image(image, root, boot, size_mib)
        image.replace(out)
    for old in out.parent.glob("appliance-*.img*"):
        if _CACHED_IMAGE_RE.match(old.name) and not old.name.startswith(out.name):
            log.info("removing stale cached image %s", old)
            old.unlink(missing_ok=True)
    log.info("built appliance image %s (%d MiB)", out, out.stat().st_size >> 20)
    return out


def cached_appliance_image_gz(*, project_root: Path | None = None) -> Path:
    """``gzip -1`` of :func:`cached_appliance_image` (what the ISO ships), cached next to it."""
    image = cached_appliance_image(project_root=project_root)
    out = image.with_name(image.name + ".gz")
    if out.is_file():
        return out
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".appliance-gz-")
    with (
        os.fdopen(fd, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as gz,
        image.open("rb") as src,
    ):
        shutil.copyfileobj(src, gz, 1 << 20)
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
    log.info("compressed appliance image %s (%d bytes)", out, out.stat().st_size)
    return out


def build_appliance_image(
    out: Path, *, project_root: Path | None = None, size_mib: int | None = None
) -> Path:
    """Write the bootable appliance disk image to ``out`` (sparse); ``size_mib`` None = minimal.

    Returns ``out``. See the module docstring for the layout.
    """
    image = cached_appliance_image(project_root=project_root, size_mib=size_mib)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    cp = shutil.which("cp")
    if cp:
        _run([cp, "--sparse=always", str(image), str(tmp)])
    else:  # pragma: no cover - coreutils is always there on Debian
        shutil.copyfile(image, tmp)
    os.replace(tmp, out)
    return out


def installer_iso_extras(
    *, project_root: Path | None = None, dst: str = "/dev/sda", unattended: bool = False
) -> tuple[list[IsoEntry], dict[str, Path]]:
    """The ``install`` boot entry and the files (installer initramfs, image) for the ISO.

    The installer asks for ``yes`` before it erases ``dst`` and for the admin password unless
    ``unattended`` (then it generates the password and prints it once).
    """
    if any(c.isspace() for c in dst) or not dst.startswith("/dev/"):
        raise KernelBuildError(f"bad install destination {dst!r}: expected /dev/...")
    installer = build_installer_initramfs()
    image_gz = cached_appliance_image_gz(project_root=project_root)
    cmdline = INSTALLER_CMDLINE.replace("install.dst=/dev/sda", f"install.dst={dst}")
    entry = IsoEntry(
        label=INSTALL_LABEL,
        kernel="/boot/vmlinuz",
        initrd=ISO_INSTALLER_INITRD,
        cmdline=f"{cmdline} install.src={ISO_IMAGE_PATH}"
        + (" install.confirm=0 install.password=generate" if unattended else ""),
        description=f"install the DR Appliance on {dst} (ERASES {dst}"
        + (", without asking)" if unattended else ", asks first)"),
    )
    files = {ISO_INSTALLER_INITRD: installer.initrd, ISO_IMAGE_PATH: image_gz}
    return [entry], files
