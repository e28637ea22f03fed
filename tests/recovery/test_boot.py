"""Instant recovery end to end: `appliance boot` a backup point, let the guest run, commit.

Boots real TCG guests (marked `vm`). Every session is ended by the `sessions_cleanup` fixture
(supervisor, QEMU and nbdkit by PID) even when an assertion fails.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from conftest import MARKER, TICKER, RecoveryRepo

from appliance import recovery
from dedupstore import Repository, list_overlays, open_overlay, restore_image
from kernel.testdisk import guest_pattern, guest_write_lba

pytestmark = pytest.mark.usefixtures("sessions_cleanup")

BOOT_RETURN_S = 10.0  # `appliance boot` must return within this, long before the guest is up
GUEST_TIMEOUT_S = 90.0


def wait_serial(path: Path, marker: str, timeout_s: float = GUEST_TIMEOUT_S) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        text = path.read_text(errors="replace") if path.exists() else ""
        if marker in text:
            return text
        for bad in ("Kernel panic", "No bootable device", "NO DISK", "IOERR"):
            assert bad not in text, f"guest printed {bad!r}:\n{text[-2000:]}"
        assert time.monotonic() < deadline, f"no {marker!r} after {timeout_s} s:\n{text[-2000:]}"
        time.sleep(0.1)


def wait_state(root: Path, name: str, state: str, timeout_s: float = 20) -> recovery.SessionInfo:
    deadline = time.monotonic() + timeout_s
    while True:
        s = recovery.get_session(root, name)
        if s.effective_state == state:
            return s
        assert time.monotonic() < deadline, f"session {name} is {s.effective_state}, not {state}"
        time.sleep(0.1)


def restore_bytes(root: Path, point_name: str, dest: Path) -> bytes:
    with Repository.open(root) as repo:
        restore_image(repo, repo.resolve(point_name), dest)
    return dest.read_bytes()


@pytest.mark.vm
def test_boot_runs_guest_on_overlay_and_commit_keeps_its_write(
    rrepo: RecoveryRepo, tmp_path: Path
) -> None:
    serial = tmp_path / "serial.log"
    t0 = time.monotonic()
    out = rrepo.cli("boot", "vm1@latest", "--name", "b1", "--serial", str(serial), "--json")
    returned_s = time.monotonic() - t0
    info = json.loads(out.stdout)
    assert returned_s < BOOT_RETURN_S
    assert info["name"] == "b1" and info["state"] == "running"
    assert info["serial_log"] == str(serial)
    assert Path(info["qmp_socket"]).is_socket()
    assert all(info[k]["alive"] for k in ("supervisor", "qemu", "nbdkit"))
    # The CLI has exited; the session lives on in its supervisor.
    listed = json.loads(rrepo.cli("sessions", "--json").stdout)
    assert [s["name"] for s in listed] == ["b1"] and listed[0]["state"] == "running"

    text = wait_serial(serial, f"{MARKER} DONE")
    assert f"{MARKER} BOOTED" in text
    # The guest read the right data through NBD from the store.
    disk = rrepo.disk.read_bytes()
    want_read = hashlib.sha256(disk[2048 * 512 : 2049 * 512]).hexdigest()
    assert re.search(rf"READ {want_read}", text), text[-1000:]

    # The guest powered off: the supervisor notices, stops nbdkit, records "stopped".
    s = wait_state(rrepo.root, "b1", "stopped")
    deadline = time.monotonic() + 10
    while s.supervisor_alive and time.monotonic() < deadline:  # it exits right after saving
        time.sleep(0.05)
    assert not s.qemu_alive and not s.nbdkit_alive and not s.supervisor_alive

    lba = guest_write_lba(len(disk))
    with Repository.open(rrepo.root) as repo, open_overlay(repo, "b1") as ov:
        assert ov.disk("disk0").pread(lba * 512, 512) == guest_pattern(MARKER)
    # ... and not in the point it booted from.
    orig = restore_bytes(rrepo.root, rrepo.point, tmp_path / "orig.img")
    assert hashlib.sha256(orig).hexdigest() == rrepo.disk_sha

    res = json.loads(rrepo.cli("stop", "b1", "--commit", "--json").stdout)
    assert res["overlay"] == "dropped" and res["committed"].startswith("vm1@")
    new = restore_bytes(rrepo.root, res["committed"], tmp_path / "new.img")
    assert new[lba * 512 : (lba + 1) * 512] == guest_pattern(MARKER)
    assert new[: lba * 512] == disk[: lba * 512]  # nothing else changed below the write
    with Repository.open(rrepo.root) as repo:
        p = repo.resolve(res["committed"])
        assert p.manifest.get("parent") == repo.resolve(rrepo.point).id
        assert "b1" not in [o.name for o in list_overlays(repo)]
    assert json.loads(rrepo.cli("sessions", "--json").stdout) == []
    assert serial.exists()  # a --serial log outside the session directory survives stop


@pytest.mark.vm
def test_migrate_moves_running_vm_off_the_store(rrepo: RecoveryRepo, tmp_path: Path) -> None:
    serial = tmp_path / "ticker.log"
    target_dir = tmp_path / "prod"
    rrepo.cli("boot", rrepo.ticker_point, "--name", "m1", "--serial", str(serial))
    wait_serial(serial, f"{TICKER} EARLY")
    wait_serial(serial, "TICK 3 ")

    out = json.loads(rrepo.cli("migrate", "m1", "--to", str(target_dir), "--json").stdout)
    target = Path(out["disks"][0]["target"])
    assert target == target_dir / "m1-disk0.qcow2" and target.is_file()

    s = wait_state(rrepo.root, "m1", "migrated")
    assert s.qemu_alive and s.supervisor_alive
    assert not s.nbdkit_alive  # the store's NBD export is gone ...
    assert s.qmp_socket is not None
    with recovery.Qmp(s.qmp_socket) as q:
        assert q.status() == "running"
        assert "nbd" not in q.drivers_in_use()
        assert q.device_root_node("disk0") == "mig-disk0"
        files = [d["inserted"]["file"] for d in q.block_devices() if d.get("inserted")]
        assert files == [str(target)]
    # ... and the guest keeps writing and reading (O_DIRECT, fresh offsets) without it.
    ticks_go_on(serial)

    # Committing a migrated session's overlay would store stale disks: refused.
    refused = rrepo.cli("stop", "m1", "--commit", check=False)
    assert refused.returncode == 2 and "migrated" in refused.stderr
    rrepo.cli("stop", "m1")
    check_migrated_disk(rrepo, serial, target, tmp_path / "prod.raw")


def last_tick(serial: Path) -> int:
    return max(int(m) for m in re.findall(r"TICK (\d+) ", serial.read_text()))


def ticks_go_on(serial: Path) -> None:
    """The ticker guest writes and reads 6 more times after the pivot, without an I/O error."""
    wait_serial(serial, f"TICK {last_tick(serial) + 6} ", timeout_s=30)
    assert "IOERR" not in serial.read_text()


def check_migrated_disk(rrepo: RecoveryRepo, serial: Path, target: Path, raw: Path) -> None:
    """After the session stopped: the migration target holds the write made before the copy,
    the newest tick written after the pivot, and the backed-up image everywhere else."""
    last = last_tick(serial)
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(target), str(raw)], check=True)
    data = raw.read_bytes()
    sectors = len(data) // 512
    assert data[(sectors - 128) * 512 :].startswith(f"EARLY-{TICKER}\n".encode())  # pre-copy
    tick = data[(sectors - 64) * 512 :].split(b"\n", 1)[0].decode()
    assert tick in (f"TICK-{last}", f"TICK-{last + 1}")  # the newest write, post-pivot
    orig = rrepo.ticker.read_bytes()
    assert data[: (sectors - 128) * 512] == orig[: (sectors - 128) * 512]
