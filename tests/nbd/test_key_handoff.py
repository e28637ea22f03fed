"""The passphrase never sits in a long-lived child's environment (issue 8 item 13d): nbdkit
under `appliance nbd serve`, and `appliance nbd serve` itself when a session starts it, get the
unwrapped keys over an inherited pipe. /proc/<pid>/environ shows a process's environment as
it was at exec for its whole life: unsetenv cannot take a secret back out of it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from nbdutil import make_image, need, run
from testlib import BIN, run_cli

import dedupstore as ds

PW = "handoff-secret-passphrase-42"


@pytest.fixture
def enc_repo(tmp_path: Path) -> tuple[Path, bytes]:
    root = tmp_path / "r"
    data = make_image(tmp_path / "d.img", 4 << 20)
    env = {"APPLIANCE_PASSPHRASE": PW}
    run_cli("--repo", str(root), "init", "--encryption", "aes-256-gcm", env=env)
    run_cli("--repo", str(root), "backup", "image", str(tmp_path / "d.img"), "--source", "vm1",
            env=env)  # fmt: skip
    return root, data


def _environ(pid: int) -> bytes:
    return Path(f"/proc/{pid}/environ").read_bytes()


@contextlib.contextmanager
def _serve(
    root: Path, sock: Path, env: dict[str, str], pass_fds: tuple[int, ...] = ()
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """`appliance nbd serve --socket SOCK`; yields (its process, nbdkit's pid); SIGTERM after."""
    proc = subprocess.Popen(
        [str(BIN / "appliance"), "--repo", str(root), "nbd", "serve", "--socket", str(sock)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        pass_fds=pass_fds,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once nbdkit accepts connections
        assert "nbdkit pid" in line, line + (proc.stderr.read() if proc.stderr else "")
        nbdkit_pid = int(line.split("nbdkit pid ")[1].split(")")[0])
        yield proc, nbdkit_pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()


def _check_export(sock: Path, data: bytes, out: Path) -> None:
    run(["nbdcopy", f"nbd+unix:///vm1@latest/disk0?socket={sock}", str(out)])
    assert out.read_bytes() == data


def test_nbdkit_under_nbd_serve_has_no_passphrase(
    enc_repo: tuple[Path, bytes], tmp_path: Path
) -> None:
    need("nbdkit", "nbdcopy")
    root, data = enc_repo
    env = {**os.environ, "APPLIANCE_PASSPHRASE": PW}
    with _serve(root, tmp_path / "s.sock", env) as (proc, nbdkit_pid):
        assert PW.encode() not in _environ(nbdkit_pid)
        # the CLI process itself blanks the value it was given (os.environ keeps its copy)
        assert PW.encode() not in _environ(proc.pid)
        assert PW.encode() not in Path(f"/proc/{nbdkit_pid}/cmdline").read_bytes()
        _check_export(tmp_path / "s.sock", data, tmp_path / "out.img")
        assert proc.poll() is None


def test_session_keeper_gets_keys_not_the_passphrase(
    enc_repo: tuple[Path, bytes], tmp_path: Path
) -> None:
    """As `pxe`'s iSCSI sessions start `appliance nbd serve`: keys over a pipe, no passphrase
    in the environment of the keeper nor of its nbdkit."""
    need("nbdkit", "nbdcopy")
    root, data = enc_repo
    env = {k: v for k, v in os.environ.items() if k != "APPLIANCE_PASSPHRASE"}
    keys = ds.unlock_keys(root, PW)
    assert keys is not None
    with (
        ds.KeyHandoff(keys) as h,
        _serve(root, tmp_path / "k.sock", {**env, **h.env}, pass_fds=h.fds) as (proc, nbdkit_pid),
    ):
        h.close()  # as the spawner does: only the child holds the pipe now
        for pid in (proc.pid, nbdkit_pid):
            assert PW.encode() not in _environ(pid)
            assert keys.enc_key not in _environ(pid)
        _check_export(tmp_path / "k.sock", data, tmp_path / "out.img")


def test_guest_writes_over_nbd_reach_the_disk_encrypted(
    enc_repo: tuple[Path, bytes], tmp_path: Path
) -> None:
    """End to end: a client writes a known pattern into an overlay of an encrypted repository
    through nbdkit (which got its keys over the pipe); no repository file holds the pattern;
    the committed point restores exactly what was written."""
    need("nbdkit", "nbdcopy")
    root, data = enc_repo
    env = {**os.environ, "APPLIANCE_PASSPHRASE": PW}
    run_cli("--repo", str(root), "overlay", "create", "vm1@latest", "--name", "ov", env=env)
    unit = b"NBD-GUEST-PLAINTEXT-MARKER-0123456789/"
    written = bytearray(data)
    pattern = (unit * (len(data) // len(unit) + 1))[: 3 << 20]
    written[1 << 20 : (1 << 20) + len(pattern)] = pattern
    src = tmp_path / "new.img"
    src.write_bytes(written)
    sock = tmp_path / "w.sock"
    with _serve(root, sock, env):
        run(["nbdcopy", str(src), f"nbd+unix:///overlay/ov/disk0?socket={sock}"])
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            assert unit not in (Path(dirpath) / f).read_bytes(), f"plaintext in {f}"
    run_cli("--repo", str(root), "overlay", "commit", "ov", env=env)
    out = tmp_path / "out.img"
    run_cli("--repo", str(root), "restore", "vm1@latest", str(out), env=env)
    assert out.read_bytes() == written
