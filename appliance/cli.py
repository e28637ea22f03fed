"""The `appliance` command line: argument parsing, repository opening, error reporting.

Sub-commands live in `appliance/commands/*.py`; each module exposes
`register(sub: argparse._SubParsersAction) -> None` and sets `func(args) -> int` on its
parsers. User mistakes and store errors print one line and exit non-zero, never a traceback.

Exit codes: 0 success; 1 a check found problems (verify) or an unexpected error (its traceback
goes to a log file named on the one error line: REPO/logs/ if that directory exists, else
$XDG_STATE_HOME/appliance or ~/.local/state/appliance, else the temp directory); 2 a user or
store error; 3 a backup completed with errors (some entries could not be read; the point
lists them, as restic's exit 3); 130 interrupted.
"""

from __future__ import annotations

import argparse
import codecs
import getpass
import logging
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dedupstore import Repository, StoreError

from ._ui import UserError

log = logging.getLogger("appliance")

COMMAND_MODULES = ("store", "nbd", "vfs", "pxe", "build", "boot", "selftest")

EXIT_INCOMPLETE = 3  # a backup point was made, but some of the source could not be read


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


def _crash_log_dirs(args: argparse.Namespace | None) -> list[Path]:
    dirs = []
    repo = Path(getattr(args, "repo", None) or os.environ.get("APPLIANCE_REPO") or "./var/repo")
    if (repo / "logs").is_dir():
        dirs.append(repo / "logs")
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return [*dirs, Path(state) / "appliance", Path(tempfile.gettempdir())]


def _write_crash_log(args: argparse.Namespace | None, argv: list[str]) -> Path | None:
    """Write the current exception's traceback to a new 0600 log file; its path or None."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    text = f"appliance {' '.join(argv)}\n{traceback.format_exc()}"
    for d in _crash_log_dirs(args):
        path = d / f"appliance-error-{stamp}-{os.getpid()}.log"
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w", errors="backslashreplace") as fh:
                fh.write(text)
        except OSError:
            continue
        return path
    return None


def _escape_unencodable(exc: UnicodeError) -> tuple[str, int]:
    """Codec error handler: a surrogate-escaped byte prints as `\\xNN`, anything else `\\uNNNN`."""
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    out = []
    for ch in exc.object[exc.start : exc.end]:
        code = ord(ch)
        out.append(f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}")
    return "".join(out), exc.end


def main(argv: list[str] | None = None) -> None:
    # Names on Linux are bytes (str with surrogateescape here): printing one that is not
    # UTF-8 shows it escaped, the way dedupstore.display_path does, instead of dying.
    codecs.register_error("appliance-escape", _escape_unencodable)
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="appliance-escape")
    args: argparse.Namespace | None = None
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        level = logging.WARNING - 10 * min(args.verbose, 2)
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
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
    except Exception as exc:  # noqa: BLE001 (a bug: one line here, the traceback to a log file)
        path = _write_crash_log(args, sys.argv[1:] if argv is None else argv)
        where = f" (details in {path})" if path else ""
        print(f"appliance: error: unexpected {type(exc).__name__}: {exc}{where}", file=sys.stderr)
        raise SystemExit(1) from None
    raise SystemExit(rc or 0)


if __name__ == "__main__":
    main()
