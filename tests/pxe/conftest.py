"""Fixtures for pxe/ tests: a repository holding a bootable test-disk point, the rescue system,
and `appliance pxe serve` run as a subprocess (stopped by PID; every iSCSI session and tgtd it
left behind is torn down by PID too, even when the test failed)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pxeutil import BIN, MARKER, PointRepo, Serve, run_cli, sha256_file, teardown_iscsi
from vmutil import free_tcp_port


@pytest.fixture(scope="session", autouse=True)
def appliance_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The appliance-wide state (the shared tgtd) of these tests lives in a temp dir, not in
    /run/dr-appliance; the tgtd is stopped at the end even if a test left a target."""
    from pxe.iscsi import RUN_DIR_ENV, TargetDaemon, stop_tgtd

    run = tmp_path_factory.mktemp("run")
    old = os.environ.get(RUN_DIR_ENV)
    os.environ[RUN_DIR_ENV] = str(run)
    try:
        yield run
    finally:
        from pxe import _proc

        st = TargetDaemon().state()
        if st is not None:
            stop_tgtd(_proc.ProcRef.from_dict(st["proc"]), int(st["control_port"]))
        if old is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = old


@pytest.fixture(scope="module")
def point_repo(tmp_path_factory: pytest.TempPathFactory) -> PointRepo:
    """A repository with one full image point of a 16 MiB bootable test disk (marker PXEDISK).

    The disk is SAN-capable (`--iscsi`): SAN-booted, its Linux logs in to the LUN through iBFT.
    """
    base = tmp_path_factory.mktemp("pxerepo")
    root = base / "repo"
    disk = base / "disk.img"
    subprocess.run([sys.executable, "-m", "kernel", "testdisk", str(disk), "--marker", MARKER,
                    "--iscsi"], check=True, capture_output=True)  # fmt: skip
    env = {"APPLIANCE_REPO": str(root)}
    run_cli("init", env=env)
    out = run_cli("backup", "image", "--source", "vm1", "--json", str(disk), env=env).stdout
    point = json.loads(out)["point"]
    return PointRepo(root, disk, point, sha256_file(disk), disk.stat().st_size)


@pytest.fixture(scope="session")
def rescue_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The rescue system, built through `appliance build rescue`."""
    out = tmp_path_factory.mktemp("rescue")
    run_cli("build", "rescue", "--out", str(out))
    return out


@pytest.fixture
def serve(point_repo: PointRepo, rescue_dir: Path, tmp_path: Path) -> Iterator[Serve]:
    """`appliance pxe serve` for the QEMU PXE lab: HTTP/NBD/iSCSI on 127.0.0.1, boot.ipxe
    pointing at 10.0.2.2 (the host as QEMU's user network shows it)."""
    http_port, portal_port = free_tcp_port(), free_tcp_port()
    tftp = tmp_path / "tftp"
    log_path = tmp_path / "serve.log"
    cmd = [str(BIN / "appliance"), "-v", "pxe", "serve",
           "--http", f"127.0.0.1:{http_port}", "--nbd", "127.0.0.1:0",
           "--iscsi-portal", f"127.0.0.1:{portal_port}", "--advertise", "10.0.2.2",
           "--tftp-root", str(tftp), "--rescue-dir", str(rescue_dir)]  # fmt: skip
    env = {**os.environ, "APPLIANCE_REPO": str(point_repo.root)}
    with log_path.open("wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            text = log_path.read_text(errors="replace")
            m = re.search(r"nbd [\d.]+:(\d+) ", text)
            if m and "pxe: http" in text:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"pxe serve did not start:\n{text}")
            time.sleep(0.1)
        yield Serve(point_repo.root, http_port, int(m.group(1)), portal_port, tftp, proc, log_path)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        teardown_iscsi(point_repo.root)
