"""Recovery sessions without booting a guest: command lines, domain XML, state handling,
and cleanup when a boot fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import RecoveryRepo

from appliance import recovery
from appliance.recovery._libvirt import domain_xml
from appliance.recovery._state import ProcRef, SessionError, validate_session_name
from dedupstore import Repository, list_overlays

REQ = recovery.BootRequest(
    name="s1", point="vm1@X", repo_root="/r",
    disks=[{"name": "disk0", "size": 1 << 24}, {"name": "disk1", "size": 1 << 20}],
    serial_log="/tmp/s.log",
)  # fmt: skip
EXPORTS = {"disk0": "overlay/s1/disk0", "disk1": "overlay/s1/disk1"}


def test_qemu_command_attaches_every_disk_over_nbd() -> None:
    cmd = recovery.qemu_command(REQ, nbd_host="127.0.0.1", nbd_port=4242, exports=EXPORTS,
                                qmp_socket=Path("/x/qmp.sock"))  # fmt: skip
    assert cmd[cmd.index("-accel") + 1] == "tcg"
    blockdevs = [json.loads(cmd[i + 1]) for i, a in enumerate(cmd) if a == "-blockdev"]
    assert [b["export"] for b in blockdevs] == ["overlay/s1/disk0", "overlay/s1/disk1"]
    assert all(b["driver"] == "nbd" and b["server"]["port"] == "4242" for b in blockdevs)
    devices = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-device"]
    assert devices[0].endswith("bootindex=1") and "bootindex" not in devices[1]
    assert "unix:/x/qmp.sock,server=on,wait=off" in cmd
    assert "-display" in cmd and "-vnc" not in cmd


def test_domain_xml_uses_nbd_network_disks() -> None:
    req = recovery.BootRequest(**{**REQ.to_json(), "vnc": ":3", "memory": "1G"})
    dom = ET.fromstring(domain_xml(req, nbd_host="127.0.0.1", nbd_port=4242, exports=EXPORTS))
    assert dom.get("type") == "qemu"
    assert dom.findtext("memory") == str(1024 * 1024)
    disks = dom.findall("devices/disk")
    assert [d.get("type") for d in disks] == ["network", "network"]
    assert [d.find("source").get("name") for d in disks] == list(EXPORTS.values())  # type: ignore[union-attr]
    assert dom.find("devices/serial/source").get("path") == "/tmp/s.log"  # type: ignore[union-attr]
    assert dom.find("devices/graphics").get("port") == "5903"  # type: ignore[union-attr]


def test_procref_survives_pid_reuse_and_zombies() -> None:
    me = ProcRef.of(os.getpid())
    assert me.alive()
    assert not ProcRef(os.getpid(), (me.start_ticks or 0) + 1).alive()  # a recycled PID
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    ref = ProcRef.of(child.pid)
    while child.poll() is None:
        pass
    assert not ref.alive()


@pytest.mark.parametrize("name", ["", "-x", "a/b", "x" * 101, "a b"])
def test_bad_session_names(name: str) -> None:
    with pytest.raises(SessionError):
        validate_session_name(name)


def test_boot_of_missing_point_fails_cleanly(rrepo: RecoveryRepo) -> None:
    proc = rrepo.cli("boot", "nosuch@latest", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("appliance: error:")
    assert recovery.list_sessions(rrepo.root) == []


def test_failed_qemu_leaves_nothing_behind(rrepo: RecoveryRepo, tmp_path: Path) -> None:
    """QEMU that dies at once: boot reports it; nbdkit, overlay and session are gone."""
    fake = tmp_path / "fake-qemu"
    fake.write_text("#!/bin/sh\necho 'fake qemu: no luck' >&2\nexit 3\n")
    fake.chmod(0o755)
    env = dict(os.environ, APPLIANCE_REPO=str(rrepo.root), DR_QEMU=str(fake))
    before = set(os.listdir("/proc"))
    proc = subprocess.run(
        [sys.executable, "-c", "from appliance.cli import main; main()", "boot", "vm1@latest",
         "--name", "bad1"], env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "fake qemu: no luck" in proc.stderr
    assert recovery.list_sessions(rrepo.root) == []
    with Repository.open(rrepo.root) as repo:
        assert "bad1" not in [o.name for o in list_overlays(repo)]
    # No nbdkit of ours survived (it would hold the overlay open; check its command lines).
    for pid in set(os.listdir("/proc")) - before:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        assert str(rrepo.root).encode() not in cmdline, cmdline


def test_sessions_and_stop_of_unknown(rrepo: RecoveryRepo) -> None:
    assert rrepo.cli("sessions").stdout.strip() == "no recovery sessions"
    proc = rrepo.cli("stop", "nosuch", check=False)
    assert proc.returncode == 2 and "no session" in proc.stderr
    proc = rrepo.cli("migrate", "nosuch", "--to", "/tmp/x", check=False)
    assert proc.returncode == 2
