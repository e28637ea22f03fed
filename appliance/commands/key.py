"""Key sub-commands: `key list|passwd|add|remove|export|import` of an encrypted repository.

Thin: parse, read passphrases, call dedupstore's key-slot functions, print. The current
passphrase comes from APPLIANCE_PASSPHRASE (or a prompt); a new one from
APPLIANCE_NEW_PASSPHRASE (or a prompt, typed twice), never from the command line, where `ps`
and the shell history would show it. dedupstore holds the repository writer lock while it
changes config.json, so two key changes never race.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path
from typing import Any

import dedupstore as ds

from .._ui import UserError, emit_json
from ..cli import passphrase, repo_path

NEW_PASSPHRASE_ENV = "APPLIANCE_NEW_PASSPHRASE"  # noqa: S105 (a variable name)


def register(sub: Any) -> None:
    k = sub.add_parser("key", help="passphrases (key slots) of an encrypted repository")
    ksub = k.add_subparsers(dest="key_command", metavar="ACTION")
    ksub.required = True
    p = ksub.add_parser("list", help="list the keys (no passphrase needed)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)
    p = ksub.add_parser(
        "passwd",
        help="change the passphrase of the key APPLIANCE_PASSPHRASE opens (no data rewritten)",
        description=f"New passphrase: {NEW_PASSPHRASE_ENV} or a prompt.",
    )
    p.set_defaults(func=cmd_passwd)
    p = ksub.add_parser(
        "add",
        help="add a key with a new passphrase",
        description=f"New passphrase: {NEW_PASSPHRASE_ENV} or a prompt.",
    )
    p.add_argument("--name", default="", help="a label for the key (e.g. who holds it)")
    p.set_defaults(func=cmd_add)
    p = ksub.add_parser("remove", help="remove a key (with another key's passphrase)")
    p.add_argument("id", help="key id from `appliance key list`")
    p.set_defaults(func=cmd_remove)
    p = ksub.add_parser("export", help="write the (still passphrase-sealed) keys for safekeeping")
    p.add_argument("file", nargs="?", default="-", help="output file (default: stdout)")
    p.add_argument("--paper", action="store_true", help="printable text with per-line checks")
    p.set_defaults(func=cmd_export)
    p = ksub.add_parser(
        "import",
        help="put exported keys back (a key with the same id is replaced)",
        description="APPLIANCE_PASSPHRASE must open one of the imported keys.",
    )
    p.add_argument("file", help="an export (`-`: stdin)")
    p.add_argument("--paper", action="store_true", help="the file is a paper copy")
    p.set_defaults(func=cmd_import)


def _current(args: argparse.Namespace) -> str:
    pw = passphrase(args)
    if not pw:
        raise UserError("set APPLIANCE_PASSPHRASE to a current passphrase (or use a terminal)")
    return pw


def _new_passphrase() -> str:
    env = os.environ.get(NEW_PASSPHRASE_ENV)
    if env is not None:
        if not env:
            raise UserError(f"{NEW_PASSPHRASE_ENV} is empty")
        return env
    if not sys.stdin.isatty():
        raise UserError(f"set {NEW_PASSPHRASE_ENV} to the new passphrase (or use a terminal)")
    p = getpass.getpass("New passphrase: ")
    if not p:
        raise UserError("the new passphrase is empty")
    if getpass.getpass("Repeat new passphrase: ") != p:
        raise UserError("passphrases do not match")
    return p


def cmd_list(args: argparse.Namespace) -> int:
    keys = ds.list_keys(repo_path(args))
    if args.json:
        emit_json([k.as_dict() for k in keys])
        return 0
    print(f"{'ID':<10} {'NAME':<24} CREATED")
    for k in keys:
        print(f"{k.id:<10} {k.name:<24} {k.created}")
    return 0


def cmd_passwd(args: argparse.Namespace) -> int:
    old = _current(args)
    ds.unlock_keys(repo_path(args), old)  # a wrong passphrase fails before the new is asked
    key_id = ds.change_passphrase(repo_path(args), old, _new_passphrase())
    print(f"changed the passphrase of key {key_id}; the old passphrase no longer opens it")
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    cur = _current(args)
    ds.unlock_keys(repo_path(args), cur)  # a wrong passphrase fails before the new is asked
    key_id = ds.add_key(repo_path(args), cur, _new_passphrase(), args.name)
    print(f"added key {key_id}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    cur = _current(args)
    ds.remove_key(repo_path(args), cur, args.id)
    print(f"removed key {args.id}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    doc = ds.export_keys(repo_path(args))
    text = ds.paper_text(doc) if args.paper else json.dumps(doc, indent=2) + "\n"
    if args.file == "-":
        sys.stdout.write(text)
        return 0
    path = Path(args.file)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    print(f"exported {len(doc['keys'])} key(s) of repository {doc['repo_id']} to {path}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
    if args.paper:
        doc = ds.parse_paper(text)
    else:
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise UserError(
                f"{args.file}: not a key export ({exc}); a paper copy? --paper"
            ) from None
        if not isinstance(doc, dict):
            raise UserError(f"{args.file}: not a key export")
    cur = _current(args)
    ids = ds.import_keys(repo_path(args), doc, cur)
    print(f"imported key(s) {', '.join(ids)}")
    return 0
