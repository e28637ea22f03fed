"""The bare-metal restore rescue system: Debian's kernel + a busybox/nbdcopy initramfs.

This module owns the rescue initramfs and its restore protocol. The rescue system boots (PXE,
ISO, ``-kernel``), prints ``RESCUE READY``, and reads its restore order from the kernel command
line:

=====================  ==========================================================================
``restore.src=URI``    NBD URI of the backup point's disk, e.g. ``nbd://10.0.2.2:10809/export``;
                       several disks: a comma-separated list (disk0 first).
                       Absent: no restore, a shell is started on the console.
``restore.dst=DEV``    local block device to overwrite (default ``/dev/sda``); with several
                       sources, as many comma-separated devices, in the same order.
``restore.zero=1``     the destination is known to be all zeroes (a new/blank disk): nbdcopy gets
                       ``--destination-is-zero`` and skips every hole/zero extent the server
                       reports with NBD block status. Default 0: zero extents are written as
                       zeroes (efficiently, ``BLKZEROOUT``), which is correct on a used disk.
``restore.reboot=1``   ``reboot -f`` after a successful restore (and, with ``restore.report``,
                       once the appliance confirmed it). Default 0: shell. A failed restore
                       never reboots: the machine stays here with the error on its console (a
                       reboot would boot the half-written local disk).
``restore.report=URL`` the appliance's callback for this assignment (``.../rescue/<token>``):
                       ``POST URL/done`` after success (retried; the PXE assignment is consumed
                       only then), ``POST URL/failed`` with the reason after a failure.
``restore.psk=U:HEX``  TLS-PSK identity for ``nbds://`` sources, written to ``/etc/nbd.psk``
                       (the sources name it: ``nbds://U@HOST:PORT/EXPORT?tls-psk-file=...``).
``restore.ip=dhcp``    how to configure the network; only ``dhcp`` (``udhcpc``) is supported.
=====================  ==========================================================================

The restore brings up every network interface driver it carries (virtio_net, e1000, e1000e),
runs DHCP on the first interface that gets a lease, then per disk ``nbdinfo --size`` (the
device must be large enough) and ``nbdcopy --flush SRC DST``, and prints ``RESTORE START`` per
disk, then ``RESTORE OK <total bytes>`` or ``RESTORE FAILED <reason>``, then ``REPORTED done``
/ ``REPORTED failed`` once the appliance accepted the callback, and after a failure
``RESCUE HALTED`` (it stays in the rescue shell).
"""

from __future__ import annotations

import logging
import re
import shlex
import shutil
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
    copy_into,
    file_fingerprint,
    find_kernel,
    library_closure,
    require_tool,
    write_cached,
)
from kernel.testdisk import DISK_MODULES

log = logging.getLogger(__name__)

RESCUE_CMDLINE = "console=ttyS0 panic=-1 quiet"
RESCUE_MODULES = (*DISK_MODULES, "ahci", "nvme", "virtio_net", "e1000", "e1000e")
#: Dynamically linked tools copied with their libraries and the loader.
RESCUE_BINARIES = ("nbdcopy", "nbdinfo")

UDHCPC_SCRIPT = r"""#!/bin/sh
# udhcpc event script (kernel/rescue.py): configure the interface, default route and DNS.
case "$1" in
    deconfig)
        ip -4 addr flush dev "$interface"
        ip link set "$interface" up
        ;;
    bound|renew)
        ip -4 addr flush dev "$interface"
        ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}" up
        if [ -n "$router" ]; then
            while route del default gw 0.0.0.0 dev "$interface" 2>/dev/null; do :; done
            for r in $router; do route add default gw "$r" dev "$interface"; break; done
        fi
        : > /etc/resolv.conf
        [ -n "$domain" ] && echo "search $domain" >> /etc/resolv.conf
        for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
        echo "DHCP $interface $ip router ${router:-none}"
        ;;
esac
exit 0
"""

INIT_SCRIPT = r"""#!/bin/sh
# DR Appliance rescue init (kernel/rescue.py)
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
export HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
src=
dst=/dev/sda
zero=0
do_reboot=0
ipmode=dhcp
report_url=
psk=
reason=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        restore.src=*) src="${arg#restore.src=}" ;;
        restore.dst=*) dst="${arg#restore.dst=}" ;;
        restore.zero=*) zero="${arg#restore.zero=}" ;;
        restore.reboot=*) do_reboot="${arg#restore.reboot=}" ;;
        restore.ip=*) ipmode="${arg#restore.ip=}" ;;
        restore.report=*) report_url="${arg#restore.report=}" ;;
        restore.psk=*) psk="${arg#restore.psk=}" ;;
    esac
done
if [ -n "$psk" ]; then
    (umask 077; echo "$psk" > /etc/nbd.psk)
fi
while read -r mod; do insmod "$mod" 2>/dev/null; done < /lib/modules/load.order
ip link set lo up
hostname rescue
echo "RESCUE READY"

fail() { reason="$*"; echo "RESTORE FAILED $*"; return 1; }

# report done|failed MESSAGE TRIES: tell the appliance (every 3 s, TRIES times)
report() {
    [ -n "$report_url" ] || return 0
    i=0
    while [ $i -lt "$3" ]; do
        if wget -q -O /dev/null --post-data "$2" "$report_url/$1"; then
            echo "REPORTED $1"
            return 0
        fi
        sleep 3
        i=$((i + 1))
    done
    echo "could not report '$1' to the appliance at $report_url"
    return 1
}

network_up() {
    [ "$ipmode" = dhcp ] || { fail "unsupported restore.ip=$ipmode"; return 1; }
    i=0
    while [ $i -lt 100 ]; do
        for n in /sys/class/net/*; do
            n=${n##*/}
            [ "$n" = lo ] && continue
            ip link set "$n" up 2>/dev/null
            if udhcpc -i "$n" -n -q -t 5 -T 1 -s /usr/share/udhcpc/default.script; then
                return 0
            fi
        done
        sleep 0.2
        i=$((i + 1))
    done
    fail "no network (DHCP)"
}

restore() {
    # src and dst are comma-separated lists: disk0 -> first device, disk1 -> second, ...
    srcs=$(echo "$src" | tr , ' ')
    dsts=$(echo "$dst" | tr , ' ')
    nsrc=$(echo $srcs | wc -w)
    ndst=$(echo $dsts | wc -w)
    [ "$nsrc" = "$ndst" ] || { fail "restore.src has $nsrc disk(s), restore.dst $ndst"; return 1; }
    for d in $dsts; do
        i=0
        while [ ! -b "$d" ] && [ $i -lt 150 ]; do sleep 0.1; i=$((i + 1)); done
        [ -b "$d" ] || { fail "no block device $d"; return 1; }
    done
    network_up || return 1
    total=0
    set -- $dsts
    for s in $srcs; do
        d=$1
        shift
        size=$(nbdinfo --size "$s") || { fail "cannot reach $s"; return 1; }
        have=$(( $(cat "/sys/class/block/${d##*/}/size") * 512 ))
        [ "$size" -le "$have" ] || { fail "$d too small ($have < $size bytes)"; return 1; }
        echo "RESTORE START $s -> $d ($size bytes)"
        flags=--flush
        [ "$zero" = 1 ] && flags="$flags --destination-is-zero"
        nbdcopy $flags "$s" "$d" || { fail "nbdcopy $s exited $?"; return 1; }
        total=$((total + size))
    done
    sync
    echo "RESTORE OK $total"
}

if [ -n "$src" ]; then
    if restore; then
        if report done "RESTORE OK $total" 20; then
            if [ "$do_reboot" = 1 ]; then
                sync
                reboot -f
            fi
        else
            echo "the restore succeeded but the appliance did not confirm it: not rebooting"
            echo "(appliance pxe assign MAC local, then reboot this machine)"
        fi
    else
        report failed "$reason" 3
        echo "RESCUE HALTED: the restore failed ($reason); this machine stays in the rescue"
        echo "system (its disk is incomplete). The assignment stays armed: fix the cause,"
        echo "run appliance pxe assign again, and reboot the machine."
    fi
else
    echo "no restore.src on the kernel command line: starting a shell"
fi
while :; do setsid cttyhack sh -l; sleep 1; done
"""


def restore_cmdline(
    src: str, *, dst: str = "/dev/sda", zero: bool = False, reboot: bool = True
) -> str:
    """Full kernel command line for an unattended restore of ``src`` onto ``dst``.

    Several disks: comma-separated lists of the same length (disk0 first).
    """
    srcs, dsts = src.split(","), dst.split(",")
    for one in srcs:
        if not one.startswith(("nbd://", "nbds://", "nbd+unix://")) or any(
            c.isspace() for c in one
        ):
            raise KernelBuildError(f"bad restore source {one!r}: expected an nbd:// URI")
    if any(c.isspace() for c in dst) or not all(dsts):
        raise KernelBuildError(f"bad restore destination {dst!r}")
    if len(srcs) != len(dsts):
        raise KernelBuildError(f"{len(srcs)} restore source(s) but {len(dsts)} destination(s)")
    return (
        f"{RESCUE_CMDLINE} restore.src={src} restore.dst={dst} "
        f"restore.zero={int(zero)} restore.reboot={int(reboot)}"
    )


#: ICU's data library (~30 MiB) comes in through libnbd -> libxml2 -> libicuuc, but libnbd only
#: uses libxml2's URI parser, which never touches ICU. An initramfs lives in RAM: with the real
#: one the rescue system does not even unpack in QEMU's default 128 MiB.
_ICU_DATA_RE = re.compile(r"^libicudata\.so\.(\d+)$")
ICU_STUB_C = """/* DR Appliance rescue system: an empty ICU data library (kernel/rescue.py). */
const unsigned char icudt{major}_dat[32] __attribute__((aligned(16))) = {{0}};
"""


def icu_data_stub(lib: Path, work: Path) -> Path | None:
    """An empty stand-in for ``lib`` if it is ICU's data library and a C compiler is here."""
    m = _ICU_DATA_RE.match(lib.name)
    cc = shutil.which("cc") or shutil.which("gcc")
    if m is None or cc is None:
        return None
    src, out = work / "icudata_stub.c", work / lib.name
    src.write_text(ICU_STUB_C.format(major=m.group(1)))
    cmd = [cc, "-shared", "-fPIC", "-O2", f"-Wl,-soname,{lib.name}", "-o", str(out), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        log.info("no ICU data stub (%s): shipping the real %s", proc.stderr.strip(), lib.name)
        return None
    return out


def build_rescue_initramfs(*, compress: bool = True) -> BootFiles:
    """Debian's kernel and the (cached) rescue initramfs."""
    kernel, version = find_kernel()
    tree = ModuleTree.load(version)
    order = tree.load_order(RESCUE_MODULES)
    binaries = [Path(require_tool(b, "libnbd-bin")) for b in RESCUE_BINARIES]
    libs = library_closure(binaries)
    inputs = [Path("/bin/busybox"), *binaries, *libs]
    key = [
        INIT_SCRIPT,
        UDHCPC_SCRIPT,
        ICU_STUB_C,
        version,
        *(file_fingerprint(p) for p in inputs),
        *(file_fingerprint(tree.root / rel) for rel in order),
    ]

    def build() -> bytes:
        cpio = CpioWriter()
        add_base_layout(cpio)
        add_busybox(cpio)
        add_modules(cpio, tree, RESCUE_MODULES)
        with tempfile.TemporaryDirectory(prefix="rescue-") as td:
            add_binaries(cpio, binaries, "usr/bin", libs,
                         substitute=lambda lib: icu_data_stub(lib, Path(td)))  # fmt: skip
        cpio.file("usr/share/udhcpc/default.script", UDHCPC_SCRIPT.encode(), 0o755)
        cpio.file("etc/hosts", b"127.0.0.1 localhost\n")
        cpio.file("etc/resolv.conf", b"")
        cpio.file("etc/profile", b"export PS1='rescue# '\n")
        cpio.file("init", INIT_SCRIPT.encode(), 0o755)
        return cpio.finish()

    initrd = write_cached(key, "rescue", build, compress=compress)
    return BootFiles(kernel=kernel, initrd=initrd)


def build_rescue(out_dir: Path) -> tuple[Path, Path]:
    """Copy the rescue kernel and initramfs to ``out_dir/vmlinuz`` and ``out_dir/initrd.img``."""
    boot = build_rescue_initramfs()
    out_dir = Path(out_dir)
    kernel = out_dir / "vmlinuz"
    initrd = out_dir / "initrd.img"
    copy_into(boot.kernel, kernel)
    copy_into(boot.initrd, initrd)
    log.info("rescue system in %s (kernel %s)", out_dir, shlex.quote(str(boot.kernel)))
    return kernel, initrd
