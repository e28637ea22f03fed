"""Repository maintenance: reference walking, verify, prune, GC + compaction, stats, rebuild.

Owns the reachability rules (what a point references) and every whole-repository pass.
All passes that change the repository need the writer lock (Repository opened writable),
except verify's bad-chunk marks (one LMDB transaction that any reader may commit).

What GC may destroy: chunks no root references, where roots are the points, the deleted
points still in their grace period, and every point deleted after the oldest live reader
lease started; unindexed packs only if this repository's writer recorded creating them, or
if they are provably empty. Anything else it does not understand goes to `quarantine/`.
"""

from __future__ import annotations

import calendar
import logging
import os
import shutil
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from ._imagepoint import block_map, worker_count
from ._index import Index, Loc, point_key
from ._overlay import list_overlays, overlay_catalogue_lock, overlays_on
from ._pack import pack_is_empty, pack_path, read_header, salvage_pack, scan_pack
from ._readers import ReaderInfo, live_readers
from ._repo import Point, Repository, restored_lock
from .errors import (
    ChunkCorrupt,
    ChunkMissing,
    FormatError,
    InvalidArgument,
    Locked,
    StoreError,
)
from .formats import (
    ENTRY_HEADER,
    ENTRY_HEADER_CRC_SPAN,
    ENTRY_TAG,
    PACK_SUFFIX,
    ZERO_ID,
    ChunkId,
    Kind,
)

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


# -- references ---------------------------------------------------------------------------
def point_refs(repo: Repository, point: Point) -> Iterator[ChunkId]:
    """Every chunk id a point needs (manifest, pages, blocks, tree slices, file chunks).

    Raises ChunkMissing / ChunkCorrupt when the point's own index structures are damaged.
    """
    yield point.manifest_id
    m = point.manifest
    if m["kind"] == "image":
        for disk in m["disks"]:
            bmap = block_map(repo, disk)
            yield from bmap.page_ids()
            seen_last = None
            for cid, _fp in bmap.entries():
                if cid != ZERO_ID and cid != seen_last:
                    yield cid
                    seen_last = cid
    elif m["kind"] == "files":
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=64 * 1024 * 1024)
        for tid in m.get("tree", []):
            yield ChunkId(bytes(tid))
            unpacker.feed(repo.get(bytes(tid)))
            for item in unpacker:
                for c in item.get("c", ()) if isinstance(item, dict) else ():
                    yield ChunkId(bytes(c[0]))
    else:
        raise FormatError(f"{point.name}: unknown point kind {m['kind']!r}")


# -- verify -------------------------------------------------------------------------------
@dataclass
class VerifyReport:
    chunks_checked: int = 0
    bytes_checked: int = 0
    bad_chunks: dict[bytes, str] = field(default_factory=dict)
    damaged_packs: dict[int, str] = field(default_factory=dict)
    damaged_points: dict[str, str] = field(default_factory=dict)
    points_checked: int = 0
    notes: list[str] = field(default_factory=list)
    bad_chunk_points: dict[bytes, list[str]] = field(default_factory=dict)
    marked_bad: int = 0

    @property
    def ok(self) -> bool:
        return not self.bad_chunks and not self.damaged_points and not self.damaged_packs

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "chunks_checked": self.chunks_checked,
            "bytes_checked": self.bytes_checked,
            "points_checked": self.points_checked,
            "bad_chunks": {k.hex(): v for k, v in self.bad_chunks.items()},
            "damaged_packs": {f"{k:016x}": v for k, v in self.damaged_packs.items()},
            "damaged_points": self.damaged_points,
            "marked_bad": self.marked_bad,
            "notes": self.notes,
        }


def _check(repo: Repository, cid: bytes) -> tuple[bytes, int, str | None]:
    try:
        data = repo.get(cid, verify_id=True)
    except StoreError as exc:
        return cid, 0, str(exc)
    return cid, len(data), None


def verify(
    repo: Repository,
    point: Point | None = None,
    progress: Progress | None = None,
    *,
    mark: bool = True,
) -> VerifyReport:
    """Re-read and re-hash chunks; name the points that reference a bad or missing chunk.

    Without `point`: every indexed chunk, then every point's references. With `point`:
    only the chunks that point references. Every chunk is re-hashed against its id (plain
    repositories too, not only the crc). With `mark`, damaged indexed chunks are marked bad
    in the index (with the points using them): the next backup that produces one stores a
    fresh copy. Works on a read-only repository (the marks are one LMDB transaction).
    """
    rep = VerifyReport()
    points = [point] if point is not None else repo.list_points()
    if point is None:
        # Read in pack order so the disk streams; hash on every core.
        by_pack: dict[int, list[tuple[int, bytes]]] = defaultdict(list)
        for cid, loc in repo.index.iter_chunks():
            by_pack[loc[0]].append((loc[1], cid))
        order = [cid for pid in sorted(by_pack) for _off, cid in sorted(by_pack[pid])]
        total = len(order)
        with ThreadPoolExecutor(worker_count(), thread_name_prefix="verify") as pool:
            for n, (bad_id, size, err) in enumerate(
                pool.map(lambda c: _check(repo, c), order, chunksize=64), start=1
            ):
                rep.chunks_checked += 1
                rep.bytes_checked += size
                if err is not None:
                    rep.bad_chunks[bad_id] = err
                if progress and n % 256 == 0:
                    progress(n, total)
        for pid, info in repo.index.all_packs().items():
            path = pack_path(repo.root, str(info["tier"]), pid)
            problem = _pack_problem(path, sealed=bool(info.get("sealed", True)))
            if problem:
                rep.damaged_packs[pid] = problem
    for p in points:
        rep.points_checked += 1
        problem = _point_problem(repo, p, rep, check_chunks=point is not None)
        if problem:
            rep.damaged_points[p.name] = problem
    if mark:
        _mark_bad(repo, rep)
    return rep


def _mark_bad(repo: Repository, rep: VerifyReport) -> None:
    marks: list[tuple[bytes, Loc, str, list[str]]] = []
    for cid, err in rep.bad_chunks.items():
        loc = repo.index.lookup(cid)
        if loc is None:
            continue  # not indexed: a backup stores it anyway
        marks.append((cid, loc, err, sorted(set(rep.bad_chunk_points.get(cid, [])))))
    if not marks:
        return
    try:
        rep.marked_bad = repo.index.mark_bad(marks)
    except StoreError as exc:
        rep.notes.append(f"damaged chunks not marked: {exc}")
        return
    rep.notes.append(
        f"marked {rep.marked_bad} damaged chunk(s): the next backup of their source stores "
        "fresh copies; 'appliance repair --chunks' replaces them from good copies in packs"
    )


def _pack_problem(path: Path, *, sealed: bool) -> str | None:
    """Damage outside the payloads (pack header, table, footer) that chunk reads don't see.

    A pack salvaged after a crash (`sealed` False) has no table or footer by design: only
    its header is checked here; its entries are checked by the chunk reads.
    """
    if not path.exists():
        return "pack file is missing"
    if not sealed:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            read_header(fd)
        except FormatError as exc:
            return str(exc)
        finally:
            os.close(fd)
        return None
    try:
        scan = scan_pack(path, check_payloads=False)
    except (FormatError, OSError) as exc:
        return str(exc)
    if not scan.sealed:
        return "pack has no valid table/footer: " + "; ".join(scan.problems or ["unsealed"])
    if scan.problems:
        return "; ".join(scan.problems)
    return None


def _chunk_problem(cid: bytes, err: str) -> str:
    """``chunk <id>: <err>``, without repeating the id when the error already starts with it."""
    head = f"chunk {cid.hex()[:16]}"
    return err if err.startswith(head) else f"{head}: {err}"


def _point_problem(repo: Repository, p: Point, rep: VerifyReport, check_chunks: bool) -> str | None:
    """The first problem of a point; walks all its references so that every damaged chunk
    it uses is recorded with the point (for the bad marks)."""
    seen: set[bytes] = set()
    first: str | None = None
    try:
        for cid in point_refs(repo, p):
            if cid in seen:
                continue
            seen.add(cid)
            problem: str | None = None
            if cid in rep.bad_chunks:
                problem = _chunk_problem(cid, rep.bad_chunks[cid])
            elif check_chunks:
                _c, size, err = _check(repo, cid)
                rep.chunks_checked += 1
                rep.bytes_checked += size
                if err is not None:
                    rep.bad_chunks[cid] = err
                    problem = _chunk_problem(cid, err)
            else:
                loc = repo.index.lookup(cid)
                if loc is None:
                    rep.bad_chunks[cid] = "missing"
                    problem = f"chunk {cid.hex()[:16]} is missing"
                elif loc[0] in rep.damaged_packs:
                    first = first or (
                        f"pack {loc[0]:016x} is damaged ({rep.damaged_packs[loc[0]]}); "
                        "its chunks still read, but the pack cannot be rebuilt from"
                    )
            if problem is not None:
                rep.bad_chunk_points.setdefault(cid, []).append(p.name)
                first = first or problem
    except (ChunkMissing, ChunkCorrupt, FormatError) as exc:
        return first or f"index structure damaged: {exc}"
    return first


def delete_point(repo: Repository, point: Point) -> None:
    """Delete a point unless it is locked or an overlay stands on it."""
    with overlay_catalogue_lock(repo):
        users = overlays_on(repo, point.name)
        if users:
            raise Locked(f"{point.name} has overlays ({', '.join(users)}): drop them first")
        repo.delete_point(point)


def protected_points(repo: Repository) -> set[str]:
    """Points that overlays stand on (prune keeps them)."""
    return {ov.base for ov in list_overlays(repo)}


# -- prune --------------------------------------------------------------------------------
PRUNE_RULES: list[tuple[str, Callable[[time.struct_time], tuple[int, ...]]]] = [
    ("yearly", lambda t: (t.tm_year,)),
    ("monthly", lambda t: (t.tm_year, t.tm_mon)),
    ("weekly", lambda t: (int(time.strftime("%G", t)), int(time.strftime("%V", t)))),
    ("daily", lambda t: (t.tm_year, t.tm_yday)),
]


def prune_plan(
    points: list[Point],
    *,
    keep_last: int = 0,
    keep_daily: int = 0,
    keep_weekly: int = 0,
    keep_monthly: int = 0,
    keep_yearly: int = 0,
    protected: set[str] | None = None,
    now: float | None = None,
) -> tuple[list[tuple[Point, str]], list[Point]]:
    """borg-style retention for one source: returns ([(kept, why)], [to delete])."""
    if not any((keep_last, keep_daily, keep_weekly, keep_monthly, keep_yearly)):
        raise InvalidArgument("prune needs at least one --keep-* rule")
    now = time.time() if now is None else now
    newest_first = sorted(points, key=lambda p: p.time_ns, reverse=True)
    why: dict[str, str] = {}
    for p in newest_first[:keep_last]:
        why.setdefault(p.name, "last")
    counts = {
        "daily": keep_daily,
        "weekly": keep_weekly,
        "monthly": keep_monthly,
        "yearly": keep_yearly,
    }
    for rule, key_of in PRUNE_RULES:
        want = counts[rule]
        if not want:
            continue
        last_key = None
        for p in newest_first:
            key = key_of(time.gmtime(p.time_ns / 1e9))
            if key != last_key:
                last_key = key
                why.setdefault(p.name, rule)
                want -= 1
                if want == 0:
                    break
    for p in newest_first:
        if p.locked_until and p.locked_until > now:
            why[p.name] = "locked"
        elif protected and p.name in protected:
            why[p.name] = "in use by an overlay"
    kept = [(p, why[p.name]) for p in newest_first if p.name in why]
    gone = [p for p in newest_first if p.name not in why]
    return kept, gone


# -- GC -----------------------------------------------------------------------------------
DEFAULT_GRACE_S = 24 * 3600.0
"""How long GC keeps what a deleted point referenced (PBS's grace period)."""

QUARANTINE_DIR = "quarantine"


@dataclass
class GcReport:
    live_chunks: int = 0
    deleted_chunks: int = 0
    deleted_bytes: int = 0
    packs_rewritten: int = 0
    packs_deleted: int = 0
    packs_quarantined: int = 0
    packs_kept_damaged: int = 0
    deleted_points_kept: int = 0
    deleted_points_purged: int = 0
    bytes_before: int = 0
    bytes_after: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def _orphans(repo: Repository, rep: GcReport) -> None:
    """Unindexed pack files: delete ours (recorded, never committed) and empty ones,
    quarantine the rest (GC never deletes data it cannot account for)."""
    writing = repo.writing_packs()
    for path in repo.orphan_packs():
        pid = int(path.stem, 16)
        try:
            empty = pack_is_empty(path)
        except OSError:
            empty = False
        if pid in writing or empty:
            log.warning("deleting unindexed pack %s", path.name)
            path.unlink()
            rep.packs_deleted += 1
            continue
        qdir = repo.root / QUARANTINE_DIR
        qdir.mkdir(mode=0o700, exist_ok=True)
        dest = qdir / f"{path.parent.parent.name}-{path.name}"
        n = 1
        while dest.exists():
            dest = qdir / f"{path.parent.parent.name}-{path.name}.{n}"
            n += 1
        os.rename(path, dest)
        log.warning(
            "moved unindexed pack %s to %s: gc did not write it and cannot read it "
            "(move it back under packs/ and run 'appliance repair --rebuild-index' to "
            "salvage its entries)",
            path.name,
            dest,
        )
        rep.packs_quarantined += 1
    # Every recorded pack is now indexed or gone, except the one being written right now.
    current = repo.open_pack_id()
    left = sorted(writing & ({current} if current is not None else set()))
    if sorted(writing) != left:
        repo.index.commit(meta=[("writing", left or None)])


def _roots(
    repo: Repository, grace_s: float, readers: list[ReaderInfo], rep: GcReport
) -> tuple[list[Point], list[bytes]]:
    """Points GC must keep alive, and the keys of deleted-point records it may purge."""
    roots = repo.list_points()
    cutoff = time.time_ns() - int(grace_s * 1e9)
    if readers:
        # A reader may have seen any point that existed after its lease started.
        cutoff = min(cutoff, min(r.started_ns for r in readers))
    leased = {n for r in readers for n in r.points}
    purge: list[bytes] = []
    for p, deleted_ns in repo.deleted_points():
        if deleted_ns >= cutoff or p.name in leased:
            roots.append(p)
            rep.deleted_points_kept += 1
        else:
            purge.append(point_key(p.source, p.id))
    rep.deleted_points_purged = len(purge)
    return roots, purge


def gc(
    repo: Repository,
    *,
    compact_below: float = 0.8,
    dry_run: bool = False,
    progress: Progress | None = None,
    grace_s: float = DEFAULT_GRACE_S,
) -> GcReport:
    """Mark every chunk reachable from a root, drop the rest from the index, compact packs.

    Roots: every point, every point deleted less than `grace_s` ago, and every point deleted
    after the oldest live reader lease started (or named by one). Compaction copies the live
    payloads of packs whose live share is below `compact_below` (and of packs a rebuild found
    damaged) into new packs (no re-encoding), commits the new locations, then deletes the old
    packs (recorded first as pending deletions so a crash finishes the job on the next open).
    A pack holding a chunk marked bad (or found damaged while copying) is kept as it is, so
    the damaged copy stays marked for `repair --chunks`. Unindexed packs: see `_orphans`.
    """
    repo._need_writer()
    rep = GcReport()
    if not dry_run:
        # Unfinished packs the writer could not index (e.g. the disk was full): drop them
        # first, which also frees the room the index commits below need.
        _orphans(repo, rep)
    readers = live_readers(repo.root)
    roots, purge = _roots(repo, grace_s, readers, rep)
    live: set[bytes] = set()
    for p in roots:
        live.update(point_refs(repo, p))
    packs = repo.index.all_packs()
    bad = repo.bad_chunks()
    rep.bytes_before = sum(int(i["size"]) for i in packs.values())
    live_bytes: dict[int, int] = defaultdict(int)
    dead: list[bytes] = []
    members: dict[int, list[tuple[bytes, Loc]]] = defaultdict(list)
    holds_bad: set[int] = set()
    for cid, loc in repo.index.iter_chunks():
        if cid in live or loc[4] in (Kind.TOMBSTONE, Kind.LOCKREC):
            live_bytes[loc[0]] += loc[2]
            members[loc[0]].append((cid, loc))
            if cid in bad:
                holds_bad.add(loc[0])
        else:
            dead.append(cid)
            rep.deleted_bytes += loc[2]
    rep.live_chunks = sum(len(v) for v in members.values())
    rep.deleted_chunks = len(dead)
    if dry_run:
        return rep
    if purge:
        repo.index.commit(deleted=[(k, None) for k in purge])
    if dead:
        for i in range(0, len(dead), 100_000):
            repo.index.commit(delete_chunks=dead[i : i + 100_000])
    to_compact = [
        pid
        for pid, info in packs.items()
        if live_bytes.get(pid, 0) < compact_below * max(1, int(info["size"]) - 40)
        or info.get("damaged")
    ]
    for pid in sorted(holds_bad.intersection(to_compact)):
        log.info("keeping pack %016x as it is: it holds a chunk marked bad", pid)
    rep.packs_kept_damaged = len(holds_bad.intersection(to_compact))
    to_compact = [pid for pid in to_compact if pid not in holds_bad]
    _drop_packs(repo, _compact(repo, to_compact, members, rep, progress), packs)
    rep.bytes_after = sum(int(i["size"]) for i in repo.index.all_packs().values())
    return rep


def _drop_packs(repo: Repository, pids: list[int], packs: dict[int, dict[str, Any]]) -> None:
    """Unindex then delete packs whose live entries were copied (crash-safe: recorded as
    pending deletions first, which the next open finishes)."""
    if not pids:
        return
    doomed = [(pid, str(packs[pid]["tier"])) for pid in pids]
    repo.index.commit(delete_packs=pids, meta=[("pending_delete", doomed)])
    for pid, tier in doomed:
        repo.forget_pack_fd(pid)
        try:
            pack_path(repo.root, tier, pid).unlink()
        except FileNotFoundError:
            pass
    repo.index.commit(meta=[("pending_delete", None)])


def _compact(
    repo: Repository,
    to_compact: list[int],
    members: dict[int, list[tuple[bytes, Loc]]],
    rep: GcReport,
    progress: Progress | None,
) -> list[int]:
    """Copy the live entries of packs into new packs; returns the packs now safe to delete.

    A pack whose live entry fails its checks while being copied is marked bad and kept.
    """
    doomed: list[int] = []
    total = len(to_compact)
    for n, pid in enumerate(sorted(to_compact), start=1):
        ok = True
        for live_id, loc in sorted(members.get(pid, []), key=lambda m: m[1][1]):
            try:
                payload = repo.read_raw(live_id, loc)
            except (ChunkCorrupt, ChunkMissing) as exc:
                repo.index.mark_bad([(live_id, loc, str(exc), [])])
                log.warning(
                    "chunk %s in pack %016x is damaged (%s): pack kept, chunk marked bad",
                    live_id.hex()[:16],
                    pid,
                    exc,
                )
                rep.packs_kept_damaged += 1
                ok = False
                break
            repo.put_sealed(loc[4], live_id, loc[5], payload, loc[3])
        if ok:
            doomed.append(pid)
            if members.get(pid):
                rep.packs_rewritten += 1
            else:
                rep.packs_deleted += 1
        if progress:
            progress(n, total)
    if to_compact:
        repo.flush()
    return doomed


# -- repair --chunks ----------------------------------------------------------------------
@dataclass
class ChunkRepairReport:
    marked: int = 0
    replaced: dict[str, str] = field(default_factory=dict)  # chunk -> where the good copy is
    cleared: dict[str, str] = field(default_factory=dict)  # chunk -> why its mark went
    unrepairable: dict[str, list[str]] = field(default_factory=dict)  # chunk -> points
    packs_rewritten: int = 0

    @property
    def ok(self) -> bool:
        return not self.unrepairable

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "ok": self.ok}


def repair_chunks(repo: Repository, progress: Progress | None = None) -> ChunkRepairReport:
    """Replace every chunk marked bad by a good copy found in the packs, drop the damaged
    copies (their packs are rewritten without them), and report the chunks that have no good
    copy (with the points that need them). Those stay marked, so they count as absent: the
    next backup of their source stores them afresh, and no incremental reuses them.
    Writer only.
    """
    repo._need_writer()
    rep = ChunkRepairReport()
    bad = repo.bad_chunks()
    rep.marked = len(bad)
    still: dict[bytes, Loc] = {}
    for cid in bad:
        loc = repo.index.lookup(cid)
        if loc is None:
            repo.index.commit(bad=[(cid, None)])
            rep.cleared[cid.hex()] = "no longer indexed"
            continue
        try:
            repo.get(cid, verify_id=True)
        except StoreError:
            still[cid] = loc
            continue
        repo.index.commit(bad=[(cid, None)])
        rep.cleared[cid.hex()] = "reads back intact now"
    old_packs = _heal_manifests(repo, still, rep)
    packs = repo.index.all_packs()
    found: dict[bytes, list[Loc]] = defaultdict(list)
    for n, (pid, info) in enumerate(sorted(packs.items()) if still else [], start=1):
        path = pack_path(repo.root, str(info["tier"]), pid)
        try:
            scan = scan_pack(path, check_payloads=False)
            if not scan.sealed:
                scan = salvage_pack(path)
        except (FormatError, OSError):
            try:
                scan = salvage_pack(path)
            except (FormatError, OSError):
                continue
        for e in scan.entries:
            if e.chunk_id in still:
                loc = (pid, e.offset, e.stored_len, e.raw_len, e.kind, e.codec)
                if loc != still[e.chunk_id]:
                    found[e.chunk_id].append(loc)
        if progress:
            progress(n, len(packs))
    for sid, loc in still.items():
        good = next(
            (
                c
                for c in found.get(sid, [])
                if _copy_ok(repo, pack_path(repo.root, str(packs[c[0]]["tier"]), c[0]), sid, c)
            ),
            None,
        )
        if good is None:
            rep.unrepairable[sid.hex()] = list(bad[ChunkId(sid)].get("points") or [])
            continue
        repo.index.commit(chunks=[(sid, good)])  # also clears the mark
        repo.forget_pack_fd(loc[0])
        rep.replaced[sid.hex()] = f"pack {good[0]:016x}"
        old_packs.add(loc[0])
    # Drop the damaged copies: rewrite their packs without them (unless another chunk of
    # the same pack is still marked bad: that pack stays as it is).
    old_packs -= {loc[0] for sid, loc in still.items() if sid.hex() in rep.unrepairable}
    if old_packs:
        members: dict[int, list[tuple[bytes, Loc]]] = defaultdict(list)
        for cid, loc in repo.index.iter_chunks():
            if loc[0] in old_packs:
                members[loc[0]].append((cid, loc))
        gcrep = GcReport()
        _drop_packs(repo, _compact(repo, sorted(old_packs), members, gcrep, None), packs)
        rep.packs_rewritten = gcrep.packs_rewritten + gcrep.packs_deleted
    return rep


def _heal_manifests(repo: Repository, still: dict[bytes, Loc], rep: ChunkRepairReport) -> set[int]:
    """A damaged manifest chunk is stored again from its catalogue record (which holds the
    sealed manifest too, checked against the id). Returns the packs of the damaged copies."""
    old: set[int] = set()
    records = [*repo.index.point_records(), *repo.index.deleted_records()]
    for source, pid, rec in records:
        cid = bytes(rec.get("c", b""))
        if cid not in still:
            continue
        try:
            manifest = repo._decode_record(rec, f"{source}@{pid}")
        except StoreError:
            continue  # the record is damaged too: no good copy here
        del manifest  # decoded only to prove the record's copy is intact
        repo.put_sealed(Kind.POINT, cid, int(rec["codec"]), bytes(rec["m"]), int(rec["raw"]))
        repo.flush()  # indexes the fresh copy and clears the mark
        rep.replaced[cid.hex()] = "a fresh copy from the catalogue record"
        repo.forget_pack_fd(still[cid][0])
        old.add(still.pop(cid)[0])
    return old


# -- stats --------------------------------------------------------------------------------
def stats(repo: Repository) -> dict[str, Any]:
    """Logical vs stored bytes, dedup and compression ratios, per-source counts."""
    points = repo.list_points()
    logical = 0
    per_source: dict[str, dict[str, int]] = defaultdict(lambda: {"points": 0, "logical_bytes": 0})
    for p in points:
        lb = int(p.manifest.get("stats", {}).get("logical_bytes", 0))
        logical += lb
        per_source[p.source]["points"] += 1
        per_source[p.source]["logical_bytes"] += lb
    unique_raw = stored_payload = n_chunks = 0
    by_kind: dict[str, int] = defaultdict(int)
    for _cid, loc in repo.index.iter_chunks():
        n_chunks += 1
        unique_raw += loc[3]
        stored_payload += loc[2]
        by_kind[Kind(loc[4]).name.lower()] += loc[2]
    packs = repo.index.all_packs()
    pack_bytes = sum(int(i["size"]) for i in packs.values())
    tiers: dict[str, int] = defaultdict(int)
    for info in packs.values():
        tiers[str(info["tier"])] += int(info["size"])
    return {
        "points": len(points),
        "sources": dict(per_source),
        "logical_bytes": logical,
        "unique_bytes": unique_raw,
        "stored_bytes": pack_bytes,
        "chunks": n_chunks,
        "packs": len(packs),
        "tiers": dict(tiers),
        "stored_by_kind": dict(by_kind),
        "dedup_ratio": round(logical / unique_raw, 3) if unique_raw else 0.0,
        "compression_ratio": round(unique_raw / stored_payload, 3) if stored_payload else 0.0,
        "total_ratio": round(logical / pack_bytes, 3) if pack_bytes else 0.0,
        "config": {
            "block_size": repo.config.block_size,
            "hash": repo.config.hash,
            "compression": repo.config.compression,
            "encryption": repo.config.encryption,
        },
    }


# -- rebuild ------------------------------------------------------------------------------
@dataclass
class RebuildReport:
    packs: int = 0
    chunks: int = 0
    points: int = 0
    deleted_points: int = 0
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _copy_ok(repo: Repository, path: Path, cid: bytes, loc: Loc) -> bool:
    """Whether one stored copy of a chunk reads back intact (header, crc, content hash)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(loc[1] - ENTRY_HEADER.size)
            blob = fh.read(ENTRY_HEADER.size + loc[2])
        if len(blob) != ENTRY_HEADER.size + loc[2]:
            return False
        tag, _k, _c, _f, h_id, _s, _r, crc, hcrc = ENTRY_HEADER.unpack_from(blob)
        payload = blob[ENTRY_HEADER.size :]
        if (
            tag != ENTRY_TAG
            or h_id != cid
            or zlib.crc32(blob[:ENTRY_HEADER_CRC_SPAN]) != hcrc
            or zlib.crc32(payload) != crc
        ):
            return False
        data = repo.codec.open_payload(loc[4], loc[5], cid, payload, loc[3])
    except (OSError, StoreError):
        return False
    return repo.codec.chunk_id(data) == cid


def refuse_under_readers(root: Path, what: str) -> None:
    """Raise Locked naming every live reader (PID + command) of the repository at `root`."""
    readers = live_readers(root)
    if readers:
        names = ", ".join(r.describe() for r in readers)
        raise Locked(f"cannot {what} while the repository has live readers: {names}")


def rebuild_index(repo: Repository, progress: Progress | None = None) -> RebuildReport:
    """Recreate the LMDB index and catalogue from the pack files alone.

    A pack with a damaged header, table or entries gives up only its damaged entries
    (`salvage_pack`); it is marked damaged so the next GC rewrites it. Catalogue records are
    checked against their chunk ids before they are trusted. Refuses (Locked) while live
    readers exist: their index is about to move away.
    """
    repo._need_writer()
    refuse_under_readers(repo.root, "rebuild the index")
    rep = RebuildReport()
    paths = sorted((repo.root / "packs").glob(f"*/*/*{PACK_SUFFIX}"))
    chunk_rows: dict[bytes, tuple[int, int, int, int, int, int]] = {}
    pack_rows: list[tuple[int, dict[str, Any]]] = []
    records: list[tuple[Path, bytes, tuple[int, int, int, int, int, int]]] = []
    pack_paths: dict[int, Path] = {}
    copies: dict[bytes, list[Loc]] = defaultdict(list)  # further copies of an id
    max_id = 0
    for n, path in enumerate(paths, start=1):
        try:
            scan = scan_pack(path, check_payloads=False)
            if not scan.sealed or scan.problems:
                raise FormatError("; ".join(scan.problems) or "no table")
        except (FormatError, OSError):
            # header, table or an entry damaged (or a crash left no table): every intact,
            # self-describing entry still counts
            try:
                scan = salvage_pack(path)
            except (FormatError, OSError) as exc:
                rep.problems.append(f"{path.name}: {exc}")
                continue
        rep.problems.extend(f"{path.name}: {p}" for p in scan.problems)
        rep.packs += 1
        max_id = max(max_id, scan.pack_id)
        info: dict[str, Any] = {"tier": scan.tier, "size": scan.valid_end, "sealed": scan.sealed}
        if scan.problems:
            info["damaged"] = "; ".join(scan.problems)[:500]
        pack_rows.append((scan.pack_id, info))
        pack_paths[scan.pack_id] = path
        for e in scan.entries:
            loc = (scan.pack_id, e.offset, e.stored_len, e.raw_len, e.kind, e.codec)
            if chunk_rows.setdefault(e.chunk_id, loc) != loc:
                copies[e.chunk_id].append(loc)
            if e.kind in (Kind.POINT, Kind.TOMBSTONE, Kind.LOCKREC):
                records.append((path, e.chunk_id, loc))
        if progress:
            progress(n, len(paths))
    # An id stored more than once (a damaged copy and the fresh copy that healed it): index
    # the first copy that reads back intact, never a damaged one.
    for cid, more in copies.items():
        for loc in [chunk_rows[cid], *more]:
            if _copy_ok(repo, pack_paths[loc[0]], cid, loc):
                chunk_rows[cid] = loc
                break
    # Decode catalogue records. Tombstones win over manifests; the newest lock record wins
    # (in an immutable repository the latest end date: locks there only extend).
    manifests: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    tombs: dict[str, int] = {}  # point name -> time of its deletion
    last_ids: dict[str, str] = {}
    locks: dict[str, list[dict[str, Any]]] = {}
    for path, cid, loc in records:
        try:
            with open(path, "rb") as fh:
                fh.seek(loc[1])
                payload = fh.read(loc[2])
            data = repo.codec.open_payload(loc[4], loc[5], cid, payload, loc[3])
            if repo.codec.chunk_id(data) != cid:
                raise FormatError("content does not match its id")
            obj = msgpack.unpackb(data)
            if not isinstance(obj, dict):
                raise FormatError("not a map")
        except (StoreError, ValueError, OSError) as exc:
            rep.problems.append(f"catalogue record {cid.hex()[:16]}: {exc}")
            continue
        if loc[4] == Kind.POINT:
            name = f"{obj['source']}@{obj['id']}"
            manifests[name] = (
                obj,
                {"c": cid, "m": payload, "codec": loc[5], "raw": loc[3], "lock": None},
            )
        elif loc[4] == Kind.TOMBSTONE:
            name = str(obj["tombstone"])
            tombs[name] = max(tombs.get(name, 0), int(obj["time_ns"]))
        else:
            locks.setdefault(str(obj["lock"]), []).append(obj)
    point_rows: list[tuple[bytes, dict[str, Any] | None]] = []
    deleted_rows: list[tuple[bytes, dict[str, Any] | None]] = []
    for name, (obj, rec) in manifests.items():
        src = str(obj["source"])
        last_ids[src] = max(last_ids.get(src, ""), str(obj["id"]))
        if name in tombs and tombs[name] >= int(obj["time_ns"]):
            rep.deleted_points += 1
            # back into the grace period it was in (GC purges it when that is over)
            key = point_key(src, str(obj["id"]))
            deleted_rows.append((key, {**rec, "deleted_ns": tombs[name]}))
            continue
        if name in locks:
            rec["lock"], rec["locks"] = restored_lock(locks[name], immutable=repo.config.immutable)
        point_rows.append((point_key(str(obj["source"]), str(obj["id"])), rec))
    old = repo.root / "index.old"
    shutil.rmtree(old, ignore_errors=True)
    repo.index.close()
    os.rename(repo.root / "index", old)
    repo.index = Index(repo.root / "index", readonly=False, keys=repo.keys)
    rows = list(chunk_rows.items())
    for i in range(0, len(rows), 200_000):
        repo.index.commit(chunks=rows[i : i + 200_000])
    repo.index.commit(
        packs=pack_rows,
        points=point_rows,
        deleted=deleted_rows,
        meta=[("next_pack", max_id + 1), *((f"last_id:{k}", v) for k, v in last_ids.items())],
    )
    shutil.rmtree(old, ignore_errors=True)
    rep.chunks = len(chunk_rows)
    rep.points = len(point_rows)
    return rep


def parse_until(text: str) -> float:
    """'2027-01-31' or '2027-01-31T12:00:00' (UTC) -> unix seconds."""
    for fmt in ("%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"):
        try:
            return float(calendar.timegm(time.strptime(text, fmt)))
        except ValueError:
            continue
    raise InvalidArgument(f"bad date {text!r} (expected YYYY-MM-DD)")
