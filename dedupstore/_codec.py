"""Chunk codecs (compression) and the chunk envelope (encryption), as pure functions.

Owns the transformation plaintext <-> stored payload. Pure and thread-safe: workers call
`seal` and `open_payload` concurrently. Knows nothing of packs or the index.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import zlib
from dataclasses import dataclass, field

import blake3
import lzo
import pyzstd
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import ChunkCorrupt, InvalidArgument
from .formats import ChunkId, Codec, Kind

NONCE_BYTES = 12
TAG_BYTES = 16

CODEC_NAMES = {"none": Codec.NONE, "zstd": Codec.ZSTD, "lzo": Codec.LZO, "gzip": Codec.GZIP}
DEFAULT_LEVELS = {Codec.ZSTD: 3, Codec.LZO: 1, Codec.GZIP: 6, Codec.NONE: 0}


def parse_compression(spec: str) -> tuple[Codec, int]:
    """'zstd', 'zstd,3', 'lzo', 'gzip,6', 'none' -> (codec, level)."""
    name, _, level_s = spec.partition(",")
    codec = CODEC_NAMES.get(name.strip().lower())
    if codec is None:
        raise InvalidArgument(f"unknown compression {spec!r} (zstd, lzo, gzip, none)")
    if not level_s:
        return codec, DEFAULT_LEVELS[codec]
    try:
        level = int(level_s)
    except ValueError:
        raise InvalidArgument(f"bad compression level in {spec!r}") from None
    limits = {Codec.ZSTD: (-5, 22), Codec.LZO: (1, 9), Codec.GZIP: (1, 9), Codec.NONE: (0, 0)}
    lo, hi = limits[codec]
    if not lo <= level <= hi:
        raise InvalidArgument(f"compression level for {name} must be in {lo}..{hi}")
    return codec, level


def compress(codec: Codec, level: int, data: bytes) -> tuple[Codec, bytes]:
    """Compress; fall back to NONE when that is not smaller (random data, tiny chunks)."""
    if codec is Codec.NONE or len(data) < 64:
        return Codec.NONE, data
    if codec is Codec.ZSTD:
        out = pyzstd.compress(data, level)
    elif codec is Codec.LZO:
        out = lzo.compress(data, level, False)
    else:
        out = zlib.compress(data, level)
    if len(out) >= len(data):
        return Codec.NONE, data
    return codec, out


def decompress(codec: int, data: bytes, raw_len: int) -> bytes:
    """Inverse of `compress`; a wrong result length or a codec failure is ChunkCorrupt."""
    try:
        if codec == Codec.NONE:
            out = data
        elif codec == Codec.ZSTD:
            out = pyzstd.decompress(data)
        elif codec == Codec.LZO:
            out = lzo.decompress(data, False, raw_len)
        elif codec == Codec.GZIP:
            out = zlib.decompress(data)
        else:
            raise ChunkCorrupt(f"unknown codec {codec}")
    except ChunkCorrupt:
        raise
    except Exception as exc:  # each codec library raises its own error types on garbage
        raise ChunkCorrupt(f"cannot decompress ({Codec(codec).name}): {exc}") from exc
    if len(out) != raw_len:
        raise ChunkCorrupt(f"decompressed {len(out)} bytes, expected {raw_len}")
    return bytes(out)


@dataclass(frozen=True, slots=True)
class Keys:
    """Secret material of an encrypted repository (None for a plain one). Never printed."""

    enc_key: bytes = field(repr=False)  # AES-256-GCM key for chunk payloads
    id_key: bytes = field(repr=False)  # HMAC / keyed-BLAKE3 key for chunk ids
    repo_id: str = ""  # the repository they belong to ("" when not known)

    @property
    def secret(self) -> bytes:
        """The 64-byte master secret (what a key slot wraps)."""
        return self.enc_key + self.id_key

    def subkey(self, purpose: str) -> bytes:
        """A 32-byte key for one purpose (files cache, overlays), derived so that no two uses
        share a key: HMAC-SHA256 of the purpose, keyed with the id key for names ("... mac")
        and with the data key for everything that encrypts."""
        base = self.id_key if purpose.endswith(" mac") else self.enc_key
        return hmac.digest(base, b"dr-appliance subkey " + purpose.encode(), "sha256")


class ChunkCodec:
    """Turns plaintext into (id, codec, stored payload) and back, for one repository.

    Immutable after construction; every method is thread-safe and releases the GIL in the
    heavy parts (hashing, zstd, AES-GCM), so two worker threads use both cores.
    """

    def __init__(self, hash_name: str, codec: Codec, level: int, keys: Keys | None) -> None:
        if hash_name not in ("sha256", "blake3"):
            raise InvalidArgument(f"unknown hash {hash_name!r} (sha256, blake3)")
        self.hash_name = hash_name
        self.codec = codec
        self.level = level
        self.keys = keys
        self._aead = AESGCM(keys.enc_key) if keys else None

    def chunk_id(self, data: bytes | memoryview) -> ChunkId:
        if self.keys is None:
            if self.hash_name == "sha256":
                return ChunkId(hashlib.sha256(data).digest())
            return ChunkId(blake3.blake3(data, max_threads=1).digest())
        if self.hash_name == "sha256":
            return ChunkId(hmac.digest(self.keys.id_key, data, "sha256"))
        return ChunkId(blake3.blake3(data, key=self.keys.id_key).digest())

    def seal(self, kind: Kind, chunk_id: ChunkId, data: bytes) -> tuple[Codec, bytes]:
        """Compress (when it helps) then encrypt (when keyed) one chunk."""
        codec, body = compress(self.codec, self.level, data)
        if self._aead is None:
            return codec, body
        nonce = os.urandom(NONCE_BYTES)
        aad = bytes((kind, codec)) + chunk_id
        return codec, nonce + self._aead.encrypt(nonce, body, aad)

    def open_payload(
        self, kind: int, codec: int, chunk_id: bytes, payload: bytes, raw_len: int
    ) -> bytes:
        """Decrypt and decompress; any tampering or damage raises ChunkCorrupt."""
        body = payload
        if self._aead is not None:
            if len(payload) < NONCE_BYTES + TAG_BYTES:
                raise ChunkCorrupt("payload shorter than nonce + tag")
            aad = bytes((kind, codec)) + chunk_id
            try:
                body = self._aead.decrypt(payload[:NONCE_BYTES], payload[NONCE_BYTES:], aad)
            except InvalidTag:
                raise ChunkCorrupt("authentication failed (damaged or tampered chunk)") from None
        return decompress(codec, body, raw_len)
