"""Helpers shared by the test packages: images, byte flips, the CLI runner."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def make_image(path: Path, size_mib: int = 8, seed: int = 1) -> Path:
    """A mixed image: zero, text-like, random and duplicated regions (1 MiB each)."""
    rnd = random.Random(seed)
    words = [rnd.randbytes(rnd.randint(2, 8)).hex().encode() for _ in range(300)]
    base = b" ".join(rnd.choice(words) for _ in range(120_000))[: 1 << 20].ljust(1 << 20, b".")
    with open(path, "wb") as fh:
        for i in range(size_mib):
            k = i % 4
            if k == 0:
                fh.write(bytes(1 << 20))
            elif k == 1:
                fh.write(rnd.randbytes(1 << 20))
            elif k == 2:
                k = (i * 7919) % len(base)  # every region is a different rotation
                fh.write(base[k:] + base[:k])
            else:
                fh.write(b"DUPLICATE-REGION" * (1 << 16))
    return path


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0xFF]))


def run_cli(*args: str, env: dict[str, str] | None = None, check: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([str(BIN / "appliance"), *args], capture_output=True, text=True,
                          env=full_env, input=input, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"appliance {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc
