"""FUSE-mount benchmark: read the backed-up disk image through ``appliance``/borg/restic mounts.

    .venv/bin/python -m bench.mount_bench [--size-gib N] [--json FILE] [--only ours,borg,restic]
                                          [--drop-caches]

In one run, for each tool in turn (never two at once, so no two measurements share the cores):

1. back up ``disk-v1.img`` of the seeded dataset (``bench.dataset``, generated if missing) into
   a fresh repository, with the same init/backup commands as ``python -m bench``
   (``bench.tools``: ours ``backup image --source vm1 --mode full``, borg ``-e none`` with
   ``--compression zstd,3``, restic repository v2);
2. mount it (ours ``appliance mount`` -> ``MNT/vm1/latest/disk0.img``; ``borg mount R::v1``;
   ``restic mount`` in the foreground -> ``MNT/snapshots/latest/disk-v1.img``);
3. sequential read of the whole image in 1 MiB reads, cold (fresh mount, page cache dropped
   when ``--drop-caches``) then warm (same mount, second pass), comparing sampled 1 MiB
   blocks with the source image;
4. unmount, drop the page cache, mount again (so the FUSE server's own caches are cold too)
   and do seeded random 4 KiB-aligned ``os.pread``s for a fixed time with readahead disabled
   (``POSIX_FADV_RANDOM``: every read is one 4 KiB FUSE request), comparing sampled blocks with
   the source image; then unmount.

Every read through a mount runs in a child process of this module (``--worker``) under a
timeout, so a hung FUSE server cannot hang the harness: on timeout the child is killed and the
mount is detached.  Mounts are always unmounted (umount command, then ``fusermount3 -u -z``)
and the repositories deleted, even on failure.  Work files live under ``<workdir>/mount-*``
so a concurrent ``python -m bench`` (which owns ``<workdir>/repos``) is not disturbed.
MB = 10^6 bytes.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.cli import normalise_tool_args
from bench.dataset import GIB, MIB, STAMP_NAME, Dataset, DatasetSpec, ensure_dataset
from bench.measure import dir_bytes, drop_caches, run_measured
from bench.tools import Borg, Kind, Ours, Restic, Tool, probe_ours, probe_program

REPO_ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("ours", "borg", "restic")
MB = 1_000_000
SEQ_BLOCK = MIB
RAND_BLOCK = 4096
SEQ_SAMPLES = 32  # 1 MiB blocks of each sequential pass compared with the source
RAND_SAMPLE_EVERY = 50  # every Nth random read (plus the first 32) compared with the source
TARGET_SEQ_VS_BORG = 3.0
MOUNT_READY_TIMEOUT_S = 120.0
UNMOUNT_TIMEOUT_S = 60.0
# borg exits 1 for warnings (e.g. a file changed while read); the archive is still complete.
OK_CODES = {"ours": {0}, "borg": {0, 1}, "restic": {0}}


# ---------------------------------------------------------------------------------------------
# Worker: runs in a child process, touches the mount, prints one JSON object on stdout.
# ---------------------------------------------------------------------------------------------


def _compare(source: Path, samples: Sequence[tuple[int, bytes]]) -> list[int]:
    """Offsets of the sampled blocks whose bytes differ from the source image."""
    bad: list[int] = []
    fd = os.open(source, os.O_RDONLY)
    try:
        for offset, data in samples:
            if os.pread(fd, len(data), offset) != data:
                bad.append(offset)
    finally:
        os.close(fd)
    return bad


def _worker_stat(path: Path) -> dict[str, object]:
    return {"size": os.stat(path).st_size}


def _worker_seq(path: Path, source: Path) -> dict[str, object]:
    """Read ``path`` start to end in 1 MiB reads; keep ~32 blocks to compare afterwards."""
    size = os.stat(path).st_size
    stride = max(1, size // SEQ_BLOCK // SEQ_SAMPLES)
    last_block = max(0, (size - 1) // SEQ_BLOCK)
    buf = bytearray(SEQ_BLOCK)
    view = memoryview(buf)
    samples: list[tuple[int, bytes]] = []
    total = 0
    index = 0
    with open(path, "rb", buffering=0) as fh:
        t0 = time.perf_counter()
        while True:
            n = fh.readinto(view)
            if not n:
                break
            if index % stride == 0 or index == last_block:
                samples.append((total, bytes(view[:n])))
            total += n
            index += 1
        seconds = time.perf_counter() - t0
    return {
        "bytes": total,
        "expected_bytes": size,
        "seconds": seconds,
        "checked_blocks": len(samples),
        "mismatches": _compare(source, samples),
    }


def _worker_rand(path: Path, source: Path, seed: int, seconds: float) -> dict[str, object]:
    """Seeded random 4 KiB-aligned preads for ``seconds``; readahead off (one request each)."""
    size = os.stat(path).st_size
    blocks = size // RAND_BLOCK
    rng = random.Random(seed)
    latencies = array.array("d")
    samples: list[tuple[int, bytes]] = []
    short_reads = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        t0 = time.perf_counter()
        end = t0 + seconds
        now = t0
        n = 0
        while now < end:
            offset = rng.randrange(blocks) * RAND_BLOCK
            data = os.pread(fd, RAND_BLOCK, offset)
            after = time.perf_counter()
            latencies.append(after - now)
            now = after
            if len(data) != RAND_BLOCK:
                short_reads += 1
            if n < 32 or n % RAND_SAMPLE_EVERY == 0:
                samples.append((offset, data))
            n += 1
        elapsed = now - t0
    finally:
        os.close(fd)
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else 0.0

    return {
        "reads": n,
        "seconds": elapsed,
        "short_reads": short_reads,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": ordered[-1] * 1000 if ordered else 0.0,
        "checked_blocks": len(samples),
        "mismatches": _compare(source, samples),
    }


def _worker_main(argv: Sequence[str]) -> int:
    op, *rest = argv
    try:
        if op == "stat":
            out = _worker_stat(Path(rest[0]))
        elif op == "seq":
            out = _worker_seq(Path(rest[0]), Path(rest[1]))
        elif op == "rand":
            out = _worker_rand(Path(rest[0]), Path(rest[1]), int(rest[2]), float(rest[3]))
        else:
            raise ValueError(f"unknown worker op {op!r}")
    except OSError as exc:
        out = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(out), flush=True)
    return 0


class WorkerError(RuntimeError):
    """A worker child failed, timed out or reported an error."""


def run_worker(args: Sequence[str], timeout_s: float) -> dict[str, object]:
    """Run one ``--worker`` child; SIGKILL it (FUSE waits are killable) after ``timeout_s``."""
    argv = [sys.executable, "-m", "bench.mount_bench", "--worker", *args]
    try:
        proc = subprocess.run(
            argv,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise WorkerError(f"worker {args[0]} timed out after {timeout_s:.0f} s") from exc
    try:
        out: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        tail = proc.stderr.strip()[-300:]
        raise WorkerError(f"worker {args[0]} exited {proc.returncode}: {tail}") from exc
    if "error" in out:
        raise WorkerError(f"worker {args[0]}: {out['error']}")
    return out


# ---------------------------------------------------------------------------------------------
# Mounting
# ---------------------------------------------------------------------------------------------


def is_mounted(mnt: Path) -> bool:
    """Whether ``mnt`` is a mount point, from /proc (never touches the possibly hung mount)."""
    target = str(mnt)
    with open("/proc/self/mounts") as fh:
        for line in fh:
            fields = line.split()
            if len(fields) > 1 and fields[1].replace("\\040", " ") == target:
                return True
    return False


@dataclass(slots=True)
class MountSpec:
    """How one tool family mounts a repository and where the image appears in the mount."""

    family: str
    tool: Tool
    image_name: str
    binary: Path = Path("appliance")

    @property
    def foreground(self) -> bool:
        return self.family == "restic"  # restic mount has no daemon mode

    def mount_argv(self, repo: Path, mnt: Path, log: Path) -> list[str]:
        if self.family == "ours":
            return [
                str(self.binary),
                "--repo",
                str(repo),
                "mount",
                "--log-file",
                str(log),
                str(mnt),
            ]
        if self.family == "borg":
            return ["borg", "mount", f"{repo}::v1", str(mnt)]
        return ["restic", "-r", str(repo), "mount", str(mnt)]

    def umount_argv(self, repo: Path, mnt: Path) -> list[str] | None:
        if self.family == "ours":
            return [str(self.binary), "--repo", str(repo), "umount", str(mnt)]
        if self.family == "borg":
            return ["borg", "umount", str(mnt)]
        return None  # SIGINT to the foreground process

    def image_path(self, mnt: Path) -> Path:
        if self.family == "ours":
            return mnt / "vm1" / "latest" / "disk0.img"
        if self.family == "borg":
            return mnt / self.image_name
        # A relative backup path sits at the top of the snapshot directory.
        return mnt / "snapshots" / "latest" / self.image_name


@dataclass(slots=True)
class Mounted:
    """A live mount: the image file inside it and the foreground server, if any."""

    path: Path
    proc: subprocess.Popen[bytes] | None = None
    mount_s: float = 0.0


@contextlib.contextmanager
def mounted(spec: MountSpec, repo: Path, mnt: Path, logs: Path, size: int) -> Iterator[Mounted]:
    """Mount, wait (bounded) until the image is visible with the right size, always unmount."""
    mnt.mkdir(parents=True, exist_ok=True)
    if is_mounted(mnt):
        force_unmount(mnt)
    log = logs / f"mount-{spec.family}.log"
    env = spec.tool.env()
    argv = spec.mount_argv(repo, mnt, logs / f"mount-{spec.family}-daemon.log")
    proc: subprocess.Popen[bytes] | None = None
    t0 = time.perf_counter()
    try:
        if spec.foreground:
            with log.open("ab") as fh:
                fh.write(("$ " + " ".join(argv) + "\n").encode())
                fh.flush()
                proc = subprocess.Popen(
                    argv,
                    cwd=repo.parent,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        else:
            usage = run_measured(
                argv, cwd=repo.parent, env=env, log_path=log, timeout_s=MOUNT_READY_TIMEOUT_S
            )
            if usage.returncode != 0 or usage.timed_out:
                raise WorkerError(f"{' '.join(argv[:4])} exited {usage.returncode}, see {log}")
        path = spec.image_path(mnt)
        deadline = time.monotonic() + MOUNT_READY_TIMEOUT_S
        last_error = ""
        while True:
            if proc is not None and proc.poll() is not None:
                raise WorkerError(f"mount process exited {proc.returncode}, see {log}")
            if is_mounted(mnt):
                try:
                    got = run_worker(["stat", str(path)], timeout_s=30)["size"]
                    if got == size:
                        break
                    last_error = f"{path} has {got} bytes, expected {size}"
                except WorkerError as exc:
                    last_error = str(exc)
            if time.monotonic() > deadline:
                raise WorkerError(
                    f"{path} not ready after {MOUNT_READY_TIMEOUT_S:.0f} s: {last_error}"
                )
            time.sleep(0.3)
        yield Mounted(path, proc, time.perf_counter() - t0)
    finally:
        unmount(spec, repo, mnt, proc, log)


def force_unmount(mnt: Path) -> None:
    """Lazy-detach a mount whose server does not respond."""
    with contextlib.suppress(subprocess.TimeoutExpired, OSError):
        subprocess.run(
            ["fusermount3", "-u", "-z", str(mnt)],
            capture_output=True,
            timeout=30,
            check=False,
        )


def unmount(
    spec: MountSpec,
    repo: Path,
    mnt: Path,
    proc: subprocess.Popen[bytes] | None,
    log: Path,
) -> None:
    """Unmount with the tool's own command (or SIGINT), then fall back to a lazy detach."""
    argv = spec.umount_argv(repo, mnt)
    if argv is not None and is_mounted(mnt):
        with contextlib.suppress(OSError):
            run_measured(
                argv,
                cwd=repo.parent,
                env=spec.tool.env(),
                log_path=log,
                timeout_s=UNMOUNT_TIMEOUT_S,
            )
    if proc is not None and proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=UNMOUNT_TIMEOUT_S / 2)
    deadline = time.monotonic() + 10
    while is_mounted(mnt) and time.monotonic() < deadline:
        time.sleep(0.2)
    if is_mounted(mnt):
        print(f"  [{spec.family}] mount still present, detaching with fusermount3 -u -z")
        force_unmount(mnt)
    if proc is not None and proc.poll() is None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


# ---------------------------------------------------------------------------------------------
# Harness
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class MountResult:
    """Everything measured for one tool; a missing number is None."""

    tool: str
    ok: bool = False
    backup_s: float | None = None
    repo_bytes: int = 0
    mount_s: float | None = None
    seq_cold_mb_s: float | None = None
    seq_warm_mb_s: float | None = None
    rand_reads_s: float | None = None
    rand_reads: int = 0
    rand_p50_ms: float | None = None
    rand_p99_ms: float | None = None
    checked_blocks: int = 0
    mismatches: int = 0
    error: str = ""
    raw: dict[str, object] = field(default_factory=dict)

    @property
    def verified(self) -> bool | None:
        if self.checked_blocks == 0:
            return None
        return self.mismatches == 0


class Bench:
    """Runs backup + mount + reads for one tool at a time and collects ``MountResult``s."""

    def __init__(self, args: argparse.Namespace, ds: Dataset, workdir: Path) -> None:
        self.args = args
        self.ds = ds
        self.repos = workdir / "mount-repos"
        self.mnts = workdir / "mount-mnt"
        self.logs = workdir / "logs"
        self.cache_mode = "not dropped (fresh mount only)"

    def prepare_cold(self) -> None:
        if not self.args.drop_caches:
            os.sync()
            return
        if drop_caches():
            self.cache_mode = "dropped before each cold read"
        else:
            self.cache_mode = "drop requested but not permitted (sync only)"

    def specs(self) -> tuple[list[MountSpec], dict[str, str]]:
        home = self.repos
        skipped: dict[str, str] = {}
        specs: list[MountSpec] = []
        name = self.ds.image_v1.name
        for family in FAMILIES:
            if family not in self.args.only:
                continue
            if family == "ours":
                why = probe_ours(self.args.appliance)
                tool: Tool = Ours("ours", "ours", home / ".home-ours", binary=self.args.appliance)
            elif family == "borg":
                why = probe_program("borg")
                tool = Borg("borg-zstd3", "borg", home / ".home-borg", compression="zstd,3")
            else:
                why = probe_program("restic")
                tool = Restic("restic", "restic", home / ".home-restic")
            if why or shutil.which("fusermount3") is None:
                skipped[family] = why or "fusermount3 not on PATH (apt-get install fuse3)"
                continue
            specs.append(MountSpec(family, tool, name, binary=self.args.appliance))
        return specs, skipped

    def backup(self, spec: MountSpec, repo: Path, res: MountResult) -> bool:
        tool = spec.tool
        tool.home.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"mount-{spec.family}-backup.log"
        for cmd in tool.init(repo):
            usage = run_measured(cmd.argv, cwd=cmd.cwd, env=tool.env(), log_path=log, timeout_s=300)
            if usage.returncode != 0 or usage.timed_out:
                res.error = f"init exited {usage.returncode}, see {log}"
                return False
        os.sync()
        cmd = tool.backup(repo, Kind.IMAGE, self.ds.image_v1, 1)
        usage = run_measured(
            cmd.argv, cwd=cmd.cwd, env=tool.env(), log_path=log, timeout_s=self.args.timeout_s
        )
        if usage.returncode not in OK_CODES[spec.family] or usage.timed_out:
            res.error = f"backup {'timed out' if usage.timed_out else 'failed'}, see {log}"
            return False
        res.backup_s = usage.wall_s
        res.repo_bytes = dir_bytes(repo)[0]
        return True

    def _account(self, res: MountResult, out: dict[str, object], key: str) -> None:
        res.raw[key] = out
        res.checked_blocks += int(out["checked_blocks"])  # type: ignore[call-overload]
        mism = out["mismatches"]
        res.mismatches += len(mism) if isinstance(mism, list) else 0

    def run_one(self, spec: MountSpec) -> MountResult:
        res = MountResult(spec.family)
        repo = self.repos / spec.family
        mnt = self.mnts / spec.family
        size = self.ds.spec.image_bytes
        src = str(self.ds.image_v1)
        seq_timeout = self.args.timeout_s
        try:
            print(f"  [{spec.family}] init + backup {size / MB:.0f} MB ...", flush=True)
            if not self.backup(spec, repo, res):
                return res
            print(
                f"  [{spec.family}] backup {res.backup_s:.1f} s, repo {res.repo_bytes / MB:.0f} MB",
                flush=True,
            )
            with mounted(spec, repo, mnt, self.logs, size) as m:
                res.mount_s = m.mount_s
                self.prepare_cold()
                for key in ("seq_cold", "seq_warm"):
                    out = run_worker(["seq", str(m.path), src], timeout_s=seq_timeout)
                    if out["bytes"] != size:
                        raise WorkerError(f"{key}: read {out['bytes']} bytes, expected {size}")
                    mb_s = size / MB / float(out["seconds"])  # type: ignore[arg-type]
                    setattr(res, f"{key}_mb_s", mb_s)
                    self._account(res, out, key)
                    print(f"  [{spec.family}] {key:<9} {mb_s:8.1f} MB/s", flush=True)
            # Fresh mount and cold page cache: the server's own caches are cold as well.
            with mounted(spec, repo, mnt, self.logs, size) as m:
                self.prepare_cold()
                out = run_worker(
                    ["rand", str(m.path), src, str(self.args.seed), str(self.args.rand_seconds)],
                    timeout_s=self.args.rand_seconds + 120,
                )
                res.rand_reads = int(out["reads"])  # type: ignore[call-overload]
                res.rand_reads_s = res.rand_reads / float(out["seconds"])  # type: ignore[arg-type]
                res.rand_p50_ms = float(out["p50_ms"])  # type: ignore[arg-type]
                res.rand_p99_ms = float(out["p99_ms"])  # type: ignore[arg-type]
                self._account(res, out, "rand")
                if out["short_reads"]:
                    raise WorkerError(f"{out['short_reads']} short random reads")
                print(
                    f"  [{spec.family}] rand 4K  {res.rand_reads_s:8.0f} reads/s "
                    f"(p50 {res.rand_p50_ms:.2f} ms, p99 {res.rand_p99_ms:.2f} ms)",
                    flush=True,
                )
            res.ok = res.mismatches == 0
            if res.mismatches:
                res.error = f"{res.mismatches} block(s) differ from the source image"
            print(
                f"  [{spec.family}] {res.checked_blocks} sampled blocks compared with the source: "
                + ("all equal" if res.mismatches == 0 else f"{res.mismatches} MISMATCH"),
                flush=True,
            )
        except (WorkerError, OSError) as exc:
            res.error = str(exc)
            print(f"  [{spec.family}] FAILED: {exc}", flush=True)
        finally:
            shutil.rmtree(repo, ignore_errors=True)
            shutil.rmtree(spec.tool.home, ignore_errors=True)
        return res


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def format_results(results: Sequence[MountResult]) -> str:
    header = [
        "tool",
        "seq cold MB/s",
        "seq warm MB/s",
        "rand 4K reads/s",
        "p50 ms",
        "p99 ms",
        "backup s",
        "repo MB",
        "check",
    ]
    lines = [header]
    for r in results:
        check = {None: "-", True: f"{r.checked_blocks} blocks ok", False: "MISMATCH"}[r.verified]
        if r.error:
            check = f"FAILED: {r.error[:70]}"
        lines.append(
            [
                r.tool,
                _num(r.seq_cold_mb_s, ".1f"),
                _num(r.seq_warm_mb_s, ".1f"),
                _num(r.rand_reads_s, ".0f"),
                _num(r.rand_p50_ms, ".2f"),
                _num(r.rand_p99_ms, ".2f"),
                _num(r.backup_s, ".1f"),
                f"{r.repo_bytes / MB:.0f}" if r.repo_bytes else "-",
                check,
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        cells = [
            c.ljust(widths[i]) if i in (0, len(line) - 1) else c.rjust(widths[i])
            for i, c in enumerate(line)
        ]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


METRICS = (
    ("seq cold MB/s", "seq_cold_mb_s"),
    ("seq warm MB/s", "seq_warm_mb_s"),
    ("rand 4K reads/s", "rand_reads_s"),
)


def compute_ratios(results: Sequence[MountResult]) -> dict[str, dict[str, float | None]]:
    by = {r.tool: r for r in results if r.ok}
    ours = by.get("ours")
    out: dict[str, dict[str, float | None]] = {}
    for label, attr in METRICS:
        mine = getattr(ours, attr) if ours else None
        out[label] = {
            f"ours/{other}": _ratio(mine, getattr(by[other], attr) if other in by else None)
            for other in ("borg", "restic")
        }
    return out


def format_ratios(ratios: dict[str, dict[str, float | None]]) -> str:
    lines = ["  metric            ours/borg  ours/restic"]
    for label, vals in ratios.items():
        cells = [f"{v:.2f}x" if v is not None else "n/a" for v in vals.values()]
        lines.append(f"  {label:<16} {cells[0]:>10} {cells[1]:>12}")
    return "\n".join(lines)


def compute_target(results: Sequence[MountResult]) -> dict[str, object]:
    """The issue's target: our mount's (cold) sequential read >= 3x borg mount's."""
    by = {r.tool: r for r in results if r.ok}
    name = f"mount sequential read >= {TARGET_SEQ_VS_BORG:.0f}x borg mount (cold)"
    if "ours" not in by or "borg" not in by:
        return {"target": name, "ok": None, "detail": "not measured"}
    ours, borg = by["ours"], by["borg"]
    cold = _ratio(ours.seq_cold_mb_s, borg.seq_cold_mb_s) or 0.0
    warm = _ratio(ours.seq_warm_mb_s, borg.seq_warm_mb_s) or 0.0
    return {
        "target": name,
        "ok": cold >= TARGET_SEQ_VS_BORG,
        "ratio_cold": cold,
        "ratio_warm": warm,
        "detail": f"cold {ours.seq_cold_mb_s:.1f} vs {borg.seq_cold_mb_s:.1f} MB/s = {cold:.2f}x"
        f" (warm {ours.seq_warm_mb_s:.1f} vs {borg.seq_warm_mb_s:.1f} MB/s = {warm:.2f}x)",
    }


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.mount_bench", description=__doc__.splitlines()[0]
    )
    p.add_argument("--size-gib", type=float, default=2.0, help="disk image size (default 2)")
    p.add_argument(
        "--tree-mib",
        type=float,
        default=1024.0,
        help="file tree size of the dataset (default 1024; only to match python -m bench's)",
    )
    p.add_argument("--seed", type=int, default=1, help="dataset and random-read seed (default 1)")
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="ours|borg|restic",
        help="run only these tools (repeat or comma-separate)",
    )
    p.add_argument(
        "--drop-caches",
        action="store_true",
        help="sync and drop the page cache before each cold read (root); default: fresh mount only",
    )
    p.add_argument(
        "--rand-seconds", type=float, default=10.0, help="random-read duration (default 10)"
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="write all numbers to FILE")
    p.add_argument(
        "--workdir",
        type=Path,
        default=REPO_ROOT / "var" / "bench",
        help="work directory (default var/bench; the dataset is <workdir>/data)",
    )
    p.add_argument(
        "--regenerate",
        action="store_true",
        help="allow replacing an existing dataset generated with other parameters",
    )
    p.add_argument(
        "--appliance",
        type=Path,
        default=REPO_ROOT / ".venv" / "bin" / "appliance",
        help="our CLI (default .venv/bin/appliance)",
    )
    p.add_argument(
        "--timeout-s", type=float, default=1800.0, help="timeout of a backup or a sequential pass"
    )
    return normalise_tool_args(p, p.parse_args(argv))


def _stamp_conflict(data: Path, spec: DatasetSpec) -> str | None:
    """Why reusing ``data`` would regenerate (and so delete) someone's other dataset, if so."""
    try:
        raw = json.loads((data / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None
    if raw.get("spec") != asdict(spec):
        return f"{data} holds a dataset with spec {raw.get('spec')}, this run wants {asdict(spec)}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return _worker_main(argv[1:])
    args = parse_args(argv)
    workdir: Path = args.workdir.resolve()
    data = workdir / "data"
    spec = DatasetSpec(
        seed=args.seed,
        image_bytes=int(args.size_gib * GIB) // 65536 * 65536,
        tree_bytes=int(args.tree_mib * MIB),
    )
    conflict = _stamp_conflict(data, spec)
    if conflict and not args.regenerate:
        print(f"mount-bench: {conflict}; use --workdir elsewhere or --regenerate", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    data.mkdir(parents=True, exist_ok=True)
    ds, generated = ensure_dataset(data, spec)
    print(
        f"mount-bench: image {ds.image_v1} ({spec.image_bytes / MB:.1f} MB, "
        f"{'generated' if generated else 'reused'})",
        flush=True,
    )
    bench = Bench(args, ds, workdir)
    bench.logs.mkdir(parents=True, exist_ok=True)
    for d in (bench.repos, bench.mnts):
        if d.exists():
            for sub in d.iterdir():
                if is_mounted(sub):
                    force_unmount(sub)
            shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    specs, skipped = bench.specs()
    for family, why in skipped.items():
        print(f"mount-bench: SKIPPING {family}: {why}", flush=True)
    results: list[MountResult] = []
    try:
        for s in specs:
            results.append(bench.run_one(s))
    finally:
        for sub in bench.mnts.iterdir() if bench.mnts.exists() else ():
            if is_mounted(sub):
                force_unmount(sub)
        shutil.rmtree(bench.repos, ignore_errors=True)
        shutil.rmtree(bench.mnts, ignore_errors=True)

    ratios = compute_ratios(results)
    target = compute_target(results)
    print()
    print(
        f"Mount reads of {spec.image_bytes / MB:.0f} MB image (MB = 10^6 B; page cache: "
        f"{bench.cache_mode}; random reads: {args.rand_seconds:.0f} s, 4 KiB, readahead off, "
        "fresh mount)"
    )
    print(format_results(results))
    print()
    print("Ratios")
    print(format_ratios(ratios))
    print()
    mark = {True: "✓", False: "✗", None: "?"}[target["ok"]]  # type: ignore[index]
    print(f"Target\n  {mark}  {target['target']}  {target['detail']}")
    print(f"\nmount-bench: total {time.perf_counter() - t0:.0f} s")
    if args.json:
        doc = {
            "image": {"path": str(ds.image_v1), "bytes": spec.image_bytes, "seed": spec.seed},
            "page_cache": bench.cache_mode,
            "rand_seconds": args.rand_seconds,
            "skipped": skipped,
            "results": [asdict(r) | {"verified": r.verified} for r in results],
            "ratios": ratios,
            "target": target,
            "host": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"mount-bench: wrote {args.json}")
    return 0 if results and all(r.ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
