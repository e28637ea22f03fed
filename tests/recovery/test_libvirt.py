"""`appliance boot --libvirt URI`: the VM is a libvirt domain with NBD network disks.

Runs its own virtlogd + libvirtd in a private mount namespace (recoveryutil.PrivateLibvirt) and
stops them, and every QEMU they started, by PID.
"""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MARKER, TICKER, RecoveryRepo
from recoveryutil import PrivateLibvirt
from test_boot import (
    check_migrated_disk,
    restore_bytes,
    ticks_go_on,
    wait_serial,
    wait_state,
)

from appliance import recovery
from kernel.testdisk import guest_pattern, guest_write_lba

pytestmark = pytest.mark.usefixtures("sessions_cleanup")


@pytest.fixture
def libvirtd(tmp_path: Path) -> Iterator[PrivateLibvirt]:
    for tool in ("libvirtd", "virtlogd", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    pytest.importorskip("libvirt")
    lv = PrivateLibvirt(tmp_path / "libvirt")
    (tmp_path / "libvirt").mkdir()
    try:
        lv.start()
    except RuntimeError as exc:
        pytest.skip(f"cannot run a private libvirtd here: {exc}")
    try:
        yield lv
    finally:
        lv.stop()


@pytest.mark.vm
def test_libvirt_boot_and_commit(
    rrepo: RecoveryRepo, libvirtd: PrivateLibvirt, tmp_path: Path
) -> None:
    import libvirt

    serial = tmp_path / "lv-serial.log"
    rrepo.cli("boot", "vm1@latest", "--name", "lv1", "--serial", str(serial),
              "--libvirt", libvirtd.uri)  # fmt: skip
    s = recovery.get_session(rrepo.root, "lv1")
    assert s.backend == "libvirt" and s.domain == "recovery-lv1"

    conn = libvirt.open(libvirtd.uri)
    try:
        dom = conn.lookupByName("recovery-lv1")
        xml = ET.fromstring(dom.XMLDesc())
        assert xml.get("type") == "qemu"
        src = xml.find("devices/disk/source")
        assert src is not None and src.get("protocol") == "nbd"
        assert src.get("name") == "overlay/lv1/disk0"
        host = src.find("host")
        assert host is not None and host.get("name") == "127.0.0.1"
        assert int(host.get("port", "0")) == s.raw["nbd_port"]
    finally:
        conn.close()

    wait_serial(serial, f"{MARKER} DONE")
    wait_state(rrepo.root, "lv1", "stopped")  # guest poweroff -> domain gone -> supervisor ends
    res = recovery.stop_session(rrepo.root, "lv1", commit=True)
    assert res.committed is not None
    new = restore_bytes(rrepo.root, res.committed, tmp_path / "new.img")
    lba = guest_write_lba(len(new))
    assert new[lba * 512 : (lba + 1) * 512] == guest_pattern(MARKER)
    conn = libvirt.open(libvirtd.uri)
    try:
        assert conn.listAllDomains() == []  # destroyed and undefined
    finally:
        conn.close()


@pytest.mark.vm
def test_libvirt_migrate_moves_domain_off_the_store(
    rrepo: RecoveryRepo, libvirtd: PrivateLibvirt, tmp_path: Path
) -> None:
    """`appliance migrate` of a libvirt session: block copy + pivot; the guest keeps writing."""
    import libvirt

    serial = tmp_path / "lv-ticker.log"
    target_dir = tmp_path / "prod"
    rrepo.cli("boot", rrepo.ticker_point, "--name", "lvm", "--serial", str(serial),
              "--libvirt", libvirtd.uri)  # fmt: skip
    wait_serial(serial, f"{TICKER} EARLY")
    wait_serial(serial, "TICK 3 ")

    out = json.loads(rrepo.cli("migrate", "lvm", "--to", str(target_dir), "--json").stdout)
    target = Path(out["disks"][0]["target"])
    assert target == target_dir / "lvm-disk0.qcow2" and target.is_file()
    s = wait_state(rrepo.root, "lvm", "migrated")
    assert s.supervisor_alive and not s.nbdkit_alive  # the store's export is gone

    conn = libvirt.open(libvirtd.uri)
    try:
        dom = conn.lookupByName("recovery-lvm")
        assert dom.isActive()
        for flags in (0, libvirt.VIR_DOMAIN_XML_INACTIVE):  # live VM and its definition
            disk = ET.fromstring(dom.XMLDesc(flags)).find("devices/disk")
            assert disk is not None and disk.get("type") == "file"
            src = disk.find("source")
            assert src is not None and src.get("file") == str(target)
    finally:
        conn.close()
    ticks_go_on(serial)
    rrepo.cli("stop", "lvm")
    check_migrated_disk(rrepo, serial, target, tmp_path / "prod.raw")
