"""The real PXE path: dnsmasq proxy-DHCP next to a site DHCP server, in a network namespace.

Topology (namespace ``drpxe-<pid>``, removed afterwards with everything in it)::

    br0 10.77.0.1/24 ── tap0 ── QEMU guest (iPXE ROM, blank IDE disk)
      ├─ site DHCP server: a plain dnsmasq handing out 10.77.0.100-150 (no boot options)
      └─ `appliance pxe serve --interface br0`: dnsmasq proxy-DHCP + TFTP, HTTP, NBD

The guest gets its address from the site server and its boot file from our proxy, fetches
``boot.ipxe`` over TFTP, chains to HTTP and restores the point. BIOS: SeaBIOS with QEMU's iPXE
NIC ROM (PXE menu + boot server discovery). UEFI (OVMF, when installed): the firmware's own PXE
client, the NIC without option ROM, so the proxy hands out ``ipxe.efi`` first; the BIOS chain
through ``undionly.kpxe`` has no PXE ROM to start from here (QEMU's ROMs are all iPXE).
Every process runs under ``ip netns exec`` (which execs, so the PID is the daemon's own) and is
stopped by PID before the namespace is deleted.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pxeutil import BIN, PointRepo, run_cli, sha256_file, teardown_iscsi
from vmutil import QemuVM

log = logging.getLogger(__name__)

pytestmark = [pytest.mark.vm, pytest.mark.slow]

FAIL_ON = ("Kernel panic", "No bootable device", "RESTORE FAILED", "No more network devices")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("ip") is None or not Path("/dev/net/tun").exists():
        pytest.skip("needs root, iproute2 and /dev/net/tun")
    name = f"drpxe-{os.getpid()}"
    try:
        _ip("netns", "add", name)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot create a network namespace: {exc.stderr.decode().strip()}")
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", name, "link", "add", "br0", "type", "bridge")
        _ip("-n", name, "addr", "add", "10.77.0.1/24", "dev", "br0")
        _ip("-n", name, "link", "set", "br0", "up")
        _ip("-n", name, "tuntap", "add", "dev", "tap0", "mode", "tap")
        _ip("-n", name, "link", "set", "tap0", "master", "br0")
        _ip("-n", name, "link", "set", "tap0", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_proxy_dhcp_pxe_rescue_in_netns(
    firmware: str, netns: str, point_repo: PointRepo, rescue_dir: Path, tmp_path: Path
) -> None:
    if shutil.which("dnsmasq") is None:
        pytest.skip("dnsmasq missing")
    if firmware == "uefi" and not (OVMF_CODE.exists() and OVMF_VARS.exists()):
        pytest.skip("UEFI firmware missing (apt-get install ovmf)")
    mac = "52:54:00:d1:00:03" if firmware == "bios" else "52:54:00:d1:00:04"
    env = {"APPLIANCE_REPO": str(point_repo.root)}
    run_cli("pxe", "assign", mac, "rescue", point_repo.point, env=env)
    # dnsmasq serves TFTP as nobody: pytest's tmp dirs are 0700, so the TFTP root lives in a
    # world-readable temp dir of its own.
    tftp_parent = Path(tempfile.mkdtemp(prefix="drpxe-tftp-"))
    tftp_parent.chmod(0o755)
    netns_exec = ["ip", "netns", "exec", netns]
    site_log, serve_log = tmp_path / "site-dhcp.log", tmp_path / "serve.log"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with site_log.open("wb") as out:
            procs.append(subprocess.Popen(
                [*netns_exec, "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null",
                 "--port=0", "--interface=br0", "--bind-interfaces",
                 "--dhcp-range=10.77.0.100,10.77.0.150,1h",
                 f"--dhcp-leasefile={tmp_path / 'leases'}", "--log-facility=-"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT))  # fmt: skip
        with serve_log.open("wb") as out:
            procs.append(subprocess.Popen(
                [*netns_exec, str(BIN / "appliance"), "-v", "pxe", "serve",
                 "--interface", "br0", "--http", "0.0.0.0:8080", "--nbd", "0.0.0.0:10809",
                 "--iscsi-portal", "0.0.0.0:3260", "--tftp-root", str(tftp_parent / "tftp"),
                 "--rescue-dir", str(rescue_dir)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, **env}))  # fmt: skip
        deadline = time.monotonic() + 60
        while "dnsmasq pid" not in serve_log.read_text(errors="replace"):
            for p in procs:
                assert p.poll() is None, site_log.read_text(errors="replace") + serve_log.read_text(
                    errors="replace"
                )
            assert time.monotonic() < deadline, serve_log.read_text(errors="replace")
            time.sleep(0.1)

        target = tmp_path / "target.img"
        with target.open("wb") as f:
            f.truncate(point_repo.size)
        if firmware == "bios":
            # SeaBIOS + QEMU's iPXE NIC ROM: iPXE is the PXE client, gets boot.ipxe at once
            fw: list[str] = ["-machine", "graphics=off"]
            nic = f"virtio-net-pci,netdev=n0,mac={mac}"
        else:
            # OVMF's own PXE client (no option ROM on the NIC) gets ipxe.efi from our proxy
            # and TFTP; iPXE then asks again as "iPXE" and gets boot.ipxe
            vars_fd = tmp_path / "OVMF_VARS.fd"
            shutil.copyfile(OVMF_VARS, vars_fd)
            fw = ["-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
                  "-drive", f"if=pflash,format=raw,file={vars_fd}"]  # fmt: skip
            nic = f"virtio-net-pci,netdev=n0,mac={mac},romfile="
        vm = QemuVM(
            [*fw, "-boot", "order=n",
             "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no", "-device", nic,
             "-drive", f"file={target},format=raw,if=ide"],
            serial_log=tmp_path / "vm.log", fail_on=FAIL_ON,
        )  # fmt: skip
        vm.cmd = [*netns_exec, *vm.cmd]  # `ip netns exec` execs: vm.pid is QEMU's own PID
        try:
            vm.start()
            t_ok = vm.wait_for("RESTORE OK", timeout_s=180)
            vm.wait_exit(timeout_s=30)
            text = vm.log_text()
        finally:
            vm.stop()
        log.info(
            "netns proxy-DHCP PXE rescue (%s): RESTORE OK %.1fs after power-on", firmware, t_ok
        )
        proxy_log = (point_repo.root / "pxe" / "run" / "dnsmasq.log").read_text()
        if firmware == "bios":
            assert "Booting from PXE menu" in text  # the boot file came from our proxy-DHCP
        else:
            assert "NBP filename is ipxe.efi" in text  # firmware PXE -> iPXE from our TFTP
            assert "sent " in proxy_log and "/ipxe.efi to 10.77.0.1" in proxy_log
        assert "tftp://10.77.0.1/boot.ipxe... ok" in text
        assert re.search(r"lease of 10\.77\.0\.1\d\d obtained", text)  # address: site server
        assert sha256_file(target) == point_repo.sha256
        assert "proxy on subnet 10.77.0.0" in proxy_log
        assert f"PXE(br0) {mac} proxy" in proxy_log
        assert "DHCPACK" not in proxy_log  # the proxy never leased an address
    finally:
        for p in reversed(procs):
            _stop(p)
        teardown_iscsi(point_repo.root)
        shutil.rmtree(tftp_parent, ignore_errors=True)
