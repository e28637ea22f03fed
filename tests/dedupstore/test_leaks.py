"""What no one may read (issue 8 item 13): in an encrypted repository the files cache holds no
plain path, overlay deltas hold no guest data in plaintext, and every repository file is 0600
and every directory 0700 whatever the umask."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from testlib import make_image, run_cli, sha256_file

from dedupstore import (
    Repository,
    backup_image,
    backup_tree,
    commit_overlay,
    create_overlay,
    open_overlay,
    restore_image,
)

PW = "leak test passphrase"
BS = 64 * 1024
SECRET_NAME = "quarterly-salaries-of-the-board.xlsx"


def _files_under(root: Path) -> Iterator[Path]:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            yield Path(dirpath) / f


def _holds(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in _files_under(root) if needle in p.read_bytes()]


@pytest.mark.parametrize("encrypted", [True, False])
def test_files_cache_has_no_plain_paths_when_encrypted(tmp_path: Path, encrypted: bool) -> None:
    root = tmp_path / "r"
    enc = {"encryption": "aes-256-gcm", "passphrase": PW} if encrypted else {}
    Repository.create(root, **enc)  # type: ignore[arg-type]
    src = tmp_path / "srcdir-visible-only-in-plain"
    (src / "finance").mkdir(parents=True)
    (src / "finance" / SECRET_NAME).write_bytes(os.urandom(50_000))
    pw = PW if encrypted else None
    with Repository.open(root, passphrase=pw, writable=True) as repo:
        backup_tree(repo, src, source="host1")
        second = backup_tree(repo, src, source="host1")
    # the cache still works: the second run read nothing
    assert second.manifest["stats"]["cached_files"] == 1
    leaks = _holds(root, SECRET_NAME.encode())
    if encrypted:
        assert leaks == []
    else:  # a plain repository keeps its plain cache (what makes this test sensitive)
        assert any(p.endswith("data.mdb") for p in leaks)


def test_plain_files_cache_of_an_older_encrypted_repository_is_dropped(tmp_path: Path) -> None:
    from dedupstore._index import Index

    root = tmp_path / "r"
    Repository.create(root, encryption="aes-256-gcm", passphrase=PW)
    old = Index(root / "index", readonly=False)  # as a version before sealing wrote it
    old.commit(files=[(b"host1\0finance/" + SECRET_NAME.encode(), {"sig": [1, 2, 3, 4]})])
    old.close()
    with (
        Repository.open(root, passphrase=PW, writable=True) as repo,
        repo.index.env.begin(db=repo.index.files) as txn,
    ):
        assert txn.stat(repo.index.files)["entries"] == 0


def _pattern(n: int) -> bytes:
    unit = b"GUEST-WROTE-THIS-PLAINTEXT-0123456789abcdef!"
    return (unit * (n // len(unit) + 1))[:n]


def test_encrypted_overlay_delta_holds_no_plaintext(tmp_path: Path) -> None:
    root = tmp_path / "r"
    Repository.create(root, encryption="aes-256-gcm", passphrase=PW)
    img = make_image(tmp_path / "d.img", 2)
    with Repository.open(root, passphrase=PW, writable=True) as repo:
        backup_image(repo, [img], source="vm1", mode="full")
        info = create_overlay(repo, "vm1@latest", "ov")
        assert info.encrypted
    model = bytearray(img.read_bytes())
    writes = [(3 * BS, _pattern(2 * BS)), (10 * BS + 100, _pattern(5000)),
              (len(model) - 7000, _pattern(7000))]  # fmt: skip
    with Repository.open(root, passphrase=PW) as repo, open_overlay(repo, "ov") as ov:
        disk = ov.disks[0]
        for off, data in writes:
            disk.pwrite(off, data)
            model[off : off + len(data)] = data
        disk.write_zeroes(20 * BS, BS)
        model[20 * BS : 21 * BS] = bytes(BS)
        assert disk.pread(0, len(model)) == model
    needle = _pattern(64)[5:37]
    assert _holds(root, needle) == []
    with Repository.open(root, passphrase=PW) as repo, open_overlay(repo, "ov") as ov:
        assert ov.disks[0].pread(0, len(model)) == model  # reopened: reads back exact
    with Repository.open(root, passphrase=PW, writable=True) as repo:
        point = commit_overlay(repo, "ov")
        restore_image(repo, point, tmp_path / "out.img")
    assert (tmp_path / "out.img").read_bytes() == model
    assert _holds(root, needle) == []


def test_plain_overlay_is_unchanged(tmp_path: Path) -> None:
    """An unencrypted repository's overlay keeps the plain delta layout."""
    root = tmp_path / "r"
    Repository.create(root)
    img = make_image(tmp_path / "d.img", 1)
    with Repository.open(root, writable=True) as repo:
        backup_image(repo, [img], source="vm1", mode="full")
        assert not create_overlay(repo, "vm1@latest", "ov").encrypted
        with open_overlay(repo, "ov") as ov:
            ov.disks[0].pwrite(BS, _pattern(BS))
    delta = root / "overlays" / "ov" / "disk0.delta"
    assert delta.read_bytes()[BS : 2 * BS] == _pattern(BS)


def test_encrypted_overlay_keeps_the_flushed_block_through_a_lost_map(tmp_path: Path) -> None:
    """Power loss after unflushed writes leaves the map as of some point since the last flush
    (or later); the delta slot that map points to must still be whole. Simulated by putting
    back the map the last flush made durable."""
    root = tmp_path / "r"
    Repository.create(root, encryption="aes-256-gcm", passphrase=PW)
    img = make_image(tmp_path / "d.img", 1)
    with Repository.open(root, passphrase=PW, writable=True) as repo:
        backup_image(repo, [img], source="vm1", mode="full")
        create_overlay(repo, "vm1@latest", "ov")
    mapf = root / "overlays" / "ov" / "disk0.map"
    blocks = [bytes([n]) * BS for n in (1, 2, 3, 4)]
    flushed_by_itself = 0
    with Repository.open(root, passphrase=PW) as repo:
        for rounds in range(6):
            with open_overlay(repo, "ov") as ov:
                d = ov.disks[0]
                d.pwrite(5 * BS, blocks[0])
                d.flush()
                durable_map = mapf.read_bytes()
                expected = blocks[0]
                for i in range(1 + rounds % 3):  # 1..3 writes after the flush
                    d.pwrite(5 * BS, blocks[1 + i])
                    if d._durable != durable_map:  # the overlay flushed by itself
                        durable_map, expected = bytes(d._durable), blocks[i]
                        flushed_by_itself += 1
            mapf.write_bytes(durable_map)  # the power loss: only the durable map survived
            with open_overlay(repo, "ov") as ov:
                assert ov.disks[0].pread(5 * BS, BS) == expected
    assert flushed_by_itself > 0  # the second write since a flush did reuse no durable slot


def test_repository_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    r = tmp_path / "r"
    img = make_image(tmp_path / "d.img", 1)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 10000)
    env = {"APPLIANCE_PASSPHRASE": PW}
    old = os.umask(0)
    try:
        run_cli("--repo", str(r), "init", "--encryption", "aes-256-gcm", env=env)
        run_cli("--repo", str(r), "backup", "image", str(img), "--source", "vm1", env=env)
        run_cli("--repo", str(r), "backup", "files", str(src), "--source", "h", env=env)
        run_cli("--repo", str(r), "lock", "vm1@latest", "--until", "2030-01-01", env=env)
        run_cli("--repo", str(r), "overlay", "create", "vm1@latest", "--name", "ov", env=env)
        with Repository.open(r, passphrase=PW) as repo, open_overlay(repo, "ov") as ov:
            ov.disks[0].pwrite(0, b"y" * BS)
        run_cli("--repo", str(r), "overlay", "commit", "ov", env=env)
        run_cli("--repo", str(r), "key", "add",
                env={**env, "APPLIANCE_NEW_PASSPHRASE": "two"})  # fmt: skip
    finally:
        os.umask(old)
    loose = []
    for dirpath, dirs, files in os.walk(r):
        for name in [*dirs, "."]:
            p = Path(dirpath) / name
            if stat.S_IMODE(p.stat().st_mode) != 0o700:
                loose.append(f"{oct(stat.S_IMODE(p.stat().st_mode))} {p}")
        for name in files:
            p = Path(dirpath) / name
            if stat.S_IMODE(p.stat().st_mode) != 0o600:
                loose.append(f"{oct(stat.S_IMODE(p.stat().st_mode))} {p}")
    assert loose == []
    assert {p.name for p in _files_under(r)} >= {
        "config.json",
        "data.mdb",
        "lock.mdb",
        "disk0.delta",
        "disk0.map",
        "overlay.json",
    }
    assert sha256_file(img)  # the source stays as it was
