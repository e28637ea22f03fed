"""Helpers for NBD tests: test images, running client tools, libnbd scripts."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from testlib import sha256_file  # noqa: F401 (re-exported)

MiB = 1 << 20
IMAGE_BYTES = 16 * MiB
ZERO_START, ZERO_END = 4 * MiB, 9 * MiB
"""The test image is random except this all-zero region."""

# libnbd's Python binding is also called `nbd`: it cannot be imported next to our package, so
# tests that need libnbd's fine control run Debian's python3 in isolated mode (-I).
SYSTEM_PYTHON = "/usr/bin/python3"


def need(*tools: str) -> None:
    for t in tools:
        if shutil.which(t) is None:
            pytest.skip(f"{t} is not installed")


def make_image(path: Path, size: int = IMAGE_BYTES, seed: int = 7) -> bytes:
    rnd = random.Random(seed)
    data = bytearray(rnd.randbytes(size))
    data[ZERO_START:ZERO_END] = bytes(ZERO_END - ZERO_START)
    path.write_bytes(data)
    return bytes(data)


def run(cmd: list[str], *, check: bool = True, timeout: float = 60,
        input_: bytes | None = None) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                         input=None if input_ is None else input_.decode())
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} failed ({res.returncode}): {res.stderr}{res.stdout}")
    return res


def libnbd(uri: str, body: str, *, timeout: float = 60) -> Any:
    """Run `body` under Debian's python3 with `h` = a libnbd handle connected to `uri`.

    The body assigns `out` (JSON-serialisable); returns it. libnbd's strict mode is off so
    the tests can send requests a polite client never would.
    """
    code = (
        "import json, sys, nbd\n"
        "h = nbd.NBD()\n"
        "h.set_strict_mode(0)\n"
        "h.connect_uri(sys.argv[1])\n"
        "out = None\n"
        f"{body}\n"
        "print(json.dumps(out))\n"
    )
    res = subprocess.run([SYSTEM_PYTHON, "-I", "-c", code, uri], capture_output=True,
                         text=True, timeout=timeout)
    if res.returncode != 0:
        raise AssertionError(f"libnbd script failed: {res.stderr}")
    return json.loads(res.stdout)


@dataclass
class RepoImage:
    root: Path
    image: Path
    data: bytes
    point: str
    """SOURCE@ID of the point holding the image."""
