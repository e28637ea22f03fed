"""Command lines of the measured tools: our ``appliance`` CLI, borg and restic.

Owns how each tool is initialised, asked to back up a staged path and asked to restore its
latest point, plus the probe deciding whether a tool can run at all.  It builds argv lists
only; running and timing them is ``bench.measure``'s job, sequencing is ``bench.cli``'s.

Every tool backs up the *same staged path* (``<data>/current.img`` or ``<data>/current-tree``)
for v1 and v2, so each one's own incremental machinery (borg's files cache, restic's parent
snapshot, our source lineage) sees one source that changed, as in production.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from bench.measure import run_quiet

PASSPHRASE = "bench-passphrase-not-secret"


class Kind(StrEnum):
    """The two datasets: a raw disk image and a file tree."""

    IMAGE = "image"
    TREE = "tree"


@dataclass(frozen=True, slots=True)
class Command:
    """One argv to run in ``cwd``."""

    argv: list[str]
    cwd: Path


@dataclass(slots=True)
class Tool:
    """Base adapter: one row label (``variant``) of one tool ``family``."""

    variant: str
    family: str
    home: Path  # per-variant cache/config directory, deleted with the repositories
    env_extra: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env_extra)
        return env

    def init(self, repo: Path) -> list[Command]:
        raise NotImplementedError

    def backup(self, repo: Path, kind: Kind, staged: Path, version: int) -> Command:
        raise NotImplementedError

    def restore(self, repo: Path, kind: Kind, staged: Path, dest: Path) -> Command:
        raise NotImplementedError

    def restored_path(self, kind: Kind, staged: Path, dest: Path) -> Path:
        """Where the restored image file / tree root ends up under ``dest``."""
        raise NotImplementedError

    def after(self, repo: Path) -> dict[str, object] | None:
        """Optional unmeasured statistics collected once a repository's steps are done."""
        return None


@dataclass(slots=True)
class Ours(Tool):
    """``appliance --repo R ...`` per the CLI contract."""

    binary: Path = Path("appliance")
    encryption: str = "none"

    def init(self, repo: Path) -> list[Command]:
        return [
            Command(
                [
                    str(self.binary),
                    "--repo",
                    str(repo),
                    "init",
                    "--encryption",
                    self.encryption,
                    "--compression",
                    "zstd",
                ],
                repo.parent,
            )
        ]

    def _source(self, kind: Kind) -> str:
        return "vm1" if kind is Kind.IMAGE else "t"

    def backup(self, repo: Path, kind: Kind, staged: Path, version: int) -> Command:
        what = "image" if kind is Kind.IMAGE else "files"
        mode = "full" if version == 1 else "incremental"
        return Command(
            [
                str(self.binary),
                "--repo",
                str(repo),
                "backup",
                what,
                str(staged),
                "--source",
                self._source(kind),
                "--mode",
                mode,
            ],
            staged.parent,
        )

    def restore(self, repo: Path, kind: Kind, staged: Path, dest: Path) -> Command:
        return Command(
            [
                str(self.binary),
                "--repo",
                str(repo),
                "restore",
                f"{self._source(kind)}@latest",
                str(self.restored_path(kind, staged, dest)),
            ],
            dest,
        )

    def restored_path(self, kind: Kind, staged: Path, dest: Path) -> Path:
        return dest / ("restored.img" if kind is Kind.IMAGE else "restored-tree")

    def after(self, repo: Path) -> dict[str, object] | None:
        proc = run_quiet(
            [str(self.binary), "--repo", str(repo), "stats", "--json"],
            cwd=repo.parent,
            env=self.env(),
        )
        if proc.returncode != 0:
            return {"error": proc.stderr.strip()[-500:]}
        try:
            parsed: dict[str, object] = json.loads(proc.stdout)
        except ValueError:
            return {"error": "stats --json printed no JSON", "stdout": proc.stdout[-500:]}
        return parsed


@dataclass(slots=True)
class Borg(Tool):
    """borg 1.2: unencrypted repository, ``--compression`` per variant, default chunker."""

    compression: str = "zstd,3"

    def env(self) -> dict[str, str]:
        env = Tool.env(self)
        env.update(
            {
                "BORG_BASE_DIR": str(self.home),
                "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
                "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
            }
        )
        return env

    def init(self, repo: Path) -> list[Command]:
        return [Command(["borg", "init", "-e", "none", str(repo)], repo.parent)]

    def backup(self, repo: Path, kind: Kind, staged: Path, version: int) -> Command:
        # Relative path from the data directory: the archive holds "current.img" etc.
        return Command(
            [
                "borg",
                "create",
                "--compression",
                self.compression,
                f"{repo}::v{version}",
                staged.name,
            ],
            staged.parent,
        )

    def restore(self, repo: Path, kind: Kind, staged: Path, dest: Path) -> Command:
        return Command(["borg", "extract", f"{repo}::v2"], dest)

    def restored_path(self, kind: Kind, staged: Path, dest: Path) -> Path:
        return dest / staged.name


@dataclass(slots=True)
class Restic(Tool):
    """restic: repository format 2 (compression ``auto`` = zstd), fixed host for parents."""

    def env(self) -> dict[str, str]:
        env = Tool.env(self)
        env.update({"RESTIC_PASSWORD": PASSPHRASE, "RESTIC_CACHE_DIR": str(self.home)})
        return env

    def init(self, repo: Path) -> list[Command]:
        return [Command(["restic", "-r", str(repo), "init"], repo.parent)]

    def backup(self, repo: Path, kind: Kind, staged: Path, version: int) -> Command:
        return Command(
            ["restic", "-r", str(repo), "backup", "--quiet", "--host", "bench", staged.name],
            staged.parent,
        )

    def restore(self, repo: Path, kind: Kind, staged: Path, dest: Path) -> Command:
        return Command(
            [
                "restic",
                "-r",
                str(repo),
                "restore",
                "latest",
                "--quiet",
                "--host",
                "bench",
                "--target",
                str(dest),
            ],
            dest,
        )

    def restored_path(self, kind: Kind, staged: Path, dest: Path) -> Path:
        # A relative backup path ("current.img", cwd = data dir) is restored at the top of the
        # target; older restic versions restore the absolute path below it instead.
        direct = dest / staged.name
        return direct if direct.exists() else dest / staged.resolve().relative_to("/")


def probe_ours(binary: Path) -> str | None:
    """Return None when our CLI can init a repository and report stats, else why not."""
    if not binary.exists():
        return f"{binary} does not exist"
    with tempfile.TemporaryDirectory(prefix="bench-probe-") as tmp:
        repo = Path(tmp) / "repo"
        env = dict(os.environ)
        try:
            init = run_quiet(
                [
                    str(binary),
                    "--repo",
                    str(repo),
                    "init",
                    "--encryption",
                    "none",
                    "--compression",
                    "zstd",
                ],
                cwd=Path(tmp),
                env=env,
                timeout_s=60,
            )
            if init.returncode != 0:
                return f"'init' exited {init.returncode}: {init.stderr.strip()[-300:]}"
            if not repo.exists():
                return "'init' exited 0 but created no repository (placeholder CLI?)"
            stats = run_quiet(
                [str(binary), "--repo", str(repo), "stats", "--json"],
                cwd=Path(tmp),
                env=env,
                timeout_s=60,
            )
        except OSError as exc:
            return f"cannot run {binary}: {exc}"
        if stats.returncode != 0:
            return f"'stats --json' exited {stats.returncode}: {stats.stderr.strip()[-300:]}"
        try:
            json.loads(stats.stdout)
        except ValueError:
            return "'stats --json' did not print JSON"
    return None


def probe_program(name: str) -> str | None:
    """Return None when ``name`` is on PATH, else why not."""
    if shutil.which(name) is None:
        return (
            f"{name} not found on PATH (apt-get install {name}{'backup' if name == 'borg' else ''})"
        )
    return None
