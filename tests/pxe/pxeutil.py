"""Helpers for pxe/ tests: the CLI as a subprocess, hashes, fixture records, cleanup."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from testlib import run_cli, sha256_file

__all__ = ["run_cli", "sha256_file"]  # re-exported for the pxe tests

BIN = Path(sys.executable).parent
MARKER = "PXEDISK"


@dataclass
class PointRepo:
    root: Path
    disk: Path
    point: str
    sha256: str
    size: int


@dataclass
class Serve:
    root: Path
    http_port: int
    nbd_port: int
    portal_port: int
    tftp_root: Path
    proc: subprocess.Popen[bytes]
    log_path: Path

    def env(self) -> dict[str, str]:
        return {"APPLIANCE_REPO": str(self.root)}

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"


def teardown_iscsi(root: Path) -> None:
    """Stop every iSCSI session of `root` (by the PIDs they recorded), and the appliance's
    tgtd once no repository has a target left."""
    from pxe.iscsi import TargetDaemon

    env = {"APPLIANCE_REPO": str(root)}
    with contextlib.suppress(AssertionError, ValueError):
        for s in json.loads(run_cli("iscsi", "list", "--json", env=env).stdout):
            run_cli("iscsi", "unexport", s["name"], env=env, check=False)
    daemon = TargetDaemon()
    with daemon.locked():
        daemon.stop_if_idle()
