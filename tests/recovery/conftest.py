"""Fixtures for recovery tests: a repository holding a test-disk point (vm1) and a ticker point
(vm2), and a finalizer that ends every session (by PID) whatever the test did."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from recoveryutil import build_testdisk, build_ticker_disk

from appliance import recovery
from dedupstore import Repository, backup_image

APPLIANCE = [sys.executable, "-c", "from appliance.cli import main; main()"]
MARKER = "RCV1"
TICKER = "TK"

for tool in ("qemu-system-x86_64", "nbdkit", "qemu-img", "mcopy"):
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed", allow_module_level=True)


@dataclass
class RecoveryRepo:
    root: Path
    disk: Path  # the raw test disk backed up as vm1
    disk_sha: str
    point: str  # vm1@ID
    ticker: Path
    ticker_point: str  # vm2@ID

    def cli(self, *args: str, check: bool = True,
            timeout_s: float = 60) -> subprocess.CompletedProcess[str]:  # fmt: skip
        env = dict(os.environ, APPLIANCE_REPO=str(self.root))
        proc = subprocess.run([*APPLIANCE, *args], env=env, capture_output=True, text=True,
                              timeout=timeout_s, check=False)  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(f"appliance {' '.join(args)} failed ({proc.returncode}): "
                                 f"{proc.stderr}{proc.stdout}")  # fmt: skip
        return proc


@pytest.fixture(scope="module")
def rrepo(tmp_path_factory: pytest.TempPathFactory) -> RecoveryRepo:
    base = tmp_path_factory.mktemp("recovery")
    root = base / "repo"
    Repository.create(root)
    disk = build_testdisk(base / "disk.img", MARKER)
    ticker = build_ticker_disk(base / "ticker.img", TICKER)
    with Repository.open(root, writable=True) as repo:
        p1 = backup_image(repo, [disk], source="vm1", mode="full")
        p2 = backup_image(repo, [ticker], source="vm2", mode="full")
    sha = hashlib.sha256(disk.read_bytes()).hexdigest()
    return RecoveryRepo(root, disk, sha, p1.name, ticker, p2.name)


def _kill_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture
def sessions_cleanup(rrepo: RecoveryRepo) -> Iterator[None]:
    """After the test: end every session of the repository; kill leftovers by PID."""
    yield
    for s in recovery.list_sessions(rrepo.root):
        refs = [s.supervisor, s.qemu, s.nbdkit]
        try:
            recovery.stop_session(rrepo.root, s.name)
        except Exception as exc:
            print(f"cleanup of session {s.name}: {exc}", file=sys.stderr)
        for ref in refs:
            if ref is not None and ref.alive():
                _kill_pid(ref.pid)
