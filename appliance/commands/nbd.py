"""NBD and overlay sub-commands: `nbd serve`, `overlay create|list|drop|commit`.

Thin: parse, open the repository, call `nbd.NbdServer` / dedupstore's overlay API, print.
Must not hold the repository writer lock longer than one command (only `overlay commit`
takes it), and must not serve NBD itself (nbdkit does, under `nbd.NbdServer`).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

import dedupstore as ds
from nbd import DEFAULT_LISTEN, NbdServer, NbdServerError

from .._ui import UserError, emit_json, human_bytes
from ..cli import _needs_passphrase, open_repo, passphrase, repo_path

log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    n = sub.add_parser("nbd", help="export points and overlays over NBD")
    nsub = n.add_subparsers(dest="nbd_command", metavar="ACTION")
    nsub.required = True
    s = nsub.add_parser(
        "serve",
        help="serve every image point (read-only) and overlay (writable) until SIGTERM/SIGINT",
        description="Exports SOURCE@ID/diskN and SOURCE@latest/diskN read-only and "
        "overlay/NAME/diskN writable. `nbdinfo --list nbd://HOST:PORT` shows them.",
    )
    where = s.add_mutually_exclusive_group()
    where.add_argument("--listen", metavar="HOST:PORT",
                       help=f"TCP address (default {DEFAULT_LISTEN}; port 0 = any free port)")
    where.add_argument("--socket", type=Path, metavar="PATH", help="unix socket instead of TCP")
    s.add_argument("--tls-psk", type=Path, metavar="FILE",
                   help="require TLS with this PSK file (lines 'user:hexkey'); needed for "
                   "an address that is not loopback")
    s.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --listen without TLS (anyone who reaches it "
                   "reads the backups)")
    s.add_argument("--only", action="append", metavar="EXPORT",
                   help="export only this point (SOURCE@ID) or overlay (overlay/NAME); "
                   "repeatable")
    s.add_argument("--overlays-only", action="store_true", help="export overlays only")
    s.add_argument("--readonly", action="store_true", help="overlays read-only too")
    s.add_argument("--threads", type=int, help="nbdkit threads per connection (default: cores)")
    s.set_defaults(func=cmd_serve)

    o = sub.add_parser("overlay", help="writable copy-on-write sessions on image points")
    osub = o.add_subparsers(dest="overlay_command", metavar="ACTION")
    osub.required = True
    p = osub.add_parser("create", help="create an overlay on an image point")
    p.add_argument("point", help="SOURCE@ID or SOURCE@latest")
    p.add_argument("--name", required=True, help="overlay name (export overlay/NAME/diskN)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_overlay_create)
    p = osub.add_parser("list", help="list overlays")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_overlay_list)
    p = osub.add_parser("drop", help="delete an overlay and its changes")
    p.add_argument("name")
    p.set_defaults(func=cmd_overlay_drop)
    p = osub.add_parser("commit", help="store an overlay's disks as a new point")
    p.add_argument("name")
    p.add_argument("--label", help="free text stored with the point")
    p.add_argument("--drop", action="store_true", help="drop the overlay after committing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_overlay_commit)


class _Stop(Exception):
    """Raised by the SIGTERM handler to leave the serve loop."""


def cmd_serve(args: argparse.Namespace) -> int:
    root = repo_path(args)
    # Keys a parent handed over (a session's NBD keeper) come first; else the passphrase.
    keys = ds.inherited_keys()
    pw = passphrase(args) if keys is None and _needs_passphrase(root) else None
    # Open once here: a wrong passphrase or a missing repository is a one-line error, and
    # nbdkit never starts. nbdkit gets the unwrapped keys over a pipe, not the passphrase.
    with ds.Repository.open(root, passphrase=pw, keys=keys) as repo:
        keys = repo.keys
    try:
        server = NbdServer(
            root, listen=args.listen, socket=args.socket, keys=keys, tls_psk=args.tls_psk,
            insecure=args.insecure, only=args.only, overlays_only=args.overlays_only,
            readonly=args.readonly, threads=args.threads, verbose=args.verbose >= 2,
            stderr=None, exit_with_parent=True,
        )  # fmt: skip
        server.check_exposure()  # before anything listens: a one-line refusal
    except (ValueError, NbdServerError) as exc:
        raise UserError(str(exc)) from None

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise _Stop

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        server.start()
        where = server.socket_path or f"{server.host}:{server.port}"
        print(f"serving {root} on {where} (nbdkit pid {server.pid}); "
              f"list exports: nbdinfo --list '{server.uri()}'", flush=True)
        rc = server.wait()
        print(f"appliance: nbdkit exited with status {rc}", file=sys.stderr)
        return 1 if rc else 0
    except (_Stop, KeyboardInterrupt):
        return 0
    except NbdServerError as exc:
        raise UserError(str(exc)) from None
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, old)


def _info_row(o: ds.OverlayInfo) -> str:
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(o.created_ns / 1e9))
    disks = ", ".join(f"{d.name} {human_bytes(d.size)}" for d in o.disks)
    bs = o.disks[0].block_size if o.disks else 0
    flags = " in use" if o.in_use else ""
    return (f"{o.name:<20} on {o.base:<28} {created}  {disks}  changed "
            f"{human_bytes(o.changed_blocks * bs)}{flags}")


def cmd_overlay_create(args: argparse.Namespace) -> int:
    with open_repo(args) as repo:
        info = ds.create_overlay(repo, args.point, args.name)
    if args.json:
        emit_json(info.as_dict())
    else:
        print(f"created overlay {info.name} on {info.base}; exports: "
              + ", ".join(f"overlay/{info.name}/{d.name}" for d in info.disks))
    return 0


def cmd_overlay_list(args: argparse.Namespace) -> int:
    with open_repo(args) as repo:
        infos = ds.list_overlays(repo)
    if args.json:
        emit_json([o.as_dict() for o in infos])
    elif not infos:
        print("no overlays")
    else:
        for o in infos:
            print(_info_row(o))
    return 0


def cmd_overlay_drop(args: argparse.Namespace) -> int:
    with open_repo(args) as repo:
        ds.drop_overlay(repo, args.name)
    print(f"dropped overlay {args.name}")
    return 0


def cmd_overlay_commit(args: argparse.Namespace) -> int:
    with open_repo(args, writable=True) as repo:
        point = ds.commit_overlay(repo, args.name, label=args.label)
        if args.drop:
            ds.drop_overlay(repo, args.name)
    if args.json:
        emit_json({"point": point.name, "stats": point.manifest.get("stats", {})})
    else:
        print(point.name)
    return 0
