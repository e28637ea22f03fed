"""`appliance bench`: this machine's single-core MB/s for the store's primitives."""

from __future__ import annotations

import hashlib
import os
import random
import time
import zlib
from collections.abc import Callable

import blake3
import lzo
import pyzstd
import xxhash
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

BLOCK = 64 * 1024


def _sample() -> bytes:
    rnd = random.Random(7)
    words = [
        bytes(rnd.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 9)))
        for _ in range(2000)
    ]
    text = b" ".join(rnd.choice(words) for _ in range(BLOCK // 4))[: BLOCK // 2]
    return text + os.urandom(BLOCK // 4) + bytes(BLOCK // 4)


def _rate(fn: Callable[[bytes], object], data: bytes, seconds: float = 0.3) -> float:
    n, start = 0, time.perf_counter()
    while True:
        fn(data)
        n += 1
        el = time.perf_counter() - start
        if el >= seconds:
            return n * len(data) / el / 1e6


def measure() -> dict[str, float]:
    data = _sample()
    z = pyzstd.compress(data, 3)
    aead = AESGCM(os.urandom(32))
    nonce = os.urandom(12)
    return {
        "sha256": _rate(lambda d: hashlib.sha256(d).digest(), data),
        "blake3": _rate(lambda d: blake3.blake3(d).digest(), data),
        "xxh3-128": _rate(xxhash.xxh3_128_digest, data),
        "crc32": _rate(zlib.crc32, data),
        "zstd-3 compress": _rate(lambda d: pyzstd.compress(d, 3), data),
        "zstd decompress": _rate(lambda _d: pyzstd.decompress(z), data),
        "lzo compress": _rate(lambda d: lzo.compress(d, 1, False), data),
        "gzip-6 compress": _rate(lambda d: zlib.compress(d, 6), data),
        "aes-256-gcm encrypt": _rate(lambda d: aead.encrypt(nonce, d, None), data),
    }
