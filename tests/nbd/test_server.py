"""The NBD server for real: nbdkit + our plugin, driven by nbdinfo, nbdcopy, qemu-img, qemu-io,
libnbd and raw sockets."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from nbdutil import (
    SYSTEM_PYTHON,
    ZERO_END,
    ZERO_START,
    MiB,
    RepoImage,
    libnbd,
    make_image,
    need,
    run,
    sha256_file,
)

from dedupstore import (
    Repository,
    backup_image,
    create_overlay,
    disk_readers,
    drop_overlay,
    restore_image,
)
from nbd import NbdServer, NbdServerError

pytestmark = pytest.mark.nbd_client

NBD_MAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
NBD_OPT_GO = 7
NBD_REQUEST_MAGIC = 0x25609513


def _exports(srv: NbdServer) -> dict[str, dict[str, object]]:
    res = run(["nbdinfo", "--list", "--json", srv.uri()])
    return {e["export-name"]: e for e in json.loads(res.stdout)["exports"]}


def test_list_shows_points_and_overlays(repo_image: RepoImage, server_factory: Callable[
        ..., NbdServer]) -> None:
    need("nbdinfo")
    with Repository.open(repo_image.root) as repo:
        create_overlay(repo, "vm1@latest", "listed")
    try:
        srv = server_factory(repo_image.root)
        ex = _exports(srv)
        point_export = f"{repo_image.point}/disk0"
        assert point_export in ex
        assert "vm1@latest/disk0" in ex
        assert "overlay/listed/disk0" in ex
        assert "read-only" in str(ex[point_export]["description"])
        assert "writable" in str(ex["overlay/listed/disk0"]["description"])
        assert ex[point_export]["is_read_only"] is True
        assert ex["overlay/listed/disk0"]["is_read_only"] is False
        assert ex["vm1@latest/disk0"]["export-size"] == len(repo_image.data)
        srv.stop()
        only = server_factory(repo_image.root, overlays_only=True)
        assert list(_exports(only)) == ["overlay/listed/disk0"]
    finally:
        with Repository.open(repo_image.root) as repo:
            drop_overlay(repo, "listed")


def test_nbdcopy_qemu_img_and_map(repo_image: RepoImage, server: NbdServer,
                                  tmp_path: Path) -> None:
    need("nbdcopy", "qemu-img", "nbdinfo")
    out = tmp_path / "out.img"
    run(["nbdcopy", server.uri("vm1@latest/disk0"), str(out)])
    assert sha256_file(out) == hashlib.sha256(repo_image.data).hexdigest()
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(repo_image.image),
         server.uri(f"{repo_image.point}/disk0")])
    m = json.loads(run(["nbdinfo", "--map", "--json", server.uri("vm1@latest/disk0")]).stdout)
    zero = [e for e in m if e["type"] == 3]  # NBD_STATE_HOLE | NBD_STATE_ZERO
    assert [(e["offset"], e["length"]) for e in zero] == [(ZERO_START, ZERO_END - ZERO_START)]
    assert all(e["type"] == 0 for e in m if e not in zero)
    assert sum(e["length"] for e in m) == len(repo_image.data)


def test_overlay_write_restart_commit(repo_image: RepoImage, server_factory: Callable[
        ..., NbdServer], tmp_path: Path) -> None:
    need("qemu-io", "nbdcopy")
    with Repository.open(repo_image.root) as repo:
        create_overlay(repo, repo_image.point, "ov")
    try:
        srv = server_factory(repo_image.root)
        uri = srv.uri("overlay/ov/disk0")
        run(["qemu-io", "-f", "raw", "-c", "write -P 0xab 1M 64k", uri])
        run(["qemu-io", "-f", "raw", "-c", "read -P 0xab 1M 64k", uri])
        # a partial-block write into the zero region
        run(["qemu-io", "-f", "raw", "-c", f"write -P 0xcd {ZERO_START + 100} 1000", uri])
        srv.stop()
        srv = server_factory(repo_image.root)
        uri = srv.uri("overlay/ov/disk0")
        run(["qemu-io", "-f", "raw", "-c", "read -P 0xab 1M 64k", "-c",
             f"read -P 0 {ZERO_START} 100", "-c", f"read -P 0xcd {ZERO_START + 100} 1000",
             uri])
        # the base point is untouched
        base_out = tmp_path / "base.img"
        run(["nbdcopy", srv.uri(f"{repo_image.point}/disk0"), str(base_out)])
        assert sha256_file(base_out) == hashlib.sha256(repo_image.data).hexdigest()
        srv.stop()
        # commit through the CLI (needs the overlay free: nobody is connected)
        res = run([str(Path(sys.executable).with_name("appliance")), "--repo",
                   str(repo_image.root), "overlay", "commit", "ov"])
        new_point = res.stdout.strip().splitlines()[-1]
        assert new_point.startswith("vm1@")
        with Repository.open(repo_image.root) as repo:
            p = repo.resolve(new_point)
            assert p.mode == "overlay-commit"
            assert p.parent == repo_image.point.split("@")[1]
            restored = tmp_path / "restored.img"
            restore_image(repo, p, restored)
        want = bytearray(repo_image.data)
        want[MiB : MiB + 65536] = b"\xab" * 65536
        want[ZERO_START + 100 : ZERO_START + 1100] = b"\xcd" * 1000
        assert restored.read_bytes() == bytes(want)
    finally:
        with Repository.open(repo_image.root) as repo:
            drop_overlay(repo, "ov")
            # leave the module's repository as other tests expect: latest = the image
            w = Repository.open(repo_image.root, writable=True)
            try:
                for p in w.list_points("vm1"):
                    if p.name != repo_image.point:
                        w.delete_point(p)
            finally:
                w.close()


def test_trim_and_write_zeroes(repo_image: RepoImage, server_factory: Callable[
        ..., NbdServer]) -> None:
    need("qemu-io", "nbdinfo")
    with Repository.open(repo_image.root) as repo:
        create_overlay(repo, repo_image.point, "tz")
    try:
        srv = server_factory(repo_image.root)
        uri = srv.uri("overlay/tz/disk0")
        run(["qemu-io", "-f", "raw", "-c", "discard 0 128k", "-c", "write -z 2M 192k",
             "-c", "write -z 3M 1000", "-c", "read -P 0 0 128k", "-c", "read -P 0 2M 192k",
             "-c", "read -P 0 3M 1000", uri])
        m = json.loads(run(["nbdinfo", "--map", "--json", uri]).stdout)
        zero = [(e["offset"], e["length"]) for e in m if e["type"] == 3]
        assert (0, 128 * 1024) in zero
        assert (2 * MiB, 192 * 1024) in zero
        # libnbd: zero + trim + flush + read back
        out = libnbd(uri, "h.zero(4096, 8192)\nh.trim(65536, 131072)\nh.flush()\n"
                          "out = [h.pread(4096, 8192) == bytes(4096), "
                          "h.pread(65536, 131072) == bytes(65536), h.can_multi_conn()]")
        assert out == [True, True, True]
    finally:
        srv.stop()
        with Repository.open(repo_image.root) as repo:
            drop_overlay(repo, "tz")


def test_write_to_readonly_export_fails_and_server_goes_on(
        repo_image: RepoImage, server: NbdServer) -> None:
    need("nbdinfo")
    out = libnbd(server.uri("vm1@latest/disk0"),
                 "import errno\n"
                 "try:\n    h.pwrite(b'x' * 512, 0)\n    out = 'no error'\n"
                 "except nbd.Error as e:\n    out = [e.errno, h.pread(512, 0) != b'x' * 512]\n")
    assert out[0] in ("EPERM", "EROFS")  # libnbd reports errno names
    assert out[1] is True
    run(["nbdinfo", "--size", server.uri("vm1@latest/disk0")])


def _handshake(sock: socket.socket) -> None:
    greeting = sock.recv(18, socket.MSG_WAITALL)
    assert greeting[:8] == NBD_MAGIC and greeting[8:16] == IHAVEOPT
    sock.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES


def test_garbage_then_new_client_works(repo_image: RepoImage, server: NbdServer) -> None:
    need("nbdinfo")
    addr = (server.host, server.port)
    # 1. random bytes straight away
    with socket.create_connection(addr, timeout=10) as s:
        s.sendall(os.urandom(4096))
        s.settimeout(10)
        try:
            while s.recv(65536):
                pass
        except ConnectionResetError:
            pass
    # 2. a bad option magic after a good greeting
    with socket.create_connection(addr, timeout=10) as s:
        _handshake(s)
        s.sendall(b"BADMAGIC" + struct.pack(">II", NBD_OPT_GO, 0))
        try:
            while s.recv(65536):
                pass
        except ConnectionResetError:
            pass
    # 3. an option with an absurd length
    with socket.create_connection(addr, timeout=10) as s:
        _handshake(s)
        s.sendall(IHAVEOPT + struct.pack(">II", NBD_OPT_GO, 0xFFFFFFF0) + b"x" * 100)
        try:
            while s.recv(65536):
                pass
        except ConnectionResetError:
            pass
    # 4. requests beyond the end and oversized, through libnbd with strict mode off
    size = len(repo_image.data)
    out = libnbd(server.uri("vm1@latest/disk0"),
                 "res = []\n"
                 f"for off, n in (({size} - 10, 4096), ({size} + 4096, 512), (0, 64 << 20 | 1)):\n"
                 "    try:\n        h.pread(n, off)\n        res.append('ok')\n"
                 "    except nbd.Error as e:\n        res.append(e.errno)\n"
                 "res.append(len(h.pread(4096, 0)))\nout = res\n")
    assert out[0] == "EINVAL" and out[1] == "EINVAL"  # out-of-range
    assert out[2] != "ok"  # oversized: EINVAL/ENOMEM or a closed connection
    # 5. the server survives all of it and serves a new client
    assert server.alive()
    res = run(["nbdinfo", "--size", server.uri("vm1@latest/disk0")])
    assert int(res.stdout.strip()) == size


def test_corrupt_chunk_is_eio_for_that_read_only(tmp_path: Path, server_factory: Callable[
        ..., NbdServer]) -> None:
    from dedupstore._pack import pack_path  # test-only: find the bytes to damage

    root = tmp_path / "repo"
    Repository.create(root)
    img = tmp_path / "d.img"
    data = make_image(img, 2 * MiB)
    with Repository.open(root, writable=True) as repo:
        p = backup_image(repo, [img], source="c", mode="full")
        (reader,) = disk_readers(repo, p)
        cid, _fp = reader.map.entry(3)  # block 3 = bytes 192K..256K
        pid, offset, stored, *_ = repo.index.lookup(cid)
        path = pack_path(root, str(repo.index.pack_info(pid)["tier"]), pid)
    with open(path, "r+b") as f:
        f.seek(offset + stored // 2)
        b = f.read(1)
        f.seek(offset + stored // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    srv = server_factory(root)
    uri = srv.uri("c@latest/disk0")
    res = run(["qemu-io", "-r", "-f", "raw", "-c", "read 192k 4k", uri], check=False)
    assert "Input/output error" in res.stdout + res.stderr
    out = libnbd(uri, "res = []\n"
                      "for off in (0, 3 * 65536 + 100, 4 * 65536):\n"
                      "    try:\n        res.append(h.pread(100, off).hex())\n"
                      "    except nbd.Error as e:\n        res.append(e.errno)\n"
                      "out = res\n")
    assert out[0] == data[:100].hex()
    assert out[1] == "EIO"
    assert out[2] == data[4 * 65536 : 4 * 65536 + 100].hex()
    assert srv.alive()
    srv.stop()
    assert "ChunkCorrupt" in srv.log_text


def test_encrypted_repository(tmp_path: Path, server_factory: Callable[..., NbdServer]) -> None:
    need("nbdcopy")
    root = tmp_path / "enc"
    Repository.create(root, encryption="aes-256-gcm", passphrase="s3cret")
    img = tmp_path / "d.img"
    data = make_image(img, 4 * MiB)
    with Repository.open(root, writable=True, passphrase="s3cret") as repo:
        backup_image(repo, [img], source="e", mode="full")
    with pytest.raises(NbdServerError, match=r"(?i)passphrase"):
        server_factory(root, passphrase="wrong")
    srv = server_factory(root, passphrase="s3cret")
    out = tmp_path / "out.img"
    run(["nbdcopy", srv.uri("e@latest/disk0"), str(out)])
    assert out.read_bytes() == data


def test_unix_socket_stale_and_tls_psk(repo_image: RepoImage, tmp_path: Path,
                                       server_factory: Callable[..., NbdServer]) -> None:
    need("nbdinfo")
    sock_path = tmp_path / "nbd.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock_path))  # bound, never listening, then abandoned: a stale socket
    stale.close()
    srv = server_factory(repo_image.root, socket=sock_path)
    res = run(["nbdinfo", "--size", srv.uri("vm1@latest/disk0")])
    assert int(res.stdout) == len(repo_image.data)
    srv.stop()
    assert not sock_path.exists()

    psk = tmp_path / "keys.psk"
    psk.write_text("alice:" + os.urandom(32).hex() + "\n")
    tls = server_factory(repo_image.root, tls_psk=psk)
    uri = tls.uri("vm1@latest/disk0").replace("nbds://", "nbds://alice@")
    res = run(["nbdinfo", "--size", f"{uri}?tls-psk-file={psk}"])
    assert int(res.stdout) == len(repo_image.data)
    plain = run(["nbdinfo", "--size", f"nbd://127.0.0.1:{tls.port}/vm1@latest/disk0"],
                check=False)
    assert plain.returncode != 0


def _cli_serve(root: Path, *args: str) -> subprocess.Popen[str]:
    appliance = Path(sys.executable).with_name("appliance")
    return subprocess.Popen([str(appliance), "--repo", str(root), "nbd", "serve", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stop_cli(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0"])
def test_cli_serve_off_loopback_without_tls_is_refused(repo_image: RepoImage,
                                                       listen: str) -> None:
    proc = _cli_serve(repo_image.root, "--listen", listen)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, out + err
    assert err.startswith("appliance: error: refusing to serve NBD on ")
    assert "--tls-psk" in err and "--insecure" in err
    assert len(err.strip().splitlines()) == 1 and out == ""


def test_server_refuses_off_loopback_without_tls(repo_image: RepoImage) -> None:
    with pytest.raises(NbdServerError, match=r"--tls-psk FILE.*--insecure"):
        NbdServer(repo_image.root, listen="0.0.0.0:0").start()


def test_cli_serve_tls_psk_off_loopback(repo_image: RepoImage, tmp_path: Path) -> None:
    """`nbd serve --listen 0.0.0.0:0 --tls-psk F` serves: nbdinfo/nbdcopy with the PSK read the
    point byte-exact; without TLS, or with another key, they get nothing. `--only` narrows the
    exports to one point; `--insecure` allows clear text off loopback when asked for."""
    need("nbdinfo")
    need("nbdcopy")
    psk = tmp_path / "keys.psk"
    psk.write_text("alice:" + os.urandom(32).hex() + "\n")
    wrong = tmp_path / "wrong.psk"
    wrong.write_text("alice:" + os.urandom(32).hex() + "\n")
    proc = _cli_serve(repo_image.root, "--listen", "0.0.0.0:0", "--tls-psk", str(psk),
                      "--only", repo_image.point)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("serving"), line + (proc.stderr.read() if proc.stderr else "")
        port = int(line.split(" on ")[1].split(" ")[0].rsplit(":", 1)[1])
        base = f"nbds://alice@127.0.0.1:{port}"
        listed = run(["nbdinfo", "--list", "--json", f"{base}/?tls-psk-file={psk}"])
        names = {e["export-name"] for e in json.loads(listed.stdout)["exports"]}
        assert names == {f"{repo_image.point}/disk0", "vm1@latest/disk0"}
        out = tmp_path / "copy.img"
        run(["nbdcopy", f"{base}/{repo_image.point}/disk0?tls-psk-file={psk}", str(out)])
        assert sha256_file(out) == hashlib.sha256(repo_image.data).hexdigest()
        for uri in (f"nbd://127.0.0.1:{port}/{repo_image.point}/disk0",
                    f"{base}/{repo_image.point}/disk0?tls-psk-file={wrong}"):
            assert run(["nbdinfo", "--size", uri], check=False).returncode != 0, uri
    finally:
        _stop_cli(proc)
    proc = _cli_serve(repo_image.root, "--listen", "0.0.0.0:0", "--insecure")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("serving"), line + (proc.stderr.read() if proc.stderr else "")
        port = int(line.split(" on ")[1].split(" ")[0].rsplit(":", 1)[1])
        size = run(["nbdinfo", "--size", f"nbd://127.0.0.1:{port}/vm1@latest/disk0"])
        assert int(size.stdout) == len(repo_image.data)
    finally:
        _stop_cli(proc)


def test_cli_serve_foreground_sigterm(repo_image: RepoImage) -> None:
    need("nbdinfo")
    appliance = Path(sys.executable).with_name("appliance")
    proc = subprocess.Popen([str(appliance), "--repo", str(repo_image.root), "nbd", "serve",
                             "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    nbdkit_pid = None
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("serving"), line + (proc.stderr.read() if proc.stderr else "")
        nbdkit_pid = int(line.split("nbdkit pid ")[1].split(")")[0])
        uri = line.split("nbdinfo --list '")[1].rstrip("'\n")
        res = run(["nbdinfo", "--list", uri])
        assert "vm1@latest/disk0" in res.stdout
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        deadline = time.monotonic() + 5
        while _pid_alive(nbdkit_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _pid_alive(nbdkit_pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if nbdkit_pid and _pid_alive(nbdkit_pid):
            os.kill(nbdkit_pid, signal.SIGKILL)


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_overlay_busy_while_connected(repo_image: RepoImage, server: NbdServer) -> None:
    """A connected overlay is locked by the server: commit/drop elsewhere get a clear error."""
    with Repository.open(repo_image.root) as repo:
        create_overlay(repo, repo_image.point, "busy")
    try:
        code = (
            "import json, sys, subprocess, nbd\n"
            "h = nbd.NBD(); h.connect_uri(sys.argv[1])\n"
            "h.pwrite(b'q' * 4096, 0)\n"
            "r = subprocess.run(sys.argv[2:], capture_output=True, text=True)\n"
            "print(json.dumps([r.returncode, r.stderr]))\n"
        )
        appliance = str(Path(sys.executable).with_name("appliance"))
        res = subprocess.run([SYSTEM_PYTHON, "-I",
                              "-c", code, server.uri("overlay/busy/disk0"), appliance,
                              "--repo", str(repo_image.root), "overlay", "drop", "busy"],
                             capture_output=True, text=True, timeout=60)
        rc, err = json.loads(res.stdout)
        assert rc != 0
        assert "in use" in err
    finally:
        deadline = time.monotonic() + 10
        while True:  # the server releases the overlay when the connection closes
            try:
                with Repository.open(repo_image.root) as repo:
                    drop_overlay(repo, "busy")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def test_stop_with_connected_writer_keeps_writes(repo_image: RepoImage,
                                                 server_factory: Callable[..., NbdServer]
                                                 ) -> None:
    """nbdkit will not exit on SIGTERM while a client is connected: stop() kills it after a
    grace period and syncs the overlay; completed writes are all there."""
    from dedupstore import open_overlay

    with Repository.open(repo_image.root) as repo:
        create_overlay(repo, repo_image.point, "held")
    srv = server_factory(repo_image.root)
    code = ("import nbd, sys, time\nh = nbd.NBD(); h.connect_uri(sys.argv[1])\n"
            "h.pwrite(b'W' * 70000, 30000)\nprint('written', flush=True)\ntime.sleep(60)\n")
    client = subprocess.Popen([SYSTEM_PYTHON, "-I", "-c", code, srv.uri("overlay/held/disk0")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "written"
        t0 = time.monotonic()
        srv.stop(timeout_s=1)
        assert time.monotonic() - t0 < 5
        with Repository.open(repo_image.root) as repo:
            with open_overlay(repo, "held") as ov:
                assert ov.disk("disk0").pread(30000, 70000) == b"W" * 70000
            drop_overlay(repo, "held")
    finally:
        client.kill()
        client.wait()
