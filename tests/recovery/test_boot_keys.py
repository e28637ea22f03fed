"""A recovery session of an encrypted repository (issue 8 item 13b/d), on a real TCG guest:
the supervisor, QEMU and nbdkit live as long as the VM, and none of them holds the passphrase in
its environment (the keys reach them over a pipe); the guest's write lands in the overlay
encrypted, and `stop --commit` stores it."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import APPLIANCE, MARKER
from recoveryutil import build_testdisk

from appliance import recovery
from dedupstore import Repository, backup_image, restore_image
from kernel.testdisk import guest_pattern, guest_write_lba

PW = "boot-session-secret-passphrase"


@pytest.fixture(scope="module")
def enc_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    base = tmp_path_factory.mktemp("encboot")
    root = base / "repo"
    Repository.create(root, encryption="aes-256-gcm", passphrase=PW)
    disk = build_testdisk(base / "disk.img", MARKER)
    with Repository.open(root, passphrase=PW, writable=True) as repo:
        backup_image(repo, [disk], source="vm1", mode="full")
    yield root, disk
    for s in recovery.list_sessions(root):  # end whatever a failed test left running
        try:
            recovery.stop_session(root, s.name, passphrase=PW)
        except Exception as exc:
            print(f"cleanup of session {s.name}: {exc}", file=sys.stderr)
        for ref in (s.supervisor, s.qemu, s.nbdkit):
            if ref is not None and ref.alive():
                os.kill(ref.pid, 9)


def _cli(root: Path, *args: str) -> str:
    import subprocess

    env = dict(os.environ, APPLIANCE_REPO=str(root), APPLIANCE_PASSPHRASE=PW)
    proc = subprocess.run([*APPLIANCE, *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc.stdout


@pytest.mark.vm
def test_encrypted_boot_session_holds_no_passphrase(
    enc_root: tuple[Path, Path], tmp_path: Path
) -> None:
    root, disk = enc_root
    serial = tmp_path / "serial.log"
    info = json.loads(_cli(root, "boot", "vm1@latest", "--name", "e1", "--serial", str(serial),
                           "--json"))  # fmt: skip
    pids = {k: info[k]["pid"] for k in ("supervisor", "qemu", "nbdkit")}
    for name, pid in pids.items():
        env = Path(f"/proc/{pid}/environ").read_bytes()
        assert PW.encode() not in env, f"{name} (pid {pid}) has the passphrase in its environ"
    deadline = time.monotonic() + 120
    while f"{MARKER} DONE" not in serial.read_text(errors="replace"):
        assert time.monotonic() < deadline, serial.read_text(errors="replace")[-2000:]
        time.sleep(0.2)
    deadline = time.monotonic() + 30
    while recovery.get_session(root, "e1").effective_state != "stopped":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    pattern = guest_pattern(MARKER)
    overlay = root / "overlays" / "e1"
    for f in overlay.iterdir():
        assert pattern[:64] not in f.read_bytes(), f"guest data in plaintext in {f.name}"
    res = json.loads(_cli(root, "stop", "e1", "--commit", "--json"))
    lba = guest_write_lba(disk.stat().st_size)
    with Repository.open(root, passphrase=PW) as repo:
        restore_image(repo, repo.resolve(res["committed"]), tmp_path / "new.img")
    new = (tmp_path / "new.img").read_bytes()
    assert new[lba * 512 : (lba + 1) * 512] == pattern
