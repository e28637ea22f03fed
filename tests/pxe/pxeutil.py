"""Helpers for pxe/ tests: the CLI as a subprocess, hashes, fixture records, cleanup."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent
MARKER = "PXEDISK"


def run_cli(
    *args: str, env: dict[str, str] | None = None, check: bool = True, timeout_s: float = 300
) -> subprocess.CompletedProcess[str]:
    """`appliance ARGS` in a subprocess; AssertionError with its output if it fails."""
    proc = subprocess.run([str(BIN / "appliance"), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout_s)  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(
            f"appliance {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


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
    """Stop every iSCSI session of `root` and its tgtd (by the PIDs they recorded)."""
    from pxe import _proc
    from pxe.iscsi import stop_tgtd

    env = {"APPLIANCE_REPO": str(root)}
    with contextlib.suppress(AssertionError, ValueError):
        for s in json.loads(run_cli("iscsi", "list", "--json", env=env).stdout):
            run_cli("iscsi", "unexport", s["name"], env=env, check=False)
    state = root / "pxe" / "iscsi" / "tgtd.json"
    if state.exists():
        st = json.loads(state.read_text())
        stop_tgtd(_proc.ProcRef.from_dict(st["proc"]), int(st["control_port"]))
        state.unlink()
