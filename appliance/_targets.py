"""Targets of a whole-disk restore: may this block device or file be overwritten?

Owns the OS-level checks (Linux: /proc, /sys) run before a restore writes a disk image onto a
block device or a file, as Clonezilla and Veeam do:

* **in use** (refused, even with --force): a block device that is mounted (its major:minor in
  /proc/self/mountinfo), has a mounted or swap partition, is swap itself (/proc/swaps), has a
  holder (device-mapper, MD RAID, bcache: /sys/dev/block/M:N/holders, also of its
  partitions), or is open exclusively by someone (an ``O_EXCL`` open fails with EBUSY: the
  kernel's own claim, which also covers filesystems whose mountinfo shows an anonymous
  device such as btrfs). A regular file that backs a loop device or is an active swap file.
* **holds data** (needs a typed confirmation on a terminal, or --force): a regular file with
  any allocated data (an empty or fully sparse file does not count; found with SEEK_DATA,
  without reading it), a block device with a non-zero byte in its first or last MiB (where
  partition tables, backup GPTs, filesystem superblocks and LVM/RAID labels live; a blank
  disk, e.g. one fresh from the factory or zeroed, does not ask). A path that does not exist
  yet is a new file: nothing to ask.

The check is advisory for files; for block devices the restore itself then opens the device
with ``O_EXCL`` (dedupstore.restore_image), so nobody can mount it while it is written.
Other overwriting paths (PXE rescue restores, iSCSI exports of a point onto local disks) are
candidates for the same check. Must not print or prompt: the caller passes `confirm`.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ._mounts import mount_table, unescape_octal
from ._ui import UserError, human_bytes

#: Bytes read at each end of a block device to tell a blank disk from one that holds data.
PROBE_BYTES = 1 << 20

_SYS_DEV_BLOCK = Path("/sys/dev/block")


@dataclass(frozen=True, slots=True)
class Target:
    """A restore target as found on disk."""

    path: Path
    kind: str  # "device", "file" or "new"
    size_bytes: int
    holds_data: bool

    def describe(self) -> str:
        what = "block device" if self.kind == "device" else "file"
        state = "holds data" if self.holds_data else "is blank"
        return f"{self.path} ({what}, {human_bytes(self.size_bytes)}) {state}"


def check_target(path: Path, *, force: bool, confirm: Callable[[Target], bool] | None) -> Target:
    """Refuse `path` if it is in use; if it holds data, go on only with `force` or when
    `confirm(target)` (a prompt on a terminal; None when there is none) returns True.
    Raises UserError with a one-line reason; returns the target when it may be written."""
    target = inspect_target(path)
    reason = in_use(target)
    if reason:
        raise UserError(f"{path} is in use: {reason}; refusing to overwrite it")
    if not target.holds_data or force:
        return target
    if confirm is None:
        raise UserError(
            f"{target.describe()}; pass --force to overwrite it (no terminal to confirm on)"
        )
    if not confirm(target):
        raise UserError(f"not confirmed: {path} was not touched")
    return target


def inspect_target(path: Path) -> Target:
    """Kind, size and whether `path` holds data (module docstring). Raises UserError for a
    target that is neither a regular file nor a block device (a directory is handled by the
    caller: it receives diskN.img files)."""
    try:
        st = os.stat(path)  # a symlink such as /dev/disk/by-id/... is the user's choice
    except FileNotFoundError:
        return Target(path, "new", 0, False)
    if stat.S_ISBLK(st.st_mode):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
            return Target(path, "device", size, _device_holds_data(fd, size))
        finally:
            os.close(fd)
    if stat.S_ISREG(st.st_mode):
        return Target(path, "file", st.st_size, _file_holds_data(path, st.st_size))
    raise UserError(f"{path}: not a regular file or block device")


def _device_holds_data(fd: int, size: int) -> bool:
    for off in sorted({0, max(0, size - PROBE_BYTES)}):
        if os.pread(fd, PROBE_BYTES, off).strip(b"\0"):
            return True
    return False


def _file_holds_data(path: Path, size: int) -> bool:
    if size == 0:
        return False
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.lseek(fd, 0, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no data past offset 0: a fully sparse file
            return False
        raise
    finally:
        os.close(fd)
    return True


def in_use(target: Target) -> str | None:
    """Why `target` must not be overwritten now, or None."""
    if target.kind == "device":
        return _device_in_use(target.path)
    if target.kind == "file":
        return _file_in_use(target.path)
    return None


def _dev_id(rdev: int) -> str:
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def _device_in_use(path: Path) -> str | None:
    rdev = os.stat(path).st_rdev
    mounts = _mounts()
    swaps = _swap_ids()
    # The device itself, then each of its partitions (sysfs: subdirectories with a "partition"
    # file; their "dev" holds major:minor).
    devices = [(str(path), _dev_id(rdev))]
    sys_dir = _SYS_DEV_BLOCK / _dev_id(rdev)
    if sys_dir.is_dir():
        for sub in sorted(sys_dir.resolve().iterdir()):
            if (sub / "partition").exists() and (sub / "dev").exists():
                devices.append((f"partition {sub.name}", (sub / "dev").read_text().strip()))
    for name, dev_id in devices:
        if dev_id in mounts:
            return f"{name} is mounted at {mounts[dev_id]}"
        if dev_id in swaps:
            return f"{name} is active swap"
        holders_dir = _SYS_DEV_BLOCK / dev_id / "holders"
        holders = sorted(p.name for p in holders_dir.iterdir()) if holders_dir.is_dir() else []
        if holders:
            return f"{name} is held by {', '.join(_holder_name(h) for h in holders)}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return "it is open exclusively (mounted, or claimed by another program)"
        raise
    os.close(fd)
    return None


def _holder_name(holder: str) -> str:
    """dm-3 -> "device-mapper dm-3 (vg-root)", md0 -> "md0" (what `lsblk` would show)."""
    dm_name = Path("/sys/class/block", holder, "dm", "name")
    if dm_name.exists():
        return f"device-mapper {holder} ({dm_name.read_text().strip()})"
    return holder


def _mounts() -> dict[str, str]:
    """major:minor -> first mount point, from mountinfo's device field and from mount
    sources that are block device paths (for filesystems reporting an anonymous device)."""
    out: dict[str, str] = {}
    for entry in mount_table():
        out.setdefault(entry.dev, entry.mount_point)
        if entry.source.startswith("/dev/"):
            try:
                st = os.stat(entry.source)
            except OSError:
                continue
            if stat.S_ISBLK(st.st_mode):
                out.setdefault(_dev_id(st.st_rdev), entry.mount_point)
    return out


def _swap_entries() -> list[str]:
    try:
        lines = Path("/proc/swaps").read_text().splitlines()[1:]
    except FileNotFoundError:
        return []
    # /proc/swaps escapes like mountinfo (space, tab, newline, backslash as octal).
    return [unescape_octal(line.split()[0]) for line in lines if line.split()]


def _swap_ids() -> set[str]:
    ids = set()
    for entry in _swap_entries():
        try:
            st = os.stat(entry)
        except OSError:
            continue
        if stat.S_ISBLK(st.st_mode):
            ids.add(_dev_id(st.st_rdev))
    return ids


def _file_in_use(path: Path) -> str | None:
    st = os.stat(path)
    same = (st.st_dev, st.st_ino)
    for entry in _swap_entries():
        try:
            sst = os.stat(entry)
        except OSError:
            continue
        if (sst.st_dev, sst.st_ino) == same:
            return "it is an active swap file"
    for backing in sorted(Path("/sys/block").glob("loop*/loop/backing_file")):
        try:
            bst = os.stat(backing.read_text().strip())
        except OSError:
            continue  # detached meanwhile, or the backing file was deleted
        if (bst.st_dev, bst.st_ino) == same:
            return f"it backs /dev/{backing.parent.parent.name} (losetup -d it first)"
    return None
