"""Overlays: copy-on-write sessions on image points, their commit, drop and locking."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from dedupstore import (
    ZERO_ID,
    AlreadyExists,
    InvalidArgument,
    Locked,
    NotFound,
    ReadOnly,
    Repository,
    backup_image,
    commit_overlay,
    create_overlay,
    disk_readers,
    drop_overlay,
    list_overlays,
    open_overlay,
    overlays_on,
    restore_image,
)

BS = 64 * 1024
MiB = 1 << 20


def make_image(path: Path, size: int, seed: int = 1) -> bytes:
    """Random data with a zero region in the middle and a short tail block."""
    rnd = random.Random(seed)
    data = bytearray(rnd.randbytes(size))
    data[size // 4 : size // 2] = bytes(size // 2 - size // 4)
    path.write_bytes(data)
    return bytes(data)


@pytest.fixture
def repo_point(tmp_path: Path) -> tuple[Path, bytes]:
    root = tmp_path / "repo"
    Repository.create(root)
    img = tmp_path / "disk.img"
    data = make_image(img, 4 * MiB + 12345)  # not a multiple of the block size
    with Repository.open(root, writable=True) as repo:
        backup_image(repo, [img], source="vm1", mode="full")
    return root, data


def test_read_write_zero_and_base_untouched(repo_point: tuple[Path, bytes]) -> None:
    root, data = repo_point
    model = bytearray(data)
    with Repository.open(root) as repo:
        info = create_overlay(repo, "vm1@latest", "ov1")
        point = repo.resolve("vm1@latest")
        assert info.base == point.name
        assert overlays_on(repo, point.name) == ["ov1"]
        with open_overlay(repo, "ov1") as ov:
            d = ov.disk("disk0")
            assert d.size_bytes() == len(data)
            assert d.pread(0, len(data)) == data
            writes = [
                (100, b"x" * 10),  # inside one block
                (BS - 5, b"y" * 10),  # across a block boundary
                (3 * BS, b"z" * (2 * BS)),  # whole blocks
                (len(data) - 7, b"t" * 7),  # into the short tail block
                (MiB + 3, os.urandom(3 * BS + 17)),  # head partial + whole + tail partial
            ]
            for off, buf in writes:
                d.pwrite(off, buf)
                model[off : off + len(buf)] = buf
            d.write_zeroes(2 * MiB + 100, 2 * BS)
            model[2 * MiB + 100 : 2 * MiB + 100 + 2 * BS] = bytes(2 * BS)
            d.trim(0, BS)  # a whole block: becomes ZERO
            model[0:BS] = bytes(BS)
            assert d.pread(0, len(model)) == bytes(model)
            for off in (0, 17, BS - 1, len(model) - 1000):
                assert d.pread(off, 1000) == bytes(model[off : off + 1000])
            with pytest.raises(InvalidArgument):
                d.pread(len(data) - 1, 2)
            with pytest.raises(InvalidArgument):
                d.pwrite(len(data), b"a")
            runs = list(d.extents())
            assert runs[0] == (0, BS, True)
            assert sum(n for _o, n, _z in runs) == len(data)
            for off, n, z in runs:
                if z:
                    assert model[off : off + n] == bytes(n)
            d.flush()
        # reopen: everything persisted
        with open_overlay(repo, "ov1") as ov:
            assert ov.disk("disk0").pread(0, len(model)) == bytes(model)
        # the base point did not change
        (r,) = disk_readers(repo, repo.resolve(point.name))
        assert hashlib.sha256(r.pread(0, r.size)).digest() == hashlib.sha256(data).digest()


def test_commit_reuses_base_and_restores(repo_point: tuple[Path, bytes], tmp_path: Path) -> None:
    root, data = repo_point
    model = bytearray(data)
    with Repository.open(root) as repo:
        base = repo.resolve("vm1@latest")
        create_overlay(repo, base.name, "ov")
        with open_overlay(repo, "ov") as ov:
            d = ov.disk("disk0")
            d.pwrite(MiB, b"\xab" * 65536)
            model[MiB : MiB + 65536] = b"\xab" * 65536
            d.write_zeroes(0, 2 * BS)
            model[0 : 2 * BS] = bytes(2 * BS)
        with pytest.raises(ReadOnly):
            commit_overlay(repo, "ov")
    with Repository.open(root, writable=True) as repo:
        point = commit_overlay(repo, "ov")
        assert point.source == "vm1"
        assert point.mode == "overlay-commit"
        assert point.parent == base.id
        stats = point.manifest["stats"]
        assert stats["hashed_blocks"] == 1
        n_blocks = (len(data) + BS - 1) // BS
        assert stats["reused_blocks"] + stats["zero_blocks"] + 1 == n_blocks
        out = tmp_path / "restored.img"
        restore_image(repo, repo.resolve("vm1@latest"), out)
        assert out.read_bytes() == bytes(model)
        (r,) = disk_readers(repo, point)
        assert r.map.entry(0)[0] == ZERO_ID
        # unchanged blocks share the base's chunk ids
        (rb,) = disk_readers(repo, base)
        assert r.map.entry(5)[0] == rb.map.entry(5)[0]
        assert list_overlays(repo)[0].commits == (point.name,)


def test_catalogue_errors_and_drop(repo_point: tuple[Path, bytes]) -> None:
    root, _data = repo_point
    with Repository.open(root) as repo:
        with pytest.raises(InvalidArgument):
            create_overlay(repo, "vm1@latest", "bad/name")
        with pytest.raises(NotFound):
            create_overlay(repo, "nosuch@latest", "x")
        create_overlay(repo, "vm1@latest", "a")
        with pytest.raises(AlreadyExists):
            create_overlay(repo, "vm1@latest", "a")
        assert [o.name for o in list_overlays(repo)] == ["a"]
        ov = open_overlay(repo, "a")
        with pytest.raises(Locked, match="in use"):
            open_overlay(repo, "a")
        with pytest.raises(Locked):
            drop_overlay(repo, "a")
        assert list_overlays(repo)[0].in_use
        ov.close()
        drop_overlay(repo, "a")
        assert list_overlays(repo) == []
        with pytest.raises(NotFound):
            open_overlay(repo, "a")
        with pytest.raises(NotFound):
            drop_overlay(repo, "a")


def test_lock_is_per_process(repo_point: tuple[Path, bytes]) -> None:
    """A second process cannot open an overlay that this process has open."""
    root, _data = repo_point
    with Repository.open(root) as repo:
        create_overlay(repo, "vm1@latest", "p")
        with open_overlay(repo, "p"):
            code = (
                "import sys\nfrom dedupstore import Repository, open_overlay, Locked\n"
                f"r = Repository.open({str(root)!r})\n"
                "try:\n    open_overlay(r, 'p')\nexcept Locked as e:\n"
                "    print(e); sys.exit(3)\n"
            )
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 timeout=30)
            assert res.returncode == 3, res.stderr
            assert "in use" in res.stdout


def test_concurrent_partial_writes_same_block(repo_point: tuple[Path, bytes]) -> None:
    """Threads writing different bytes of the same blocks never lose each other's writes."""
    root, _data = repo_point
    with Repository.open(root) as repo:
        create_overlay(repo, "vm1@latest", "c")
        with open_overlay(repo, "c") as ov:
            d = ov.disk("disk0")
            n_threads, per = 8, 200

            def worker(t: int) -> None:
                for k in range(per):
                    off = (k % 4) * BS + (k // 4) * n_threads + t  # interleaved single bytes
                    d.pwrite(off, bytes([t + 1]))

            threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            got = d.pread(0, 4 * BS)
            for t in range(n_threads):
                for k in range(per):
                    off = (k % 4) * BS + (k // 4) * n_threads + t
                    assert got[off] == t + 1


def test_encrypted_repository(tmp_path: Path) -> None:
    root = tmp_path / "enc"
    Repository.create(root, encryption="aes-256-gcm", passphrase="pw")
    img = tmp_path / "d.img"
    data = make_image(img, 1 * MiB)
    with Repository.open(root, writable=True, passphrase="pw") as repo:
        backup_image(repo, [img], source="s", mode="full")
        create_overlay(repo, "s@latest", "e")
        with open_overlay(repo, "e") as ov:
            ov.disk("disk0").pwrite(10, b"hello")
        p = commit_overlay(repo, "e")
        (r,) = disk_readers(repo, p)
        assert r.pread(0, 20) == data[:10] + b"hello" + data[15:20]
