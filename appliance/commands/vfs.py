"""`appliance mount` and `appliance umount`: the FUSE view of the repository.

Owns argument handling, the daemon fork and unmounting, including clearing a stale mount of
ours (its daemon was killed: the kernel still lists the mount, every access fails with
ENOTCONN) with a lazy unmount, which both `mount` and `umount` do and say so. The namespace
lives in `vfs.tree`, the pyfuse3 server in `vfs.fuse`; this module must not start trio in the
parent process.

Daemon mode (the default): the parent checks the repository and the point, closes them, then
forks before anything starts trio or FUSE (an LMDB environment must not cross a fork). The child
detaches (setsid, stdio to /dev/null, logs to `--log-file` or syslog), reopens the repository,
mounts, and reports "ok" or its error through a pipe; the parent returns once the mount is up.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import logging.handlers
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

from dedupstore import Repository

from .._mounts import mount_table
from .._ui import UserError
from ..cli import passphrase, repo_path

log = logging.getLogger(__name__)

_READY = b"ok\n"
#: How long `appliance mount` waits for the daemon to report the mount (opening a repository
#: and mounting take well under a second; this only bounds a hung child).
READY_TIMEOUT_S = 60.0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("mount", help="mount the repository or one point with FUSE (read-only)")
    p.add_argument("mountpoint", metavar="MNT", help="an existing empty directory")
    p.add_argument("point", metavar="POINT", nargs="?",
                   help="SOURCE@ID or SOURCE@latest: show only this point's content")
    p.add_argument("-f", "--foreground", action="store_true",
                   help="stay attached (logs to stderr) instead of running as a daemon")
    p.add_argument("--allow-other", action="store_true",
                   help="let other users see the mount (file permissions still apply)")
    p.add_argument("--log-file", help="daemon log file (default: syslog if available)")
    p.set_defaults(func=cmd_mount)

    u = sub.add_parser("umount", help="unmount a mount made by `appliance mount`")
    u.add_argument("mountpoint", metavar="MNT")
    u.set_defaults(func=cmd_umount)


def _passphrase_for(root: Path, args: argparse.Namespace) -> str | None:
    try:
        cfg = json.loads((root / "config.json").read_text())
    except (OSError, ValueError):
        return None  # Repository.open reports the real problem
    return passphrase(args) if cfg.get("encryption", "none") != "none" else None


#: What `appliance mount` mounts: mount_options(fsname="appliance:...") with subtype=appliance.
_OUR_FSTYPE = "fuse.appliance"
_OUR_SOURCE_PREFIX = "appliance:"


def _clear_stale_mount(mnt: Path) -> bool:
    """Lazily unmount a stale mount of ours at `mnt`: a FUSE mount whose server is gone (a
    killed daemon), so every access fails with ENOTCONN and `ismount` says no. Says so in one
    line on stderr and returns True; False if `mnt` is not a stale mount. A stale FUSE mount
    that is not ours is left alone: UserError naming the command that clears it."""
    here = {os.path.abspath(mnt), os.path.join(os.path.realpath(mnt.parent), mnt.name)}
    entries = [e for e in mount_table() if e.mount_point in here]
    if not entries or not entries[-1].fstype.startswith("fuse"):
        return False
    top = entries[-1]  # the mount on top is the one a lookup of MNT reaches
    # statfs always reaches the server (stat may be answered from the kernel's attribute
    # cache for a while after the server died); a dead server's connection is aborted.
    try:
        os.statvfs(mnt)
    except OSError as exc:
        if exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
            return False
    else:
        return False
    if top.fstype != _OUR_FSTYPE or not top.source.startswith(_OUR_SOURCE_PREFIX):
        raise UserError(
            f"{mnt}: a stale FUSE mount of {top.source} ({top.fstype}), not ours; "
            f"clear it with: fusermount3 -u -z {mnt}"
        )
    proc = subprocess.run(
        ["fusermount3", "-u", "-z", top.mount_point], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise UserError(
            f"cannot clear the stale mount at {mnt}: {proc.stderr.strip() or 'fusermount3 failed'}"
        )
    print(
        f"appliance: cleared a stale mount at {mnt} ({top.source}: its server had died)",
        file=sys.stderr,
    )
    return True


def _check_mountpoint(mnt: Path) -> None:
    if not mnt.is_dir():
        raise UserError(f"{mnt}: not a directory")
    if os.path.ismount(mnt):
        raise UserError(f"{mnt}: something is already mounted there")


def cmd_mount(args: argparse.Namespace) -> int:
    # resolve() is safe only before mounting: afterwards an lstat of MNT waits for the server.
    mnt = Path(args.mountpoint).resolve()
    _clear_stale_mount(mnt)
    _check_mountpoint(mnt)
    root = repo_path(args)
    pw = _passphrase_for(root, args)
    # Validate in the parent so mistakes are reported synchronously (and before any fork).
    with Repository.open(root, passphrase=pw) as repo:
        ref = None
        if args.point:
            ref = repo.resolve(args.point).name  # pin "latest" to the point it is now
    if args.foreground:
        return _serve(root, pw, ref, mnt, args.allow_other, None)
    return _daemonize(root, pw, ref, mnt, args)


def _serve(root: Path, pw: str | None, ref: str | None, mnt: Path, allow_other: bool,
           ready_fd: int | None) -> int:
    import dedupstore
    from vfs.fuse import MountError, Operations, mount_options, serve
    from vfs.tree import point_namespace, repository_namespace

    with Repository.open(root, passphrase=pw) as repo:
        if ref is None:
            ns = repository_namespace(repo, dedupstore.open_tree)
        else:
            ns = point_namespace(repo, repo.resolve(ref), dedupstore.open_tree)
        ops = Operations(ns)
        opts = mount_options(allow_other=allow_other, fsname=f"appliance:{ref or root}")

        def ready() -> None:
            log.info("mounted %s at %s", ref or root, mnt)
            if ready_fd is not None:
                os.write(ready_fd, _READY)
                os.close(ready_fd)

        try:
            serve(ops, str(mnt), opts, ready)
        except MountError as exc:
            raise UserError(str(exc)) from exc
    return 0


def _daemonize(root: Path, pw: str | None, ref: str | None, mnt: Path,
               args: argparse.Namespace) -> int:
    rfd, wfd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child: never returns
        os.close(rfd)
        code = 1
        try:
            os.setsid()
            _detach_stdio()
            _daemon_logging(args.log_file, args.verbose)
            code = _serve(root, pw, ref, mnt, args.allow_other, wfd)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.write(wfd, f"{exc}\n".encode(errors="replace"))
            log.exception("mount server failed")
        finally:
            logging.shutdown()
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as pipe:
        ready, _w, _x = select.select([pipe], [], [], READY_TIMEOUT_S)
        if not ready:
            os.kill(pid, signal.SIGTERM)
            raise UserError(f"mount failed: the server did not come up within "
                            f"{READY_TIMEOUT_S:.0f} s")
        answer = pipe.read(len(_READY))
        if answer == _READY:
            return 0
        answer += pipe.read()
    os.waitpid(pid, 0)
    msg = answer.decode(errors="replace").strip() or "the mount server exited"
    raise UserError(f"mount failed: {msg}")


def _detach_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def _daemon_logging(log_file: str | None, verbose: int) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    if log_file:
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("appliance-mount[%(process)d]: %(message)s"))
    else:
        handler = logging.NullHandler()
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)


def cmd_umount(args: argparse.Namespace) -> int:
    mnt = Path(args.mountpoint).absolute()
    if _clear_stale_mount(mnt):
        return 0
    if not os.path.ismount(mnt):
        raise UserError(f"{mnt} is not mounted")
    proc = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        err = proc.stderr.strip()
        if "busy" in err.lower():
            raise UserError(f"{mnt} is busy")
        raise UserError(f"cannot unmount {mnt}: {err or 'fusermount3 failed'}")
    return 0
