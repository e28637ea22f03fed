"""Recovery-session orchestration: boot, list, stop and migrate sessions.

`boot_session` creates the overlay, writes `request.json`, starts the supervisor daemon and
returns once the VM runs (seconds; it does not wait for the guest OS). `stop_session` ends the
processes (QMP `quit`, then signals by PID), then commits and/or drops the overlay.
`migrate_session` mirrors every disk of a running QEMU session to local files over QMP
(`blockdev-add` + `blockdev-mirror sync=full` + `job-complete`), removes the NBD nodes and
tells the supervisor to stop nbdkit.

This module runs in short-lived CLI processes: it must not own long-running children (the
supervisor does), and it takes the repository writer lock only to commit an overlay.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dedupstore as ds

from ._qemu import Qmp, nbd_node
from ._state import (
    FAILED,
    MIGRATED,
    MIGRATION_FILE,
    REQUEST_FILE,
    RUNNING,
    STATE_FILE,
    STOPPED,
    BootRequest,
    PivotedError,
    ProcRef,
    SessionError,
    SessionInfo,
    list_session_dirs,
    load_session,
    read_json,
    session_dir,
    sessions_root,
    validate_session_name,
    write_json_atomic,
)

log = logging.getLogger(__name__)

BOOT_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
_PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _default_name(point: ds.Point) -> str:
    base = f"{point.source}-{str(point.id)[:8]}"
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in base)


def _unique_name(repo_root: Path, repo: ds.Repository, base: str) -> str:
    taken = {p.name for p in list_session_dirs(repo_root)} | {
        o.name for o in ds.list_overlays(repo)
    }
    if base not in taken:
        return base
    n = 2
    while f"{base}-{n}" in taken:
        n += 1
    return f"{base}-{n}"


def _spawn_supervisor(sdir: Path, keys: ds.Keys | None) -> subprocess.Popen[bytes]:
    """Start the session's supervisor. It gets the repository keys over an inherited pipe
    (ds.KeyHandoff), never the passphrase in its environment: it lives as long as the VM."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH", "")) if p
    )
    env.pop("APPLIANCE_PASSPHRASE", None)
    env.pop(ds.KEY_FD_ENV, None)
    with ds.KeyHandoff(keys) as handoff, open(sdir / "supervisor.log", "ab") as out:
        env.update(handoff.env)
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance.recovery.supervisor", str(sdir)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
            cwd="/", start_new_session=True, close_fds=True, pass_fds=handoff.fds,
        )  # fmt: skip
    # Reap it when it exits, so a long-lived caller (tests, the daemon) collects no zombies.
    threading.Thread(target=proc.wait, name=f"reap-{proc.pid}", daemon=True).start()
    return proc


def boot_session(
    repo_root: Path,
    point_ref: str,
    *,
    name: str | None = None,
    memory: str = "512M",
    cpus: int = 1,
    serial_log: Path | None = None,
    vnc: str | None = None,
    accel: str = "tcg",
    bus: str = "virtio",
    libvirt_uri: str | None = None,
    passphrase: str | None = None,
    timeout_s: float = BOOT_TIMEOUT_S,
) -> SessionInfo:
    """Start a recovery session of `point_ref`; return once its VM runs.

    Raises SessionError (bad name, session exists, supervisor/nbdkit/QEMU failed: the message
    carries the cause) and StoreError (point not found, not an image). On failure nothing is
    left behind: no processes, no overlay, no session directory.
    """
    repo_root = Path(repo_root).resolve()
    with ds.Repository.open(repo_root, passphrase=passphrase) as repo:
        keys = repo.keys
        point = repo.resolve(point_ref)
        if name is None:
            name = _unique_name(repo_root, repo, _default_name(point))
        validate_session_name(name)
        sdir = session_dir(repo_root, name)
        sessions_root(repo_root).mkdir(mode=0o700, exist_ok=True)
        try:
            sdir.mkdir(mode=0o700)
        except FileExistsError:
            raise SessionError(
                f"session {name!r} exists (see `appliance sessions`; end it with "
                "`appliance stop`)"
            ) from None
        try:
            info = ds.create_overlay(repo, point.name, name)
        except BaseException:
            shutil.rmtree(sdir, ignore_errors=True)
            raise
    serial = Path(serial_log).resolve() if serial_log else sdir / "serial.log"
    serial.parent.mkdir(parents=True, exist_ok=True)
    serial.write_bytes(b"")
    req = BootRequest(
        name=name, point=point.name, repo_root=str(repo_root),
        disks=[{"name": d.name, "size": d.size} for d in info.disks],
        memory=memory, cpus=cpus, serial_log=str(serial), vnc=vnc, accel=accel, bus=bus,
        libvirt_uri=libvirt_uri,
    )  # fmt: skip
    write_json_atomic(sdir / REQUEST_FILE, req.to_json())
    proc = _spawn_supervisor(sdir, keys)
    sup = ProcRef.of(proc.pid)
    deadline = time.monotonic() + timeout_s
    error: str | None = None
    while True:
        state: dict[str, Any] = {}
        with contextlib.suppress(FileNotFoundError, ValueError):
            state = read_json(sdir / STATE_FILE)
        if state.get("state") == RUNNING:
            log.info("session %s running (supervisor pid %d)", name, proc.pid)
            return load_session(sdir)
        if state.get("state") == FAILED:
            error = str(state.get("error"))
            break
        if proc.poll() is not None or not sup.alive():
            error = f"supervisor exited with status {proc.returncode}: " + _tail(
                sdir / "supervisor.log"
            )
            break
        if time.monotonic() > deadline:
            error = f"session did not start within {timeout_s:.0f} s: " + _tail(
                sdir / "supervisor.log"
            )
            break
        time.sleep(0.05)
    # Failed: end whatever started, then remove the overlay and the session.
    _end_processes(load_session(sdir), timeout_s=10)
    with ds.Repository.open(repo_root, passphrase=passphrase) as repo, contextlib.suppress(
        ds.StoreError
    ):
        ds.drop_overlay(repo, name)
    shutil.rmtree(sdir, ignore_errors=True)
    raise SessionError(f"boot of {point.name} failed: {error}")


def _tail(path: Path, n_bytes: int = 1500) -> str:
    try:
        return path.read_bytes()[-n_bytes:].decode(errors="replace").strip()
    except OSError:
        return ""


def list_sessions(repo_root: Path) -> list[SessionInfo]:
    out = []
    for path in list_session_dirs(Path(repo_root)):
        try:
            out.append(load_session(path))
        except SessionError as exc:
            log.warning("skipping session %s: %s", path.name, exc)
    return out


def get_session(repo_root: Path, name: str) -> SessionInfo:
    sdir = session_dir(Path(repo_root), name)
    if not sdir.is_dir():
        raise SessionError(f"no session {name!r} (see `appliance sessions`)")
    return load_session(sdir)


def _kill(ref: ProcRef | None, what: str, grace_s: float) -> None:
    """SIGTERM, then SIGKILL after `grace_s`, a process we started (checked against reuse)."""
    if ref is None or not ref.alive():
        return
    log.info("stopping %s pid %d", what, ref.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(ref.pid, sig)
        deadline = time.monotonic() + grace_s
        while ref.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not ref.alive():
            return
    log.warning("%s pid %d survived SIGKILL", what, ref.pid)


def _end_processes(s: SessionInfo, *, timeout_s: float) -> None:
    """End a session's processes: ask the supervisor (it quits QEMU and stops nbdkit), then
    make sure by PID. Safe to call on a session that already ended."""
    if s.supervisor_alive:
        assert s.supervisor is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(s.supervisor.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while s.supervisor_alive and time.monotonic() < deadline:
            time.sleep(0.05)
    _kill(s.supervisor, "supervisor", 2.0)
    # Only if the supervisor could not: QEMU first (it holds NBD connections), then nbdkit.
    _kill(s.qemu, "qemu", 5.0)
    _kill(s.nbdkit, "nbdkit", 3.0)
    if s.libvirt_uri and s.domain and s.state not in (STOPPED, FAILED):
        from ._libvirt import destroy_by_name

        with contextlib.suppress(SessionError):
            destroy_by_name(s.libvirt_uri, s.name)
    if s.nbdkit is not None:
        # A killed nbdkit never fsynced: make completed overlay writes durable now.
        ds.sync_overlays(s.path.parent.parent)


@dataclass
class StopResult:
    name: str
    committed: str | None
    overlay: str  # "dropped" | "kept"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "committed": self.committed, "overlay": self.overlay}


def stop_session(
    repo_root: Path,
    name: str,
    *,
    commit: bool = False,
    keep_overlay: bool = False,
    label: str | None = None,
    passphrase: str | None = None,
    timeout_s: float = STOP_TIMEOUT_S,
) -> StopResult:
    """End session `name`: stop its VM and nbdkit, then commit and/or drop the overlay.

    `commit`: store the overlay's disks as a new point (parent = the booted point); refused
    for a migrated session, whose live disks are the migration targets. Raises SessionError,
    StoreError (commit failed: the overlay is then kept, the session directory removed).
    """
    repo_root = Path(repo_root).resolve()
    s = get_session(repo_root, name)
    if commit and (s.state == MIGRATED or s.migrated_to):
        raise SessionError(
            f"session {name} was migrated to {', '.join(s.migrated_to)}: its current disks "
            "are there, not in the overlay; stop it without --commit"
        )
    _end_processes(s, timeout_s=timeout_s)
    if not (s.path / STATE_FILE).exists() or load_session(s.path).state not in (STOPPED, FAILED):
        st = read_json(s.path / STATE_FILE) if (s.path / STATE_FILE).exists() else {}
        st.update(state=STOPPED, stopped_by="appliance stop", ended_at=time.time())
        write_json_atomic(s.path / STATE_FILE, st)
    committed: str | None = None
    overlay = "kept"
    try:
        if commit:
            with ds.Repository.open(repo_root, passphrase=passphrase, writable=True) as repo:
                point = ds.commit_overlay(repo, name, label=label or f"recovery session {name}")
                committed = point.name
            log.info("committed overlay %s as %s", name, committed)
        if not keep_overlay:
            with ds.Repository.open(repo_root, passphrase=passphrase) as repo:
                try:
                    ds.drop_overlay(repo, name)
                except ds.NotFound:
                    log.info("overlay %s was already gone", name)
            overlay = "dropped"
    finally:
        # The serial log survives when it lives outside the session directory (--serial).
        shutil.rmtree(s.path, ignore_errors=True)
    return StopResult(name, committed, overlay)


# -- migration ------------------------------------------------------------------------------


@dataclass
class MigrationTarget:
    disk: str
    target: Path
    fmt: str
    node: str


def _wait_jobs(
    q: Qmp, job_ids: set[str], *, want: str, timeout_s: float, vm_alive: Any
) -> None:
    """Wait until every job in `job_ids` is `ready` (want="ready") or gone (want="gone").

    Consumes BLOCK_JOB_READY / BLOCK_JOB_COMPLETED / BLOCK_JOB_ERROR events and re-checks
    `query-block-jobs` each round, so a missed event cannot hang us.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        for ev in q.events(wait_s=0.5):
            kind = ev.get("event")
            data = ev.get("data", {})
            if kind in ("BLOCK_JOB_ERROR",) and data.get("device") in job_ids:
                raise SessionError(f"mirror job {data.get('device')} failed: {data}")
            if kind == "BLOCK_JOB_COMPLETED" and data.get("error"):
                raise SessionError(f"mirror job {data.get('device')} failed: {data['error']}")
        jobs = {j["device"]: j for j in q.cmd("query-block-jobs")}
        if want == "ready":
            missing = job_ids - set(jobs)
            if missing:
                raise SessionError(f"mirror job(s) {sorted(missing)} vanished before ready")
            if all(jobs[j].get("ready") for j in job_ids):
                return
        elif not (job_ids & set(jobs)):
            return
        if not vm_alive():
            raise SessionError("QEMU exited during the migration")
        if time.monotonic() > deadline:
            raise SessionError(f"mirror not {want} after {timeout_s:.0f} s: {jobs}")


def _mirror_qmp(
    s: SessionInfo, qmp_socket: str, targets: list[MigrationTarget], *, timeout_s: float
) -> None:
    """QEMU backend of `migrate_session`: blockdev-mirror every disk, pivot, drop NBD nodes."""
    with Qmp(qmp_socket, timeout_s=30) as q:
        pivoted = False
        try:
            for t in targets:
                q.cmd("blockdev-add", **{
                    "driver": t.fmt, "node-name": t.node,
                    "file": {"driver": "file", "filename": str(t.target)},
                })  # fmt: skip
            for t in targets:
                source = q.device_root_node(t.disk) or nbd_node(t.disk)
                log.info("mirroring %s (%s) to %s", t.disk, source, t.target)
                q.cmd("blockdev-mirror", **{
                    "job-id": t.node, "device": source, "target": t.node, "sync": "full",
                })  # fmt: skip
            jobs = {t.node for t in targets}
            _wait_jobs(q, jobs, want="ready", timeout_s=timeout_s, vm_alive=lambda: s.qemu_alive)
            # From the first job-complete on, a disk may already run on its target: a failure
            # from here keeps every target file (PivotedError) rather than cancel and delete.
            pivoted = True
            for t in targets:
                q.cmd("job-complete", id=t.node)
            _wait_jobs(q, jobs, want="gone", timeout_s=60, vm_alive=lambda: s.qemu_alive)
            for t in targets:
                root = q.device_root_node(t.disk)
                if root != t.node:
                    raise PivotedError(f"{t.disk}: guest disk is on {root!r}, not {t.node!r}")
                q.cmd("blockdev-del", **{"node-name": nbd_node(t.disk)})
            left = [n["node-name"] for n in q.block_nodes() if n.get("drv") == "nbd"]
            if left:
                raise PivotedError(f"QEMU still has NBD nodes {left}")
        except Exception as exc:
            if pivoted:
                if isinstance(exc, PivotedError):
                    raise
                raise PivotedError(f"after the pivot: {exc}") from exc
            for t in targets:
                with contextlib.suppress(Exception):
                    q.cmd("block-job-cancel", device=t.node, force=True)
            time.sleep(0.2)
            for t in targets:
                with contextlib.suppress(Exception):
                    q.cmd("blockdev-del", **{"node-name": t.node})
            raise


def migrate_session(
    repo_root: Path,
    name: str,
    to_dir: Path,
    *,
    fmt: str = "qcow2",
    timeout_s: float = 3600.0,
) -> list[MigrationTarget]:
    """Move a running session's disks to `to_dir` while the VM runs.

    Per disk a target file is created (`qemu-img create`). QEMU sessions: `blockdev-add` it,
    `blockdev-mirror sync=full` from the NBD node; when every job is ready, `job-complete`
    pivots the guest onto the target (QEMU mirrors guest writes made during the copy too, so
    none is lost); then the NBD nodes are deleted (`blockdev-del`) and QEMU is checked to have
    no `nbd` node left. libvirt sessions: `virDomainBlockCopy` + pivot (`_libvirt.block_copy`).
    Then the supervisor stops nbdkit (SIGUSR1). Raises SessionError; on failure before the
    pivot the jobs are cancelled, the targets removed, and the VM keeps running from NBD.
    """
    if fmt not in ("qcow2", "raw"):
        raise SessionError(f"unsupported target format {fmt!r} (qcow2 or raw)")
    s = get_session(Path(repo_root).resolve(), name)
    if s.backend == "libvirt":
        if s.effective_state != RUNNING or not s.supervisor_alive or not s.libvirt_uri:
            raise SessionError(f"session {name} is {s.effective_state}, not running")
    elif s.effective_state != RUNNING or not s.qemu_alive or not s.qmp_socket:
        raise SessionError(f"session {name} is {s.effective_state}, not running")
    req = BootRequest.from_json(read_json(s.path / REQUEST_FILE))
    to_dir = Path(to_dir).resolve()
    to_dir.mkdir(parents=True, exist_ok=True)
    targets: list[MigrationTarget] = []
    for d in req.disks:
        disk = str(d["name"])
        path = to_dir / f"{name}-{disk}.{fmt}"
        if path.exists():
            raise SessionError(f"{path} exists: not overwriting it")
        targets.append(MigrationTarget(disk, path, fmt, f"mig-{disk}"))
    created: list[Path] = []
    try:
        for t, d in zip(targets, req.disks, strict=True):
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", t.fmt, str(t.target), str(d["size"])],
                check=True, capture_output=True,
            )  # fmt: skip
            created.append(t.target)
        if s.backend == "libvirt":
            from ._libvirt import block_copy

            assert s.libvirt_uri is not None
            block_copy(s.libvirt_uri, name, [(t.disk, str(t.target), t.fmt) for t in targets],
                       timeout_s=timeout_s)  # fmt: skip
        else:
            assert s.qmp_socket is not None
            _mirror_qmp(s, s.qmp_socket, targets, timeout_s=timeout_s)
    except PivotedError:
        raise
    except BaseException:
        for p in created:
            p.unlink(missing_ok=True)
        raise
    write_json_atomic(s.path / MIGRATION_FILE, {
        "migrated_at": time.time(),
        "disks": [{"disk": t.disk, "target": str(t.target), "format": t.fmt, "node": t.node}
                  for t in targets],
    })  # fmt: skip
    if s.supervisor_alive:
        assert s.supervisor is not None
        os.kill(s.supervisor.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            cur = load_session(s.path)
            if cur.state == MIGRATED and not cur.nbdkit_alive:
                break
            time.sleep(0.05)
        else:
            raise SessionError("the disks were migrated, but the supervisor did not stop nbdkit")
    return targets
