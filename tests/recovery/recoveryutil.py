"""Test guests for recovery tests: the standard test disk, and a "ticker" variant that keeps
running (for live migration).

The ticker disk is the `python -m kernel testdisk` image with its `initrd.gz` replaced (mcopy
into the FAT partition) by an initramfs whose `/init` never powers off. It prints
``<M> BOOTED``, writes ``EARLY-<M>`` once at LBA S-128, then every ~0.3 s:
writes ``TICK-<n>`` at LBA S-64 (fsync), reads 4 KiB at a moving offset with O_DIRECT (a read
that must reach the disk, not the page cache) and prints ``TICK <n> <sha256-prefix>``.
An I/O error prints ``IOERR <n>``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kernel.testdisk import INIT_HEAD, PARTITION_START_LBA, SECTOR, build_initramfs

ROOT = Path(__file__).resolve().parents[2]

TICKER_INIT = INIT_HEAD + r"""
yes "EARLY-$marker" | head -c 512 > /tmp/early
dd if=/tmp/early of="/dev/$dev" bs=512 seek=$((sectors - 128)) count=1 \
    conv=notrunc,fsync 2>/dev/null
echo "$marker EARLY"
n=0
while true; do
    n=$((n + 1))
    yes "TICK-$n" | head -c 512 > /tmp/tick
    if dd if=/tmp/tick of="/dev/$dev" bs=512 seek=$((sectors - 64)) count=1 \
            conv=notrunc,fsync 2>/dev/null \
       && h=$(dd if="/dev/$dev" bs=4096 skip=$((256 + n % 2048)) count=1 iflag=direct \
            2>/dev/null | sha256sum); then
        echo "TICK $n ${h%% *}"
    else
        echo "IOERR $n"
    fi
    sleep 0.3
done
"""


def build_testdisk(out: Path, marker: str, size_mib: int = 16) -> Path:
    """The standard test disk, built through the `kernel` CLI (as other packages do)."""
    subprocess.run(
        [sys.executable, "-m", "kernel", "testdisk", str(out), "--marker", marker,
         "--size-mib", str(size_mib)],
        check=True, cwd=ROOT, capture_output=True,
    )  # fmt: skip
    return out


def ticker_initrd() -> Path:
    return build_initramfs(TICKER_INIT, "recovery-ticker").initrd


def build_ticker_disk(out: Path, marker: str, size_mib: int = 16) -> Path:
    build_testdisk(out, marker, size_mib)
    offset = PARTITION_START_LBA * SECTOR
    subprocess.run(
        ["mcopy", "-i", f"{out}@@{offset}", "-o", str(ticker_initrd()), "::/initrd.gz"],
        check=True, capture_output=True,
    )  # fmt: skip
    return out


# -- a private libvirtd ----------------------------------------------------------------------

QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
cgroup_controllers = [ ]
remember_owner = 0
"""

_LIBVIRT_SCRIPT = """\
set -e
T="$1"
for d in etc lib log cache run; do mkdir -p "$T/$d"; done
mount --bind "$T/etc" /etc/libvirt
mount --bind "$T/lib" /var/lib/libvirt
mount --bind "$T/log" /var/log/libvirt
mount --bind "$T/cache" /var/cache/libvirt
mount --bind "$T/run" /run
virtlogd -d -p "$T/virtlogd.pid"
exec libvirtd -p "$T/libvirtd.pid"
"""


class PrivateLibvirt:
    """virtlogd + libvirtd in a private mount namespace with their own /etc/libvirt,
    /var/lib/libvirt, /var/log/libvirt, /var/cache/libvirt and /run (all under `base`).

    `uri` is `qemu:///system?socket=<base>/run/libvirt/libvirt-sock`. `stop()` destroys every
    domain it can see, then ends QEMU children, libvirtd and virtlogd by PID.
    """

    def __init__(self, base: Path) -> None:
        self.base = base
        self.proc: subprocess.Popen[bytes] | None = None
        self.socket = base / "run" / "libvirt" / "libvirt-sock"
        self.uri = f"qemu:///system?socket={self.socket}"

    def start(self, timeout_s: float = 15.0) -> PrivateLibvirt:
        import shutil
        import time

        etc = self.base / "etc"
        shutil.copytree("/etc/libvirt", etc, symlinks=True)
        (etc / "qemu.conf").write_text(QEMU_CONF)
        # No default network/autostart: keep libvirtd from starting dnsmasq.
        for sub in ("qemu/networks/autostart", "qemu/networks"):
            shutil.rmtree(etc / sub, ignore_errors=True)
        log = open(self.base / "libvirtd.log", "wb")  # noqa: SIM115 - lives as long as libvirtd
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", _LIBVIRT_SCRIPT,
             "sh", str(self.base)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                text = (self.base / "libvirtd.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"libvirtd did not start: {text}")
            time.sleep(0.05)
        return self

    def _pids(self, pattern: str) -> list[int]:
        pids = []
        for f in self.base.glob(pattern):
            try:
                pids.append(int(f.read_text().strip()))
            except (OSError, ValueError):
                continue
        return pids

    def stop(self) -> None:
        import contextlib
        import os
        import signal
        import time

        try:
            import libvirt

            if self.socket.exists():
                conn = libvirt.open(self.uri)
                for dom in conn.listAllDomains():
                    with contextlib.suppress(libvirt.libvirtError):
                        if dom.isActive():
                            dom.destroy()
                    with contextlib.suppress(libvirt.libvirtError):
                        dom.undefine()
                conn.close()
        except Exception as exc:
            print(f"libvirt cleanup: {exc}", file=sys.stderr)
        # QEMU processes libvirt started (pid files under the private /run), then the daemons.
        victims = self._pids("run/libvirt/qemu/*.pid")
        if self.proc is not None:
            victims.append(self.proc.pid)
        victims += self._pids("virtlogd.pid")
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        deadline = time.monotonic() + 5
        for pid in victims:
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
