"""Store sub-commands: init, backup, points, restore, synthesize, prune, lock, delete, gc,
verify, stats, bench, repair. Thin: parse, open the repository, call dedupstore, print."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import dedupstore as ds

from .._targets import Target
from .._ui import Progress, UserError, emit_json, human_bytes
from ..cli import EXIT_INCOMPLETE, open_repo, passphrase, repo_path

SHOW_MAX = 20  # problem lines a backup prints; the point lists them all


def register(sub: Any) -> None:
    p = sub.add_parser("init", help="create a repository")
    p.add_argument("--encryption", choices=["none", "aes-256-gcm"], default="none")
    p.add_argument("--compression", default="zstd", help="zstd[,LEVEL] | lzo | gzip[,LEVEL] | none")
    p.add_argument("--hash", choices=["sha256", "blake3"], default="sha256")
    p.add_argument("--block-size", default="64K", help="image block size (4K..4M, power of 2)")
    p.add_argument("--immutable", action="store_true",
                   help="locks can only be extended and locked points are never deleted, not "
                   "even with --force (can never be turned off)")  # fmt: skip
    p.set_defaults(func=cmd_init)

    b = sub.add_parser("backup", help="take a backup point")
    bsub = b.add_subparsers(dest="what", metavar="KIND")
    bsub.required = True
    bi = bsub.add_parser("image", help="disk images or block devices (one point, disk0..N)")
    bi.add_argument("paths", nargs="+", type=Path)
    bi.add_argument(
        "--used-only",
        action="store_true",
        help="read only blocks the filesystems use (free space restores as zeros)",
    )
    bf = bsub.add_parser("files", help="a directory tree")
    bf.add_argument("paths", nargs=1, type=Path)
    for x in (bi, bf):
        x.add_argument("--source", required=True, help="source name (e.g. the VM or host)")
        x.add_argument(
            "--mode", choices=["full", "incremental", "differential"], default="incremental"
        )
        x.add_argument("--label", help="free text stored with the point")
        x.add_argument("--json", action="store_true")
        x.set_defaults(func=cmd_backup)

    p = sub.add_parser("points", help="list backup points")
    p.add_argument("--source")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_points)

    p = sub.add_parser("restore", help="restore a point (or one file/dir inside it)")
    p.add_argument("point", help="NAME@ID | NAME@latest [/disk0[/p1/path] | /path]")
    p.add_argument("dest", type=Path)
    p.add_argument(
        "--force",
        action="store_true",
        help="overwrite a disk target that holds data without asking (never one in use)",
    )
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("synthesize", help="a new full point from the latest of a chain")
    p.add_argument("source")
    p.set_defaults(func=cmd_synthesize)

    p = sub.add_parser("prune", help="delete points by retention policy")
    p.add_argument("--source", help="only this source (default: every source)")
    for rule in ("last", "daily", "weekly", "monthly", "yearly"):
        p.add_argument(f"--keep-{rule}", type=int, default=0, metavar="N")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("lock", help="make a point immutable until a date (locks only extend)")
    p.add_argument("point")
    p.add_argument("--until", help="YYYY-MM-DD (UTC)")
    p.add_argument(
        "--force",
        action="store_true",
        help="allow shortening a lock (refused in an --immutable repository)",
    )
    p.add_argument("--history", action="store_true", help="show every change of the lock")
    p.add_argument("--json", action="store_true", help="with --history")
    p.set_defaults(func=cmd_lock)

    p = sub.add_parser("unlock", help="remove a point's lock before it ends (needs --force)")
    p.add_argument("point")
    p.add_argument(
        "--force",
        action="store_true",
        help="required: a lock is a promise (refused in an --immutable repository)",
    )
    p.set_defaults(func=cmd_unlock)

    p = sub.add_parser("delete", help="delete one point (space returns at the next gc)")
    p.add_argument("point")
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("gc", help="remove unreferenced chunks and compact packs")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument(
        "--grace",
        type=float,
        default=ds.DEFAULT_GRACE_S / 3600,
        metavar="HOURS",
        help="keep what points deleted less than HOURS ago used (default 24; 0 = none)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser(
        "verify", help="re-read and re-hash chunks; name damaged points, mark damaged chunks"
    )
    p.add_argument("point", nargs="?")
    p.add_argument(
        "--repair",
        action="store_true",
        help="then replace damaged chunks from good copies (as 'repair --chunks')",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("stats", help="logical/stored bytes, dedup and compression ratios")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("bench", help="this machine's hash / codec / cipher speeds")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("repair", help="repair the repository")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--rebuild-index",
        action="store_true",
        help="recreate the index and catalogue from the pack files",
    )
    how.add_argument(
        "--chunks",
        action="store_true",
        help="replace chunks verify marked damaged by good copies; drop the damaged copies",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_repair)


def cmd_init(args: argparse.Namespace) -> int:
    root = repo_path(args)
    pw = passphrase(args, confirm=True) if args.encryption != "none" else None
    if args.encryption != "none" and not pw:
        raise UserError("an encrypted repository needs APPLIANCE_PASSPHRASE (or a terminal)")
    ds.Repository.create(
        root,
        block_size=ds.parse_size(args.block_size),
        hash_name=args.hash,
        compression=args.compression,
        encryption=args.encryption,
        passphrase=pw,
        immutable=args.immutable,
    )
    print(
        f"initialised repository {root} ({args.encryption}, {args.compression}, "
        f"{args.hash}, blocks {args.block_size}{', immutable' if args.immutable else ''})"
    )
    return 0


def _used_ranges(paths: list[Path]) -> list[Any]:
    try:
        import image
    except ImportError as exc:  # image/ is optional at this layer boundary
        raise UserError(f"--used-only needs the image package: {exc}") from exc
    out = []
    for path in paths:
        # The map is read now and the data later: a filesystem that is being written between
        # the two would lose the blocks it allocates meanwhile.
        busy = image.writable_mounts(path)
        if busy:
            raise UserError(
                f"--used-only: {path} is mounted read-write at {', '.join(busy)}, so its "
                "allocation map changes while it is read; back up a snapshot instead (LVM: "
                "lvcreate --snapshot, or fsfreeze -f MOUNTPOINT while a storage snapshot is "
                "taken), remount it read-only, or back it up without --used-only"
            )
        with image.FileSource(path) as src:
            umap = image.used_ranges(src)
        out.append(umap.ranges)
    return out


def cmd_backup(args: argparse.Namespace) -> int:
    if ds.display_path(args.source) != args.source:  # undecodable argv bytes (surrogates)
        raise UserError(f"source name '{ds.display_path(args.source)}' is not valid UTF-8")
    if args.label is not None:
        args.label = ds.display_path(args.label)  # free text: keep it, escaped
    used = None
    if args.what == "image" and args.used_only:
        used = _used_ranges(args.paths)
    with open_repo(args, writable=True) as repo:
        prog = Progress(f"backup {args.source}")
        try:
            if args.what == "image":
                point = ds.backup_image(
                    repo,
                    args.paths,
                    source=args.source,
                    mode=args.mode,
                    used=used,
                    progress=prog,
                    label=args.label,
                )
            else:
                point = ds.backup_tree(
                    repo,
                    args.paths[0],
                    source=args.source,
                    mode=args.mode,
                    progress=prog,
                    label=args.label,
                )
        finally:
            prog.close()
    st = point.manifest["stats"]
    m = point.manifest
    skipped, changed = m.get("errors") or [], m.get("changed") or []
    # restic's convention: 3 = the point was made but some source data could not be read.
    # A file that changed while read is stored as read and only reported (exit 0).
    rc = EXIT_INCOMPLETE if skipped else 0
    if args.json:
        emit_json(
            {
                "point": point.name,
                "mode": point.mode,
                "parent": point.parent,
                "stats": st,
                "complete": not skipped,
                "errors": skipped,
                "changed": changed,
            }
        )
    else:
        dur = max(st.get("duration_s", 0.0), 1e-6)
        print(
            f"{point.name}  {point.kind} {point.mode}  logical {human_bytes(st['logical_bytes'])}"
            f"  read {human_bytes(st['read_bytes'])}  new {human_bytes(st['stored_bytes'])} stored"
            f"  {st['logical_bytes'] / dur / 1e6:.0f} MB/s"
        )
        for c in changed[:SHOW_MAX]:
            print(f"changed while read (stored as read): {c['path']}: {c['change']}")
        if len(changed) > SHOW_MAX:
            print(f"... and {len(changed) - SHOW_MAX} more changed files (see 'points --json')")
        for e in skipped[:SHOW_MAX]:
            print(f"  not backed up: {e['path']}: {e['error']}", file=sys.stderr)
        if len(skipped) > SHOW_MAX:
            print(f"  ... and {len(skipped) - SHOW_MAX} more", file=sys.stderr)
    if skipped:
        print(
            f"appliance: completed with errors: {len(skipped)} entries could not be read and "
            f"are not in {point.name}",
            file=sys.stderr,
        )
    return rc


def _point_row(p: ds.Point) -> dict[str, Any]:
    m = p.manifest
    st = m.get("stats", {})
    row: dict[str, Any] = {
        "name": p.name,
        "source": p.source,
        "id": p.id,
        "kind": p.kind,
        "mode": p.mode,
        "parent": p.parent,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(p.time_ns / 1e9)),
        "logical_bytes": st.get("logical_bytes", 0),
        "stored_bytes": st.get("stored_bytes", 0),
        "locked_until": p.locked_until,
        "label": m.get("label"),
        # Points older than these fields counted skipped entries in stats.errors only.
        "complete": bool(m.get("complete", True)) and not st.get("errors", 0),
        "skipped": int(st.get("errors", 0)),
        "changed": int(st.get("changed", 0)),
        # What was left out and what changed while read, for a file-tree point.
        "errors": list(m.get("errors") or []),
        "changed_files": list(m.get("changed") or []),
    }
    if p.kind == "image":
        row["disks"] = [{"name": d["name"], "size": d["size"]} for d in m["disks"]]
    return row


def cmd_points(args: argparse.Namespace) -> int:
    with open_repo(args) as repo:
        rows = [_point_row(p) for p in repo.list_points(args.source)]
    if args.json:
        emit_json(rows)
        return 0
    if not rows:
        print("no points")
        return 0
    print(f"{'POINT':<40} {'KIND':<6} {'MODE':<12} {'TIME':<21} {'LOGICAL':>10} {'NEW':>10}")
    for r in rows:
        lock = "  locked" if r["locked_until"] and r["locked_until"] > time.time() else ""
        if not r["complete"]:
            lock += f"  INCOMPLETE ({r['skipped']} skipped)"
        print(
            f"{r['name']:<40} {r['kind']:<6} {r['mode']:<12} {r['time']:<21} "
            f"{human_bytes(r['logical_bytes']):>10} {human_bytes(r['stored_bytes']):>10}{lock}"
        )
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from .. import restore

    ref, _, inner = args.point.partition("/")
    with open_repo(args) as repo:
        point = repo.resolve(ref)
        prog = Progress(f"restore {point.name}")
        try:
            if point.kind == "files":
                n = ds.restore_tree(repo, point, args.dest, subpath=inner, progress=prog)
                msg = f"restored {n} entries of {point.name} to {args.dest}"
            else:
                disk, _, fs_path = inner.partition("/")
                if fs_path:
                    res = restore.restore_from_image(repo, point, disk, fs_path, args.dest)
                    msg = f"restored {res.entries} entries from {res.source} to {res.dest}"
                    if res.skipped:
                        msg += f" ({len(res.skipped)} left out: see the warnings above)"
                else:
                    confirm = _confirm_overwrite if sys.stdin.isatty() else None
                    out = restore.restore_disks(
                        repo, point, args.dest, disk=disk or None, force=args.force,
                        confirm=confirm, progress=prog,
                    )  # fmt: skip
                    msg = f"restored {point.name} to {', '.join(map(str, out))}"
        finally:
            prog.close()
    print(msg)
    return 0


def _confirm_overwrite(target: Target) -> bool:
    """Typed confirmation on the terminal: the target's name, as Clonezilla asks twice."""
    print(f"{target.describe()}; restoring overwrites all of it.", file=sys.stderr)
    try:
        answer = input(f"Type {target.path.name!r} to overwrite it: ")
    except EOFError:
        return False
    return answer.strip() == target.path.name


def cmd_synthesize(args: argparse.Namespace) -> int:
    with open_repo(args, writable=True) as repo:
        point = ds.synthesize(repo, args.source)
    print(f"{point.name}  synthetic full from {point.parent}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    keep = {
        f"keep_{r}": getattr(args, f"keep_{r}")
        for r in ("last", "daily", "weekly", "monthly", "yearly")
    }
    report: dict[str, Any] = {"kept": [], "deleted": [], "dry_run": args.dry_run}
    with open_repo(args, writable=not args.dry_run) as repo:
        protected = ds.protected_points(repo)
        sources = [args.source] if args.source else repo.sources()
        for source in sources:
            kept, gone = ds.prune_plan(repo.list_points(source), protected=protected, **keep)
            report["kept"] += [{"point": p.name, "reason": why} for p, why in kept]
            for p in gone:
                if not args.dry_run:
                    ds.delete_point(repo, p)
                report["deleted"].append(p.name)
    if args.json:
        emit_json(report)
    else:
        for k in report["kept"]:
            print(f"keep    {k['point']}  ({k['reason']})")
        verb = "would delete" if args.dry_run else "deleted"
        for name in report["deleted"]:
            print(f"{verb} {name}")
        if report["deleted"] and not args.dry_run:
            print("run 'appliance gc' to reclaim the space")
    return 0


def _utc(ts: float | None) -> str:
    return "none" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def cmd_lock(args: argparse.Namespace) -> int:
    if args.history:
        if args.until or args.force:
            raise UserError("--history only shows the lock: no --until/--force with it")
        with open_repo(args) as repo:
            p = repo.resolve(args.point)
            hist = repo.lock_history(p)
        if args.json:
            emit_json({"point": p.name, "locked_until": p.locked_until, "history": hist})
            return 0
        print(f"{p.name} locked until {_utc(p.locked_until)}")
        for e in hist:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e["time_ns"] / 1e9))
            forced = "  (forced)" if e.get("forced") else ""
            print(f"  {when}  {_utc(e.get('prev'))} -> {_utc(e.get('until'))}{forced}")
        return 0
    if not args.until:
        raise UserError("lock needs --until YYYY-MM-DD (or --history)")
    until = ds.parse_until(args.until)
    with open_repo(args, writable=True) as repo:
        p = repo.lock_point(repo.resolve(args.point), until, force=args.force)
    print(f"{p.name} locked until {_utc(until)}")
    return 0


def cmd_unlock(args: argparse.Namespace) -> int:
    if not args.force:
        raise UserError("a lock is removed only with --force (see `appliance lock --help`)")
    with open_repo(args, writable=True) as repo:
        p = repo.lock_point(repo.resolve(args.point), None, force=True)
    print(f"{p.name} unlocked")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with open_repo(args, writable=True) as repo:
        p = repo.resolve(args.point)
        ds.delete_point(repo, p)
    print(
        f"deleted {p.name}; 'appliance gc' reclaims the space once the grace period "
        f"({ds.DEFAULT_GRACE_S / 3600:g} h) is over"
    )
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    with open_repo(args, writable=True) as repo:
        if args.grace < 0:
            raise UserError("--grace must be >= 0 hours")
        rep = ds.gc(repo, dry_run=args.dry_run, grace_s=args.grace * 3600)
    if args.json:
        emit_json(rep.as_dict())
    else:
        print(
            f"live chunks {rep.live_chunks}, removed {rep.deleted_chunks} "
            f"({human_bytes(rep.deleted_bytes)}), packs rewritten {rep.packs_rewritten}, "
            f"deleted {rep.packs_deleted}; packs {human_bytes(rep.bytes_before)} -> "
            f"{human_bytes(rep.bytes_after)}"
        )
        if rep.deleted_points_kept:
            print(
                f"kept the data of {rep.deleted_points_kept} deleted point(s) "
                "(grace period or live readers)"
            )
        if rep.packs_quarantined:
            print(f"moved {rep.packs_quarantined} unreadable pack(s) to quarantine/")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    # Read-only: marking damaged chunks is one index transaction any reader may commit.
    with open_repo(args) as repo:
        point = repo.resolve(args.point) if args.point else None
        prog = Progress("verify")
        try:
            rep = ds.verify(repo, point, progress=prog)
        finally:
            prog.close()
    fixed = None
    if args.repair and not rep.ok:
        with open_repo(args, writable=True) as repo:
            fixed = ds.repair_chunks(repo)
    if args.json:
        out = rep.as_dict()
        if fixed is not None:
            out["repair"] = fixed.as_dict()
        emit_json(out)
    else:
        print(
            f"checked {rep.chunks_checked} chunks ({human_bytes(rep.bytes_checked)}), "
            f"{rep.points_checked} points"
        )
        for cid, err in rep.bad_chunks.items():
            head = f"chunk {cid.hex()[:16]}"
            print(f"BAD {err}" if err.startswith(head) else f"BAD {head}: {err}")
        for pid, why in rep.damaged_packs.items():
            print(f"DAMAGED pack {pid:016x}: {why}")
        for name, why in rep.damaged_points.items():
            print(f"DAMAGED {name}: {why}")
        for note in rep.notes:
            print(f"note: {note}")
        print("OK" if rep.ok else "verify FAILED")
        if fixed is not None:
            _print_chunk_repair(fixed)
    return 0 if rep.ok else 1


def cmd_stats(args: argparse.Namespace) -> int:
    with open_repo(args) as repo:
        st = ds.stats(repo)
    if args.json:
        emit_json(st)
        return 0
    print(f"points            {st['points']} in {len(st['sources'])} sources")
    print(f"logical bytes     {human_bytes(st['logical_bytes'])}")
    print(f"unique bytes      {human_bytes(st['unique_bytes'])}  (after dedup)")
    print(f"stored bytes      {human_bytes(st['stored_bytes'])}  (packs on disk)")
    print(f"dedup ratio       {st['dedup_ratio']:.2f}x")
    print(f"compression ratio {st['compression_ratio']:.2f}x")
    print(f"total ratio       {st['total_ratio']:.2f}x")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .. import _speed

    results = _speed.measure()
    if args.json:
        emit_json(results)
    else:
        for name, mbs in results.items():
            print(f"{name:<28} {mbs:10.0f} MB/s")
    return 0


def _print_chunk_repair(rep: ds.ChunkRepairReport) -> None:
    for cid, where in rep.replaced.items():
        print(f"replaced damaged chunk {cid[:16]} by its good copy in {where}")
    for cid, why in rep.cleared.items():
        print(f"cleared the mark of chunk {cid[:16]}: {why}")
    for cid, points in rep.unrepairable.items():
        users = ", ".join(points) or "no point recorded"
        print(
            f"NO GOOD COPY of chunk {cid[:16]} (used by {users}): the next backup of its "
            "source stores it again"
        )
    print(
        f"{rep.marked} chunk(s) marked damaged: {len(rep.replaced)} replaced, "
        f"{len(rep.cleared)} cleared, {len(rep.unrepairable)} without a good copy; "
        f"{rep.packs_rewritten} pack(s) rewritten without their damaged copies"
    )


def cmd_repair(args: argparse.Namespace) -> int:
    if args.chunks:
        with open_repo(args, writable=True) as repo:
            crep = ds.repair_chunks(repo)
        if args.json:
            emit_json(crep.as_dict())
        else:
            _print_chunk_repair(crep)
        return 0 if crep.ok else 1
    readers = ds.live_readers(repo_path(args))
    if readers:
        names = ", ".join(r.describe() for r in readers)
        raise UserError(
            f"cannot rebuild the index while the repository has live readers: {names} "
            "(stop them first: appliance umount / export stop)"
        )
    try:
        with open_repo(args, writable=True):
            pass
    except ds.StoreError as exc:
        if isinstance(exc, ds.WrongPassphrase | ds.Locked | ds.NotFound):
            raise
        # The index itself is unreadable: keep it aside and rebuild into a fresh one.
        index = repo_path(args) / "index"
        aside = index.with_name(f"index.damaged-{int(time.time())}")
        index.rename(aside)
        print(f"index unreadable ({exc}); moved it to {aside}")
    with open_repo(args, writable=True) as repo:
        prog = Progress("rebuild index")
        try:
            rep = ds.rebuild_index(repo, progress=prog)
        finally:
            prog.close()
    if args.json:
        emit_json(rep.as_dict())
    else:
        print(
            f"rebuilt index from {rep.packs} packs: {rep.chunks} chunks, {rep.points} points"
            f" ({rep.deleted_points} deleted points skipped)"
        )
        for prob in rep.problems:
            print(f"problem: {prob}")
    return 0
