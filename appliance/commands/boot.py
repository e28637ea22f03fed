"""Instant-recovery sub-commands: `boot`, `sessions`, `stop`, `migrate`.

Thin: parse, call `appliance.recovery`, print (or `--json`). `sessions` and `stop` also cover
the iSCSI sessions of SAN-booted machines and `iscsi export` (`appliance.commands.pxe`), so one
`appliance stop S --commit` ends any session that runs a machine from a backup. `boot` returns
as soon as the VM runs; the per-session supervisor daemon keeps nbdkit and QEMU alive
afterwards. Must not start or own long-running processes itself, and takes the repository
writer lock only for `stop --commit`.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from .. import recovery
from .._ui import UserError, emit_json
from ..cli import _needs_passphrase, passphrase, repo_path

log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    b = sub.add_parser(
        "boot",
        help="boot a backup point as a VM in seconds (overlay + NBD + QEMU/libvirt)",
        description="Creates a writable overlay of POINT, exports it over NBD and starts a VM "
        "on it; returns once the VM runs. The guest's writes go to the overlay: "
        "`appliance stop S --commit` keeps them as a new point.",
    )
    b.add_argument("point", help="SOURCE@ID or SOURCE@latest")
    b.add_argument("--name", help="session name (default SOURCE-ID8)")
    b.add_argument("--memory", default="512M", help="guest memory (default 512M)")
    b.add_argument("--cpus", type=int, default=1, help="vCPUs (default 1)")
    b.add_argument("--serial", type=Path, metavar="FILE",
                   help="guest serial console log (default <repo>/sessions/NAME/serial.log)")
    b.add_argument("--vnc", metavar=":N", help="VNC display (default: no display)")
    b.add_argument("--accel", choices=("tcg", "kvm"), default="tcg")
    b.add_argument("--bus", choices=("virtio", "ide"), default="virtio",
                   help="disk controller (default virtio)")
    b.add_argument("--libvirt", metavar="URI",
                   help="run the VM as a libvirt domain (e.g. qemu:///system?socket=PATH)")
    b.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the VM")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_boot)

    s = sub.add_parser("sessions", help="list recovery sessions")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_sessions)

    st = sub.add_parser("stop", help="end a recovery session")
    st.add_argument("name")
    st.add_argument("--commit", action="store_true",
                    help="store the overlay as a new point (parent = the booted point)")
    st.add_argument("--keep-overlay", action="store_true", help="do not drop the overlay")
    st.add_argument("--label", help="free text stored with the committed point")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_stop)

    m = sub.add_parser("migrate", help="move a running session's disks to local files, live")
    m.add_argument("name")
    m.add_argument("--to", type=Path, required=True, metavar="DIR", help="target directory")
    m.add_argument("--format", choices=("qcow2", "raw"), default="qcow2")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_migrate)


def _pw(args: argparse.Namespace) -> str | None:
    return passphrase(args) if _needs_passphrase(repo_path(args)) else None


def cmd_boot(args: argparse.Namespace) -> int:
    started = time.monotonic()
    try:
        s = recovery.boot_session(
            repo_path(args), args.point, name=args.name, memory=args.memory, cpus=args.cpus,
            serial_log=args.serial, vnc=args.vnc, accel=args.accel, bus=args.bus,
            libvirt_uri=args.libvirt, passphrase=_pw(args), timeout_s=args.timeout,
        )  # fmt: skip
    except recovery.SessionError as exc:
        raise UserError(str(exc)) from None
    elapsed = time.monotonic() - started
    if args.json:
        emit_json({**s.as_dict(), "elapsed_s": round(elapsed, 3)})
    else:
        print(f"session {s.name} running ({s.point}, {s.backend}, {elapsed:.1f} s)")
        print(f"serial log: {s.serial_log}")
        if s.qmp_socket:
            print(f"qmp socket: {s.qmp_socket}")
        if s.domain:
            print(f"libvirt domain: {s.domain} ({s.libvirt_uri})")
        print(f"end it: appliance stop {s.name} [--commit]")
    return 0


def _iscsi_sessions(args: argparse.Namespace) -> list[dict[str, Any]]:
    from .pxe import IscsiSessions

    return IscsiSessions(repo_path(args)).list()


def cmd_sessions(args: argparse.Namespace) -> int:
    sessions = recovery.list_sessions(repo_path(args))
    san = _iscsi_sessions(args)
    if args.json:
        emit_json([s.as_dict() for s in sessions] + [
            {"name": x["name"], "backend": "iscsi", "point": x["point"],
             "state": "running" if x["alive"] else "down", "iqn": x["iqn"],
             "portal": x.get("portal"), "initiators": x["initiators"],
             "luns": [{"disk": d["disk"], "lun": d["lun"]} for d in x.get("disks", [])]}
            for x in san])  # fmt: skip
        return 0
    if not sessions and not san:
        print("no recovery sessions")
        return 0
    for x in san:
        state = "running" if x["alive"] else "down"
        print(f"{x['name']:<24} {state:<9} {x['point']:<28} {'iscsi':<7} "
              f"{x['iqn']} on {x.get('portal')}, {x['initiators']} initiator(s)")
    for s in sessions:
        d = s.as_dict()

        def pid(key: str, d: dict[str, Any] = d) -> str:
            p = d[key]
            return "-" if p is None else f"{p['pid']}{'' if p['alive'] else '(dead)'}"

        print(f"{s.name:<24} {d['state']:<9} {s.point:<28} {s.backend:<7} "
              f"supervisor {pid('supervisor')} qemu {pid('qemu')} nbdkit {pid('nbdkit')}")
    return 0


def _stop_iscsi(args: argparse.Namespace) -> recovery.StopResult:
    """End an iSCSI session (SAN boot or `iscsi export`) like a recovery session."""
    from .pxe import IscsiSessions

    committed = IscsiSessions(repo_path(args), passphrase=_pw(args)).unexport(
        args.name, commit=args.commit, label=args.label, drop=not args.keep_overlay)
    return recovery.StopResult(args.name, committed,
                               "kept" if args.keep_overlay else "dropped")  # fmt: skip


def cmd_stop(args: argparse.Namespace) -> int:
    try:
        recovery.get_session(repo_path(args), args.name)
    except recovery.SessionError:
        if args.name in {x["name"] for x in _iscsi_sessions(args)}:
            res = _stop_iscsi(args)
        else:
            raise UserError(f"no session {args.name!r} (see `appliance sessions`)") from None
    else:
        try:
            res = recovery.stop_session(repo_path(args), args.name, commit=args.commit,
                                        keep_overlay=args.keep_overlay, label=args.label,
                                        passphrase=_pw(args))  # fmt: skip
        except recovery.SessionError as exc:
            raise UserError(str(exc)) from None
    if args.json:
        emit_json(res.as_dict())
    else:
        msg = f"stopped {res.name}; overlay {res.overlay}"
        if res.committed:
            msg += f"; committed as {res.committed}"
        print(msg)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    started = time.monotonic()
    try:
        targets = recovery.migrate_session(repo_path(args), args.name, args.to, fmt=args.format)
    except recovery.SessionError as exc:
        raise UserError(str(exc)) from None
    elapsed = time.monotonic() - started
    if args.json:
        emit_json({"name": args.name, "elapsed_s": round(elapsed, 3),
                   "disks": [{"disk": t.disk, "target": str(t.target), "format": t.fmt}
                             for t in targets]})  # fmt: skip
    else:
        for t in targets:
            print(f"{t.disk} -> {t.target} ({t.fmt})")
        print(f"session {args.name} migrated in {elapsed:.1f} s; the VM no longer uses the store")
    return 0
