"""Instant-recovery benchmark (run by hand, prints a table; not a test).

    .venv/bin/python bench/boot_bench.py [--runs 3] [--size-mib 512] [--keep DIR]

Measures, on a fresh repository in a temporary directory:

1. boot: seconds from starting `appliance boot vm1@latest` to the guest's `M BOOTED` / `M DONE`
   serial markers, against booting the same raw file directly in QEMU with the same settings
   (TCG, 512 MiB, virtio). Target: ratio <= 1.2.
2. sequential: `nbdcopy` of a large image export (mixed data, backed up into the store) to
   `null:`, from the store's nbdkit export vs `qemu-nbd` serving the raw file.
3. random 4 KiB reads/s through NBD (libnbd, queue depth 1 and 16), store vs qemu-nbd.

Owns nothing but this script: it drives the CLI and public APIs, and stops every process it
started by PID. It must not be imported by the product or by the other bench/ modules.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dedupstore import Repository, backup_image  # noqa: E402
from nbd import NbdServer  # noqa: E402

APPLIANCE = [sys.executable, "-c", "from appliance.cli import main; main()"]
MARKER = "BENCH"
QEMU = "qemu-system-x86_64"

# Random reads run under Debian's python3 with python3-libnbd (-I: no cwd, so the project's
# own `nbd` package cannot shadow libnbd's).
_RANDREAD = r"""
import random, sys, time, nbd
uri, depth, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
h = nbd.NBD(); h.connect_uri(uri)
size = h.get_size(); blocks = size // 4096
rng = random.Random(1)
n = 0
end = time.monotonic() + seconds
if depth == 1:
    buf = bytearray(4096)
    while time.monotonic() < end:
        h.pread(4096, rng.randrange(blocks) * 4096); n += 1
else:
    bufs = [nbd.Buffer(4096) for _ in range(depth)]
    inflight = 0; i = 0
    while time.monotonic() < end:
        while inflight < depth:
            h.aio_pread(bufs[i % depth], rng.randrange(blocks) * 4096); inflight += 1; i += 1
        h.poll(-1)
        done = 0
        while True:
            c = h.aio_peek_command_completed()
            if not c: break
            h.aio_command_completed(c); done += 1
        inflight -= done; n += done
print(n / seconds)
"""


def log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def wait_marker(path: Path, marker: str, start: float, timeout_s: float = 120) -> float:
    while True:
        with contextlib.suppress(FileNotFoundError):
            if marker in path.read_text(errors="replace"):
                return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"no {marker!r} in {path}")
        time.sleep(0.02)


def stop_pid(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cli(repo: Path, *args: str) -> str:
    env = dict(os.environ, APPLIANCE_REPO=str(repo))
    return subprocess.run([*APPLIANCE, *args], env=env, check=True, capture_output=True,
                          text=True).stdout  # fmt: skip


def boot_direct(disk: Path, serial: Path) -> tuple[float, float]:
    serial.write_bytes(b"")
    start = time.monotonic()
    proc = subprocess.Popen(
        [QEMU, "-accel", "tcg", "-m", "512M", "-smp", "1", "-display", "none", "-nic", "none",
         "-serial", f"file:{serial}",
         "-drive", f"file={disk},format=raw,if=virtio,cache=writeback"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        booted = wait_marker(serial, f"{MARKER} BOOTED", start)
        done = wait_marker(serial, f"{MARKER} DONE", start)
        proc.wait(30)
    finally:
        stop_pid(proc)
    return booted, done


def boot_appliance(repo: Path, serial: Path, name: str) -> tuple[float, float, float]:
    start = time.monotonic()
    cli(repo, "boot", "vm1@latest", "--name", name, "--serial", str(serial))
    returned = time.monotonic() - start
    try:
        booted = wait_marker(serial, f"{MARKER} BOOTED", start)
        done = wait_marker(serial, f"{MARKER} DONE", start)
    finally:
        cli(repo, "stop", name)
    return returned, booted, done


def make_image(path: Path, size_mib: int) -> None:
    """Mixed data per MiB: 1/4 random, 1/4 text-like, 1/2 zeros (a half-empty disk)."""
    text = (b"the quick brown fox jumps over the lazy dog %d\n" * 30000)[: 1 << 20]
    with path.open("wb") as f:
        for i in range(size_mib):
            kind = i % 4
            if kind == 0:
                f.write(os.urandom(1 << 20))
            elif kind == 1:
                f.write(text)
            else:
                f.seek(1 << 20, os.SEEK_CUR)
        f.truncate(size_mib << 20)


@contextlib.contextmanager
def qemu_nbd(image: Path) -> Iterator[str]:
    sock = image.with_suffix(".qemu-nbd.sock")
    proc = subprocess.Popen(["qemu-nbd", "-r", "-t", "-f", "raw", "-x", "img", "-k", str(sock),
                             "--cache=writeback", str(image)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        while not sock.exists():
            if proc.poll() is not None:
                raise RuntimeError("qemu-nbd failed")
            time.sleep(0.02)
        yield f"nbd+unix:///img?socket={sock}"
    finally:
        stop_pid(proc)


def nbdcopy_mbps(uri: str, size: int) -> float:
    start = time.monotonic()
    subprocess.run(["nbdcopy", uri, "null:"], check=True)
    return size / (time.monotonic() - start) / 1e6


def randread(uri: str, depth: int, seconds: float = 4.0) -> float:
    out = subprocess.run(["/usr/bin/python3", "-I", "-c", _RANDREAD, uri, str(depth),
                          str(seconds)], check=True, capture_output=True, text=True,
                         cwd="/")  # fmt: skip
    return float(out.stdout.strip())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--size-mib", type=int, default=512, help="large image for the NBD tests")
    p.add_argument("--keep", type=Path, help="work in DIR and keep it")
    args = p.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="boot-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, str]] = []
    try:
        repo = work / "repo"
        Repository.create(repo)
        disk = work / "disk.img"
        subprocess.run([sys.executable, "-m", "kernel", "testdisk", str(disk), "--marker", MARKER],
                       check=True, cwd=ROOT, capture_output=True)  # fmt: skip
        big = work / "big.img"
        make_image(big, args.size_mib)
        with Repository.open(repo, writable=True) as r:
            backup_image(r, [disk], source="vm1", mode="full")
            t = time.monotonic()
            backup_image(r, [big], source="big", mode="full")
            log(f"backed up {args.size_mib} MiB in {time.monotonic() - t:.1f} s")

        # 1. boot time. Warm both paths once (page cache, initramfs) before timing.
        boot_direct(disk, work / "warm.log")
        boot_appliance(repo, work / "warm2.log", "warm")
        direct, appl = [], []
        for i in range(args.runs):
            direct.append(boot_direct(disk, work / f"direct{i}.log"))
            appl.append(boot_appliance(repo, work / f"appl{i}.log", f"b{i}"))
            log(f"run {i}: direct {direct[-1]}, appliance {appl[-1]}")
        med = statistics.median
        d_boot, d_done = med(x[0] for x in direct), med(x[1] for x in direct)
        a_ret = med(x[0] for x in appl)
        a_boot, a_done = med(x[1] for x in appl), med(x[2] for x in appl)
        rows += [
            ("`appliance boot` returns", f"{a_ret:.2f} s", ""),
            ("to guest BOOTED: direct raw / appliance", f"{d_boot:.2f} s / {a_boot:.2f} s",
             f"ratio {a_boot / d_boot:.2f}"),
            ("to guest DONE: direct raw / appliance", f"{d_done:.2f} s / {a_done:.2f} s",
             f"ratio {a_done / d_done:.2f}"),
        ]  # fmt: skip

        # 2 + 3. NBD throughput: the store's export vs qemu-nbd on the raw file.
        size = args.size_mib << 20
        with NbdServer(repo, listen="127.0.0.1:0") as srv, qemu_nbd(big) as quri:
            suri = srv.uri("big@latest/disk0")
            for label, uri in (("store nbdkit", suri), ("qemu-nbd raw", quri)):
                nbdcopy_mbps(uri, size)  # warm
                mbps = med(nbdcopy_mbps(uri, size) for _ in range(args.runs))
                rows.append((f"nbdcopy {args.size_mib} MiB: {label}", f"{mbps:,.0f} MB/s", ""))
            for depth in (1, 16):
                for label, uri in (("store nbdkit", suri), ("qemu-nbd raw", quri)):
                    iops = randread(uri, depth)
                    rows.append((f"random 4 KiB reads, QD{depth}: {label}",
                                 f"{iops:,.0f} /s", f"{iops * 4096 / 1e6:.1f} MB/s"))
    finally:
        for s in json.loads(cli(work / "repo", "sessions", "--json") or "[]") if (
            work / "repo"
        ).exists() else []:
            with contextlib.suppress(subprocess.CalledProcessError):
                cli(work / "repo", "stop", s["name"])
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    w = max(len(r[0]) for r in rows)
    print(f"{'measure':<{w}}  {'value':>20}  note")
    for name, value, note in rows:
        print(f"{name:<{w}}  {value:>20}  {note}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
