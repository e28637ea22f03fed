"""The `appliance` command line: argument parsing, repository opening, error reporting.

Sub-commands live in `appliance/commands/*.py`; each module exposes
`register(sub: argparse._SubParsersAction) -> None` and sets `func(args) -> int` on its
parsers. User mistakes and store errors print one line and exit non-zero, never a traceback.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dedupstore import Repository, StoreError

from ._ui import UserError

log = logging.getLogger("appliance")

COMMAND_MODULES = ("store", "key", "nbd", "vfs", "pxe", "build", "boot", "selftest")


def repo_path(args: argparse.Namespace) -> Path:
    return Path(args.repo or os.environ.get("APPLIANCE_REPO") or "./var/repo")


def passphrase(args: argparse.Namespace, *, confirm: bool = False) -> str | None:
    """APPLIANCE_PASSPHRASE, else a prompt on a terminal, else None."""
    env = os.environ.get("APPLIANCE_PASSPHRASE")
    if env is not None:
        _scrub_proc_environ("APPLIANCE_PASSPHRASE")
        return env
    if not sys.stdin.isatty():
        return None
    p = getpass.getpass("Repository passphrase: ")
    if confirm and getpass.getpass("Repeat passphrase: ") != p:
        raise UserError("passphrases do not match")
    return p


def _scrub_proc_environ(name: str) -> None:
    """Blank `name`'s value in this process's initial environment block.

    /proc/<pid>/environ shows that block, of us and of daemons we fork (`mount`), for the
    whole life of the process; unsetenv cannot take a secret out of it. os.environ keeps its
    own copy, so this process still reads the value; children get keys over a pipe
    (dedupstore.KeyHandoff), never the passphrase. Best effort: a kernel that refuses writes
    to /proc/self/mem leaves the block as it is.
    """
    try:
        # fields after the command name start at field 3; env_start/env_end are 50 and 51
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start, end = int(fields[47]), int(fields[48])
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(start)
            block = mem.read(end - start)
            key = name.encode() + b"="
            pos = 0 if block.startswith(key) else block.find(b"\0" + key) + 1
            if pos == 0 and not block.startswith(key):
                return
            value_at = pos + len(key)
            value_end = block.find(b"\0", value_at)
            if value_end > value_at:
                mem.seek(start + value_at)
                mem.write(b"\0" * (value_end - value_at))
    except (OSError, ValueError, IndexError) as exc:
        log.debug("cannot blank %s in /proc/self/environ: %s", name, exc)


def _needs_passphrase(root: Path) -> bool:
    try:
        import json

        doc = json.loads((root / "config.json").read_text())
        return bool(doc.get("encryption") != "none")
    except (OSError, ValueError):
        return False


@contextmanager
def open_repo(args: argparse.Namespace, *, writable: bool = False) -> Iterator[Repository]:
    root = repo_path(args)
    pw = passphrase(args) if _needs_passphrase(root) else None
    repo = Repository.open(root, passphrase=pw, writable=writable)
    try:
        yield repo
    finally:
        repo.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="appliance", description="DR Appliance: deduplicating backup and instant recovery."
    )
    parser.add_argument("--repo", help="repository directory (env APPLIANCE_REPO; ./var/repo)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    import importlib

    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"appliance.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"appliance.commands.{name}":
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        rc = args.func(args)
    except (UserError, StoreError) as exc:
        print(f"appliance: error: {exc}", file=sys.stderr)
        raise SystemExit(getattr(exc, "exit_code", 2)) from None
    except OSError as exc:  # a file or device problem the user can act on: one line
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"appliance: error: {where}{exc.strerror or exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("appliance: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    raise SystemExit(rc or 0)


if __name__ == "__main__":
    main()
