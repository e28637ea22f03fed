"""Helpers shared by the test packages: images, byte flips, the CLI runner."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
EXPECTED_ATTR = "_expected_by_test"


@contextlib.contextmanager
def assert_logs(pattern: str, level: int = logging.WARNING, count: int | None = None,
                logger: str = "") -> Iterator[list[logging.LogRecord]]:
    """Expect log records at `level` or worse matching `pattern` (regex) inside the block.

    Matching records are marked expected (the autouse check in conftest.py lets them pass);
    the block fails if none (or not exactly `count`) arrived.
    """
    seen: list[logging.LogRecord] = []
    rx = re.compile(pattern)

    class _Mark(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= level and rx.search(record.getMessage()):
                setattr(record, EXPECTED_ATTR, True)
                seen.append(record)

    handler = _Mark(logging.DEBUG)
    target = logging.getLogger(logger)
    target.addHandler(handler)
    try:
        yield seen
    finally:
        target.removeHandler(handler)
    if count is None:
        assert seen, f"expected a log record matching {pattern!r}"
    else:
        assert len(seen) == count, f"expected {count} records matching {pattern!r}, got {len(seen)}"


def sha256_file(path: Path | str) -> str:
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


STDERR_ALARM = re.compile(r"^(WARNING|ERROR|CRITICAL) |^Traceback ", re.MULTILINE)


def run_cli(*args: str, env: dict[str, str] | None = None, check: bool = True,
            input: str | None = None, timeout_s: float = 300,
            warnings_ok: bool = False) -> subprocess.CompletedProcess[str]:
    """`appliance ARGS` in a subprocess.

    With `check`, a non-zero exit fails, and so does a successful run that logged a WARNING,
    an ERROR or a traceback on stderr (unless `warnings_ok`): a stray warning is a bug report.
    """
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([str(BIN / "appliance"), *args], capture_output=True, text=True,
                          env=full_env, input=input, timeout=timeout_s)
    if check and proc.returncode != 0:
        raise AssertionError(f"appliance {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    if check and not warnings_ok and STDERR_ALARM.search(proc.stderr):
        raise AssertionError(f"appliance {' '.join(args)} succeeded but logged:\n{proc.stderr}")
    return proc
