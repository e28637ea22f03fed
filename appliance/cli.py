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
        return env
    if not sys.stdin.isatty():
        return None
    p = getpass.getpass("Repository passphrase: ")
    if confirm and getpass.getpass("Repeat passphrase: ") != p:
        raise UserError("passphrases do not match")
    return p


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
