"""The mount table as this process sees it (/proc/self/mountinfo), parsed in one place.

Owns :func:`mount_table`. Used by the restore target checks (is a device mounted?) and by
`appliance mount/umount` (is a FUSE mount of ours stale?). Must not change any mount.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")


@dataclass(frozen=True, slots=True)
class MountEntry:
    """One line of mountinfo (proc(5)): the fields this package needs."""

    dev: str  # "major:minor" of the filesystem (anonymous for FUSE, btrfs...)
    mount_point: str
    fstype: str  # e.g. "ext4", "fuse.appliance"
    source: str  # e.g. "/dev/loop0", "appliance:vm1@..."


def mount_table() -> list[MountEntry]:
    """Every mount, in mount order (a later entry at the same point is on top)."""
    out = []
    for line in MOUNTINFO.read_text().splitlines():
        fields = line.split()
        # id parent dev root mount-point options [optional...] - fstype source super-options
        if len(fields) < 10 or "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        out.append(
            MountEntry(
                fields[2],
                unescape_octal(fields[4]),
                fields[sep + 1],
                unescape_octal(fields[sep + 2]),
            )
        )
    return out


def unescape_octal(field: str) -> str:
    r"""mountinfo escapes space, tab, newline and backslash as octal (\040...); other bytes
    are raw, so the result is decoded like any os path (surrogateescape)."""
    raw = field.encode("utf-8", "surrogateescape")
    out = bytearray()
    i = 0
    while i < len(raw):
        digits = raw[i + 1 : i + 4]
        if raw[i] == 0x5C and len(digits) == 3 and digits.isdigit():
            out.append(int(digits, 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return bytes(out).decode("utf-8", "surrogateescape")
