"""``python -m bench``: generate the dataset, run every tool on it, print and save the results.

Owns the run order and the directory layout under the work directory (``var/bench``):
``data/`` (kept and reused), ``repos/`` (fresh per run, deleted unless ``--keep``),
``restore/`` (deleted after each verification) and ``logs/`` (each child's output).
Steps run strictly one after the other so no two measurements share the two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.dataset import (
    GIB,
    MIB,
    STAGED_IMAGE,
    STAGED_TREE,
    Dataset,
    DatasetSpec,
    ensure_dataset,
    file_sha256,
    staged,
    tree_digest,
    unstage_leftovers,
)
from bench.measure import dir_bytes, drop_caches, run_measured
from bench.report import (
    MB,
    Row,
    compute_ratios,
    compute_targets,
    format_ratios,
    format_table,
    format_targets,
)
from bench.tools import (
    PASSPHRASE,
    Borg,
    Command,
    Kind,
    Ours,
    Restic,
    Tool,
    probe_ours,
    probe_program,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("ours", "borg", "restic")
# borg exits 1 for warnings (e.g. a file changed while read); the archive is still complete.
OK_CODES = {"ours": {0}, "borg": {0, 1}, "restic": {0}}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--size-gib", type=float, default=2.0, help="disk image size (default 2)")
    p.add_argument("--tree-mib", type=float, default=1024.0, help="file tree size (default 1024)")
    p.add_argument("--seed", type=int, default=1, help="dataset seed (default 1)")
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="ours|borg|restic",
        help="run only these tools (repeat or comma-separate)",
    )
    p.add_argument(
        "--no-encrypted", action="store_true", help="skip the ours-aes (aes-256-gcm) variant"
    )
    p.add_argument("--keep", action="store_true", help="keep the repositories after the run")
    p.add_argument(
        "--drop-caches",
        action="store_true",
        help="sync and drop the page cache before every step (root); default: sync only",
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="write all numbers to FILE")
    p.add_argument(
        "--workdir",
        type=Path,
        default=REPO_ROOT / "var" / "bench",
        help="work directory (default var/bench)",
    )
    p.add_argument(
        "--appliance",
        type=Path,
        default=REPO_ROOT / ".venv" / "bin" / "appliance",
        help="our CLI (default .venv/bin/appliance)",
    )
    p.add_argument("--timeout-s", type=float, default=3600.0, help="per-step timeout")
    p.add_argument(
        "--mount",
        action="store_true",
        help="run the FUSE mount read benchmark instead (bench.mount_bench; same options)",
    )
    return normalise_tool_args(p, p.parse_args(argv))


def normalise_tool_args(
    p: argparse.ArgumentParser, args: argparse.Namespace
) -> argparse.Namespace:
    """Shared by every benchmark: expand `--only a,b` and make `--appliance` absolute."""
    only: set[str] = set()
    for item in args.only:
        for name in item.split(","):
            if name.strip() not in FAMILIES:
                p.error(f"--only: unknown tool {name!r} (choose from {', '.join(FAMILIES)})")
            only.add(name.strip())
    args.only = only or set(FAMILIES)
    # Children run in other directories: make the CLI path absolute (bare names via PATH).
    if "/" in str(args.appliance):
        args.appliance = args.appliance.resolve()
    else:
        found = shutil.which(str(args.appliance))
        args.appliance = Path(found) if found else args.appliance
    return args


def build_tools(args: argparse.Namespace, repos: Path) -> tuple[list[Tool], dict[str, str]]:
    """The tool variants to run, and the reason each unavailable family is skipped."""
    skipped: dict[str, str] = {}
    tools: list[Tool] = []
    if "ours" in args.only:
        why = probe_ours(args.appliance)
        if why:
            skipped["ours"] = why
        else:
            tools.append(Ours("ours", "ours", repos / ".home-ours", binary=args.appliance))
            if not args.no_encrypted:
                tools.append(
                    Ours(
                        "ours-aes",
                        "ours",
                        repos / ".home-ours-aes",
                        env_extra={"APPLIANCE_PASSPHRASE": PASSPHRASE},
                        binary=args.appliance,
                        encryption="aes-256-gcm",
                    )
                )
    if "borg" in args.only:
        why = probe_program("borg")
        if why:
            skipped["borg"] = why
        else:
            tools.append(
                Borg("borg-zstd3", "borg", repos / ".home-borg-zstd3", compression="zstd,3")
            )
            tools.append(Borg("borg-lz4", "borg", repos / ".home-borg-lz4", compression="lz4"))
    if "restic" in args.only:
        why = probe_program("restic")
        if why:
            skipped["restic"] = why
        else:
            tools.append(Restic("restic", "restic", repos / ".home-restic"))
    return tools, skipped


class Runner:
    """Runs the six steps of each tool variant and collects ``Row``s."""

    def __init__(self, ds: Dataset, workdir: Path, drop: bool, timeout_s: float) -> None:
        self.ds = ds
        self.repos = workdir / "repos"
        self.restore_root = workdir / "restore"
        self.logs = workdir / "logs"
        self.drop = drop
        self.timeout_s = timeout_s
        self.rows: list[Row] = []
        self.extras: dict[str, object] = {}
        self.cache_mode = "sync only"

    def _prepare(self) -> None:
        # Flush earlier writes so they are not billed to this step; optionally go cold.
        if self.drop:
            self.cache_mode = (
                "dropped before each step"
                if drop_caches()
                else ("drop requested but not permitted (sync only)")
            )
        else:
            os.sync()

    def _run(self, tool: Tool, step: str, cmd: Command, input_bytes: int, repo: Path) -> Row:
        self._prepare()
        log = self.logs / f"{tool.variant}-{step}.log"
        load_1m = os.getloadavg()[0]
        try:
            usage = run_measured(
                cmd.argv, cwd=cmd.cwd, env=tool.env(), log_path=log, timeout_s=self.timeout_s
            )
        except OSError as exc:
            return Row(tool.variant, tool.family, step, input_bytes, ok=False, error=str(exc))
        allocated, apparent = dir_bytes(repo)
        ok = usage.returncode in OK_CODES[tool.family] and not usage.timed_out
        error = ""
        if not ok:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            error = ("timed out; " if usage.timed_out else f"exit {usage.returncode}; ") + (
                " | ".join(tail)
            )
        return Row(
            tool.variant,
            tool.family,
            step,
            input_bytes,
            ok=ok,
            wall_s=usage.wall_s,
            user_s=usage.user_s,
            sys_s=usage.sys_s,
            peak_rss_mib=usage.peak_rss_mib,
            repo_bytes=allocated,
            repo_apparent_bytes=apparent,
            error=error,
            load_1m=load_1m,
        )

    def _record(self, row: Row) -> None:
        self.rows.append(row)
        if row.ok:
            check = (
                ""
                if row.verified is None
                else ("  verified" if row.verified else "  RESTORE MISMATCH")
            )
            print(
                f"  {row.variant:<11} {row.step:<14} {row.wall_s:8.2f} s {row.mb_s:8.1f} MB/s"
                f"  cpu {row.cpu_s:7.2f} s  rss {row.peak_rss_mib:6.0f} MiB"
                f"  repo {row.repo_bytes / MB:9.1f} MB{check}",
                flush=True,
            )
        else:
            print(f"  {row.variant:<11} {row.step:<14} FAILED: {row.error}", flush=True)
            print(f"    log: {self.logs / f'{row.variant}-{row.step}.log'}", flush=True)

    def run_tool(self, tool: Tool) -> None:
        for kind in (Kind.IMAGE, Kind.TREE):
            self._run_kind(tool, kind)

    def _run_kind(self, tool: Tool, kind: Kind) -> None:
        ds = self.ds
        repo = self.repos / f"{tool.variant}-{kind.value}"
        steps = [f"{kind.value}-full", f"{kind.value}-incr", f"{kind.value}-restore"]
        if kind is Kind.IMAGE:
            sources = [ds.image_v1, ds.image_v2]
            sizes = [ds.spec.image_bytes, ds.spec.image_bytes, ds.spec.image_bytes]
            staged_name = STAGED_IMAGE
        else:
            sources = [ds.tree_v1, ds.tree_v2]
            sizes = [ds.tree_v1_bytes, ds.tree_v2_bytes, ds.tree_v2_bytes]
            staged_name = STAGED_TREE
        if repo.exists():
            shutil.rmtree(repo)
        tool.home.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{tool.variant}-{kind.value}-init.log"
        for cmd in tool.init(repo):
            usage = run_measured(cmd.argv, cwd=cmd.cwd, env=tool.env(), log_path=log, timeout_s=300)
            if usage.returncode != 0:
                for step, size in zip(steps, sizes, strict=True):
                    self._record(
                        Row(
                            tool.variant,
                            tool.family,
                            step,
                            size,
                            ok=False,
                            error=f"init exited {usage.returncode}, see {log}",
                        )
                    )
                return
        for version, (source, step, size) in enumerate(
            zip(sources, steps[:2], sizes[:2], strict=True), start=1
        ):
            with staged(ds.root, source, staged_name) as path:
                row = self._run(tool, step, tool.backup(repo, kind, path, version), size, repo)
            self._record(row)
            if not row.ok:
                for later_step, later_size in zip(steps[version:], sizes[version:], strict=True):
                    self._record(
                        Row(
                            tool.variant,
                            tool.family,
                            later_step,
                            later_size,
                            ok=False,
                            error=f"skipped: {step} failed",
                        )
                    )
                return
        dest = self.restore_root / f"{tool.variant}-{kind.value}"
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        staged_path = ds.root / staged_name
        row = self._run(tool, steps[2], tool.restore(repo, kind, staged_path, dest), sizes[2], repo)
        if row.ok:
            row.verified = self._verify(kind, tool.restored_path(kind, staged_path, dest))
        self._record(row)
        shutil.rmtree(dest, ignore_errors=True)
        extra = tool.after(repo)
        if extra is not None:
            self.extras[f"{tool.variant}-{kind.value}"] = extra

    def _verify(self, kind: Kind, restored: Path) -> bool:
        if kind is Kind.IMAGE:
            return restored.is_file() and file_sha256(restored) == self.ds.image_v2_sha256
        return restored.is_dir() and tree_digest(restored)[0] == self.ds.tree_v2_digest


def warm_page_cache(root: Path) -> int:
    """Read every file under `root` once (the dataset fits in RAM on these machines)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                with open(os.path.join(dirpath, name), "rb", buffering=0) as fh:
                    while chunk := fh.read(8 << 20):
                        total += len(chunk)
            except OSError:
                continue
    return total


def main(argv: Sequence[str] | None = None) -> int:
    rest = list(sys.argv[1:] if argv is None else argv)
    if "--mount" in rest:
        from bench.mount_bench import main as mount_main

        return mount_main([a for a in rest if a != "--mount"])
    args = parse_args(argv)
    workdir: Path = args.workdir.resolve()
    data = workdir / "data"
    repos = workdir / "repos"
    spec = DatasetSpec(
        seed=args.seed,
        image_bytes=int(args.size_gib * GIB) // 65536 * 65536,
        tree_bytes=int(args.tree_mib * MIB),
    )
    t0 = time.perf_counter()
    print(
        f"bench: dataset in {data} (seed {spec.seed}, image {spec.image_bytes / MB:.1f} MB, "
        f"tree {spec.tree_bytes / MB:.1f} MB)",
        flush=True,
    )
    data.mkdir(parents=True, exist_ok=True)
    unstage_leftovers(data)
    ds, generated = ensure_dataset(data, spec)
    print(
        f"bench: dataset {'generated' if generated else 'reused'} "
        f"(generation took {ds.generate_s:.1f} s); image mix MB: "
        + ", ".join(f"{k} {v / MB:.0f}" for k, v in ds.image_mix_bytes.items())
        + f"; tree v1 {ds.tree_v1_files} files / {ds.tree_v1_bytes / MB:.0f} MB, "
        f"v2 {ds.tree_v2_files} files / {ds.tree_v2_bytes / MB:.0f} MB",
        flush=True,
    )

    if repos.exists():
        shutil.rmtree(repos)
    repos.mkdir(parents=True)
    tools, skipped = build_tools(args, repos)
    for family, why in skipped.items():
        print(f"bench: SKIPPING {family}: {why}", flush=True)
    runner = Runner(ds, workdir, args.drop_caches, args.timeout_s)
    if not args.drop_caches:
        # Warm the inputs once so the first tool is not the only one reading them from disk.
        warmed = warm_page_cache(ds.root)
        print(f"bench: warmed {warmed / 1e9:.1f} GB of inputs into the page cache", flush=True)
    print(
        f"bench: repositories in {repos}, logs in {runner.logs}; page cache: "
        f"{'dropped before each step' if args.drop_caches else 'not dropped (sync only)'}",
        flush=True,
    )
    try:
        for tool in tools:
            runner.run_tool(tool)
    finally:
        if args.keep:
            print(f"bench: repositories kept in {repos}")
        else:
            shutil.rmtree(repos, ignore_errors=True)
        shutil.rmtree(runner.restore_root, ignore_errors=True)

    rows = runner.rows
    busy = [r for r in rows if r.load_1m > (os.cpu_count() or 1)]
    cache_mode = runner.cache_mode if args.drop_caches else "warm, sync before each step"
    print()
    print(
        f"Results (MB = 10^6 B; page cache: {cache_mode}; repo MB = du of the repository "
        "after the step)"
    )
    print(format_table(rows))
    ours_variants = [t.variant for t in tools if t.family == "ours"]
    summary: dict[str, object] = {}
    for variant in ours_variants or ["ours"]:
        ratios = compute_ratios(rows, variant)
        targets = compute_targets(rows, variant)
        summary[variant] = {"ratios": ratios, "targets": targets}
        print()
        print(f"Ratios {variant} / others")
        print(format_ratios(ratios, variant))
        print()
        print(f"Targets ({variant})")
        print(format_targets(targets))
    if "ours" in skipped:
        print(f"\n(ours not measured: {skipped['ours']})")
    if busy:
        print(
            f"\nWARNING: {len(busy)} step(s) started with load average above {os.cpu_count()} "
            "(other processes competing for the CPUs): their numbers are pessimistic; rerun "
            "on an idle machine (see the load column)."
        )
    print(f"\nbench: data kept in {data}; total {time.perf_counter() - t0:.0f} s")

    if args.json:
        doc = {
            "dataset": {
                "root": str(data),
                "seed": spec.seed,
                "image_bytes": spec.image_bytes,
                "tree_v1_bytes": ds.tree_v1_bytes,
                "tree_v2_bytes": ds.tree_v2_bytes,
                "tree_v1_files": ds.tree_v1_files,
                "tree_v2_files": ds.tree_v2_files,
                "image_mix_bytes": ds.image_mix_bytes,
                "generated": generated,
                "generate_s": ds.generate_s,
                "version": spec.version,
            },
            "page_cache": cache_mode,
            "skipped": skipped,
            "rows": [r.as_json() for r in rows],
            "summary": summary,
            "tool_stats": runner.extras,
            "host": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"bench: wrote {args.json}")
    failed = [r for r in rows if not r.ok or r.verified is False]
    return 1 if failed else 0
