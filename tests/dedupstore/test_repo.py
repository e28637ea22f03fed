"""Chunk layer: codecs, hashes, encryption, locking, corruption detection."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dedupstore import (
    ChunkCorrupt,
    ChunkMissing,
    InvalidArgument,
    Kind,
    Locked,
    NotFound,
    ReadOnly,
    Repository,
    WrongPassphrase,
)

PAYLOADS = [b"", b"x", b"hello world" * 1000, os.urandom(70_000), bytes(65536)]


@pytest.mark.parametrize("compression", ["zstd", "zstd,1", "lzo", "gzip", "none"])
@pytest.mark.parametrize("hash_name", ["sha256", "blake3"])
@pytest.mark.parametrize("encryption", ["none", "aes-256-gcm"])
def test_put_get_roundtrip(tmp_path: Path, compression: str, hash_name: str,
                           encryption: str) -> None:
    pw = "s3cret" if encryption != "none" else None
    Repository.create(tmp_path / "r", compression=compression, hash_name=hash_name,
                      encryption=encryption, passphrase=pw)
    ids = []
    with Repository.open(tmp_path / "r", writable=True, passphrase=pw) as repo:
        for data in PAYLOADS:
            if data:
                ids.append((repo.put(Kind.FILE, data).chunk_id, data))
        again = repo.put(Kind.FILE, PAYLOADS[2])
        assert again.duplicate
        repo.flush()
    with Repository.open(tmp_path / "r", passphrase=pw) as repo:
        for cid, data in ids:
            assert repo.get(cid, verify_id=True) == data


def test_encrypted_ids_are_keyed(tmp_path: Path) -> None:
    import hashlib

    Repository.create(tmp_path / "r", encryption="aes-256-gcm", passphrase="pw")
    with Repository.open(tmp_path / "r", writable=True, passphrase="pw") as repo:
        cid = repo.put(Kind.FILE, b"known plaintext").chunk_id
        repo.flush()
    assert cid != hashlib.sha256(b"known plaintext").digest()
    # the plaintext does not appear in any pack
    for pack in (tmp_path / "r" / "packs").rglob("*.pack"):
        assert b"known plaintext" not in pack.read_bytes()


def test_wrong_and_missing_passphrase(tmp_path: Path) -> None:
    Repository.create(tmp_path / "r", encryption="aes-256-gcm", passphrase="right")
    with pytest.raises(WrongPassphrase, match="wrong passphrase"):
        Repository.open(tmp_path / "r", passphrase="wrong")
    with pytest.raises(WrongPassphrase):
        Repository.open(tmp_path / "r", passphrase=None)


def test_bad_settings_rejected(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        Repository.create(tmp_path / "a", block_size=3000)
    with pytest.raises(InvalidArgument):
        Repository.create(tmp_path / "b", compression="brotli")
    with pytest.raises(InvalidArgument):
        Repository.create(tmp_path / "c", encryption="aes-256-gcm", passphrase=None)
    with pytest.raises(NotFound):
        Repository.open(tmp_path / "nothing-here")
    Repository.create(tmp_path / "d")
    with pytest.raises(InvalidArgument):
        Repository.create(tmp_path / "d")


def test_single_writer_concurrent_readers(repo_dir: Path) -> None:
    with Repository.open(repo_dir, writable=True) as w:
        cid = w.put(Kind.FILE, b"data" * 100).chunk_id
        w.flush()
        with pytest.raises(Locked, match="busy"):
            Repository.open(repo_dir, writable=True)
        with Repository.open(repo_dir) as r:
            assert r.get(cid) == b"data" * 100
            with pytest.raises(ReadOnly):
                r.put(Kind.FILE, b"nope")
    # lock released on close
    Repository.open(repo_dir, writable=True).close()


def test_flipped_byte_is_an_error_not_wrong_data(repo_dir: Path) -> None:
    data = os.urandom(50_000)
    with Repository.open(repo_dir, writable=True) as repo:
        cid = repo.put(Kind.FILE, data).chunk_id
        repo.flush()
        loc = repo.index.lookup(cid)
    assert loc is not None
    pack = next((repo_dir / "packs").rglob("*.pack"))
    with open(pack, "r+b") as fh:
        fh.seek(loc[1] + 100)
        b = fh.read(1)
        fh.seek(loc[1] + 100)
        fh.write(bytes([b[0] ^ 1]))
    with Repository.open(repo_dir) as repo, pytest.raises(ChunkCorrupt):
        repo.get(cid)


def test_missing_chunk(repo_dir: Path) -> None:
    with Repository.open(repo_dir) as repo, pytest.raises(ChunkMissing):
        repo.get(b"\x01" * 32)


def test_truncated_pack_is_an_error(repo_dir: Path) -> None:
    with Repository.open(repo_dir, writable=True) as repo:
        cid = repo.put(Kind.FILE, os.urandom(10_000)).chunk_id
        repo.flush()
    pack = next((repo_dir / "packs").rglob("*.pack"))
    os.truncate(pack, 100)
    with Repository.open(repo_dir) as repo, pytest.raises(ChunkCorrupt):
        repo.get(cid)
