"""VM tests of network boot: PXE rescue restore, iSCSI SAN boot, the rescue ISO.

The PXE lab is QEMU's user network (slirp): its DHCP hands out `boot.ipxe` from the TFTP root
`appliance pxe serve` prepared, the NIC's iPXE ROM runs it and chains to the appliance's HTTP
`/boot/<mac>.ipxe`; the guest reaches the host as 10.0.2.2. Every boot is bounded by a timeout;
QEMU, `pxe serve`, nbdkit, nbdfuse and tgtd are stopped by PID even when a test fails.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
from pathlib import Path

import pytest
from pxeutil import MARKER, PointRepo, Serve, run_cli, sha256_file
from vmutil import qemu_vm, run_qemu

from kernel.testdisk import PARTITION_START_LBA, SECTOR, guest_pattern, guest_write_lba

log = logging.getLogger(__name__)

pytestmark = [pytest.mark.vm, pytest.mark.slow]

FAIL_ON = ("Kernel panic", "No bootable device", "RESTORE FAILED", "NO DISK",
           "Could not boot", "No more network devices")  # fmt: skip
BOOT_TIMEOUT_S = 120


def pxe_args(serve: Serve, mac: str) -> list[str]:
    return [
        "-boot", "order=n", "-machine", "graphics=off",
        "-netdev", f"user,id=n0,tftp={serve.tftp_root},bootfile=boot.ipxe",
        "-device", f"virtio-net-pci,netdev=n0,mac={mac}",
    ]  # fmt: skip


def read_sector(path: Path, lba: int) -> bytes:
    with path.open("rb") as f:
        f.seek(lba * SECTOR)
        return f.read(SECTOR)


def assignment(serve: Serve, mac: str) -> dict[str, object]:
    items = json.loads(run_cli("pxe", "list", "--json", env=serve.env()).stdout)
    return next(a for a in items if a["mac"] == mac)


def test_pxe_rescue_restores_point_then_boots_local_disk(
    serve: Serve, point_repo: PointRepo, tmp_path: Path
) -> None:
    mac = "52:54:00:d1:00:01"
    run_cli("pxe", "assign", mac, "rescue", "vm1@latest", env=serve.env())
    target = tmp_path / "target.img"
    with target.open("wb") as f:
        f.truncate(point_repo.size)  # a blank disk of the same size
    args = [*pxe_args(serve, mac), "-drive", f"file={target},format=raw,if=ide"]

    with qemu_vm(args, serial_log=tmp_path / "rescue.log", fail_on=FAIL_ON) as vm:
        t_start = vm.wait_for("RESTORE START", timeout_s=BOOT_TIMEOUT_S)
        t_ok = vm.wait_for("RESTORE OK", timeout_s=60)
        vm.wait_for("REPORTED done", timeout_s=30)  # the appliance accepted the callback
        vm.wait_exit(timeout_s=30)  # restore.reboot=1 + -no-reboot: QEMU exits
        text = vm.log_text()
    # iPXE fetched the rescue system over HTTP (its "ok" may be cut by the kernel's console
    # reset on the serial line), and it ran
    assert "/rescue/vmlinuz... ok" in text and "/rescue/initrd.img..." in text
    assert "RESCUE READY" in text
    m = re.search(r"RESTORE OK (\d+)", text)
    assert m and int(m.group(1)) == point_repo.size
    # NBD over TLS-PSK (the PSK came in the one-time script) to the pinned point
    assert f"nbds://dr-appliance@10.0.2.2:{serve.nbd_port}/{point_repo.point}/disk0" in text
    assert sha256_file(target) == point_repo.sha256
    mb_s = point_repo.size / 1e6 / max(t_ok - t_start, 1e-3)
    log.info(
        "PXE rescue: RESTORE START %.1fs, RESTORE OK %.1fs after power-on (%.1f MB/s for %d MiB)",
        t_start,
        t_ok,
        mb_s,
        point_repo.size >> 20,
    )
    # one-shot, consumed by the rescue system's success callback: the next boot is local
    assert assignment(serve, mac)["action"] == "local"

    expected_read = hashlib.sha256(read_sector(target, PARTITION_START_LBA)).hexdigest()
    result = run_qemu(args, serial_log=tmp_path / "local.log", wait_for=f"{MARKER} DONE",
                      fail_on=FAIL_ON, timeout_s=BOOT_TIMEOUT_S, expect_exit=True)  # fmt: skip
    log.info("PXE local boot of the restored disk: %s DONE after %.1fs", MARKER, result.elapsed_s)
    assert "DR Appliance: booting the local disk" in result.log
    assert f"{MARKER} BOOTED" in result.log
    assert f"READ {expected_read}" in result.log
    assert read_sector(target, guest_write_lba(point_repo.size)) == guest_pattern(MARKER)


def test_sanboot_over_iscsi_writes_to_overlay_and_commits(
    serve: Serve, point_repo: PointRepo, tmp_path: Path
) -> None:
    mac = "52:54:00:d1:00:02"
    session = "pxe-525400d10002"
    run_cli("pxe", "assign", mac, "sanboot", point_repo.point, env=serve.env())
    # A diskless machine: iPXE boots from the LUN over iSCSI (INT 13h), then the guest's Linux
    # reads iPXE's iBFT, brings up the NIC and logs in with its own initiator (iscsistart), as
    # an OS installed on a SAN disk does. Its write goes tgt -> nbdfuse -> nbdkit -> overlay.
    # `pxe assign` made the session already: its IQN names the repository and the session
    [made] = json.loads(run_cli("iscsi", "list", "--json", env=serve.env()).stdout)
    iqn = made["iqn"]
    assert made["name"] == session and iqn.endswith(f".{session}")
    expected_read = hashlib.sha256(read_sector(point_repo.disk, PARTITION_START_LBA)).hexdigest()
    with qemu_vm(pxe_args(serve, mac), serial_log=tmp_path / "sanboot.log",
                 fail_on=(*FAIL_ON, "SAN FAILED")) as vm:  # fmt: skip
        t_san = vm.wait_for("SAN boot", timeout_s=BOOT_TIMEOUT_S)
        t_marker = vm.wait_for(f"{MARKER} BOOTED", timeout_s=BOOT_TIMEOUT_S)
        t_attached = vm.wait_for(f"SAN ATTACHED {iqn}", timeout_s=60)
        vm.wait_for(f"{MARKER} DONE", timeout_s=60)
        vm.wait_exit(timeout_s=30)
        text = vm.log_text()
    log.info("SANBOOT: iPXE sanboot at %.1fs, %s BOOTED at %.1fs, LUN attached at %.1fs",
             t_san, MARKER, t_marker, t_attached)  # fmt: skip
    assert f"SAN boot iscsi:10.0.2.2::{serve.portal_port}:1:" in text  # our iPXE script
    assert "Booting from SAN device 0x80" in text  # iPXE's INT 13h SAN disk
    assert f"READ {expected_read}" in text

    sessions = json.loads(run_cli("iscsi", "list", "--json", env=serve.env()).stdout)
    assert [s["name"] for s in sessions] == [session]
    # the guest got in with the session's CHAP secret (iPXE -> iBFT -> iscsistart); nobody
    # else does
    anon = subprocess.run(["qemu-img", "info", f"iscsi://127.0.0.1:{serve.portal_port}/{iqn}/1"],
                          capture_output=True, timeout=60)  # fmt: skip
    assert anon.returncode != 0
    # `appliance sessions` shows it beside VM sessions, and `appliance stop S --commit` ends it
    listed = json.loads(run_cli("sessions", "--json", env=serve.env()).stdout)
    assert [(x["name"], x["backend"], x["state"]) for x in listed] == [
        (session, "iscsi", "running")]  # fmt: skip
    out = run_cli("stop", session, "--commit", env=serve.env()).stdout
    committed = re.search(r"committed as (\S+)", out)
    assert committed, out
    assert json.loads(run_cli("iscsi", "list", "--json", env=serve.env()).stdout) == []
    assert "overlay dropped" in out

    lba = guest_write_lba(point_repo.size)
    after = tmp_path / "committed.img"
    run_cli("restore", f"{committed.group(1)}/disk0", str(after), env=serve.env())
    assert read_sector(after, lba) == guest_pattern(MARKER)
    base = tmp_path / "base.img"
    run_cli("restore", f"{point_repo.point}/disk0", str(base), env=serve.env())
    assert sha256_file(base) == point_repo.sha256  # the point itself never changed
    with after.open("rb") as a, base.open("rb") as b:
        da, db = a.read(), b.read()
    assert da[: lba * SECTOR] == db[: lba * SECTOR]
    assert da[(lba + 1) * SECTOR :] == db[(lba + 1) * SECTOR :]


def test_pxe_rescue_failure_stays_in_rescue_and_keeps_the_assignment(
    serve: Serve, point_repo: PointRepo, tmp_path: Path
) -> None:
    """A restore that fails (the local disk is too small) reports the failure, never reboots
    into the half-written local disk, and leaves the assignment armed: the machine's next
    network boot restores again."""
    mac = "52:54:00:d1:00:05"
    run_cli("pxe", "assign", mac, "rescue", "vm1@latest", env=serve.env())
    target = tmp_path / "small.img"
    with target.open("wb") as f:
        f.truncate(point_repo.size // 2)
    args = [*pxe_args(serve, mac), "-drive", f"file={target},format=raw,if=ide"]
    fail_on = tuple(x for x in FAIL_ON if x != "RESTORE FAILED")
    with qemu_vm(args, serial_log=tmp_path / "rescue.log", fail_on=fail_on) as vm:
        vm.wait_for("RESTORE FAILED", timeout_s=BOOT_TIMEOUT_S)
        vm.wait_for("REPORTED failed", timeout_s=30)
        vm.wait_for("RESCUE HALTED", timeout_s=30)
        a = assignment(serve, mac)
        assert a["action"] == "rescue" and a["fetched_ns"] == 0  # armed again
        assert vm.proc is not None and vm.proc.poll() is None  # no reboot: still in rescue
        text = vm.log_text()
    assert "too small" in text and "RESTORE OK" not in text
    assert "FAILED" in serve.log_path.read_text()  # the appliance logged the reason
    run_cli("pxe", "unassign", mac, env=serve.env())


def test_iso_boots_to_rescue_ready(tmp_path: Path) -> None:
    iso = tmp_path / "rescue.iso"
    run_cli("build", "iso", "--out", str(iso))
    result = run_qemu(["-cdrom", str(iso)], serial_log=tmp_path / "iso.log",
                      wait_for="RESCUE READY", fail_on=FAIL_ON,
                      timeout_s=BOOT_TIMEOUT_S)  # fmt: skip
    log.info("rescue ISO: RESCUE READY after %.1fs", result.elapsed_s)
