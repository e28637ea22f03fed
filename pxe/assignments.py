"""Per-machine boot assignments: which MAC boots what, persisted as one JSON file.

Owns MAC address parsing/normalisation and the file ``<repo>/pxe/assignments.json``::

    {"v": 1, "machines": {"52:54:00:12:34:56": {"action": "rescue", "point": "vm1@3",
                                                "once": true, "dst": "/dev/sda",
                                                "updated_ns": ...}}}

Actions: ``rescue POINT`` (boot the rescue system and restore POINT onto the local disk),
``sanboot POINT`` (boot POINT over iSCSI through a writable overlay), ``local`` (boot the local
disk). It stores point references as plain strings and never checks them against the store:
``appliance/`` validates a point before assigning it. Writes are atomic (temp file + rename)
and serialised between processes with ``flock`` on ``assignments.lock``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ACTIONS = ("rescue", "sanboot", "local")
FILE_NAME = "assignments.json"
LOCK_NAME = "assignments.lock"
FORMAT_VERSION = 1
DEFAULT_DST = "/dev/sda"
_DST_RE = re.compile(r"^/dev/[A-Za-z0-9/_.-]+$")

# 52:54:00:12:34:56, 52-54-00-12-34-56, 5254.0012.3456, 525400123456 (any case).
_MAC_RE = re.compile(r"^[0-9a-f]{12}$")


class AssignmentError(ValueError):
    """Bad input (MAC, action, point) or an unknown machine: a one-line user error."""


def normalize_mac(text: str) -> str:
    """``'52-54-00-AB-cd-01'`` -> ``'52:54:00:ab:cd:01'``. Raises AssignmentError."""
    raw = text.strip().lower()
    for sep in (":", "-", "."):
        raw = raw.replace(sep, "")
    if not _MAC_RE.match(raw):
        raise AssignmentError(
            f"bad MAC address {text!r} (expected six hex bytes, e.g. 52:54:00:12:34:56)"
        )
    if int(raw[:2], 16) & 1:
        raise AssignmentError(f"bad MAC address {text!r}: a multicast address is not a NIC")
    return ":".join(raw[i : i + 2] for i in range(0, 12, 2))


@dataclass(frozen=True, slots=True)
class Assignment:
    """What one machine boots. ``point`` is None exactly for ``local``."""

    mac: str
    action: str
    point: str | None = None
    #: rescue only: after the script has been served once, the machine falls back to ``local``
    #: (otherwise a machine that reboots after its restore would restore again, forever).
    once: bool = True
    updated_ns: int = 0
    #: rescue only: the local disk(s) the point's disks are written to, in order, comma-separated
    #: (``restore.dst``): disk0 onto the first, disk1 onto the second, ...
    dst: str = DEFAULT_DST

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise AssignmentError(
                f"unknown action {self.action!r} (expected one of {', '.join(ACTIONS)})"
            )
        if (self.action == "local") != (self.point is None):
            raise AssignmentError(
                "'local' takes no point"
                if self.action == "local"
                else f"'{self.action}' needs a backup point (SOURCE@ID or SOURCE@latest)"
            )
        if self.point is not None and (not self.point or any(c.isspace() for c in self.point)):
            raise AssignmentError(f"bad point reference {self.point!r}")

        devs = self.dst.split(",")
        for dev in devs:
            if not _DST_RE.match(dev) or ".." in dev:
                raise AssignmentError(f"bad restore destination {dev!r} (e.g. /dev/nvme0n1)")
        if len(set(devs)) != len(devs):
            raise AssignmentError(f"restore destinations repeat a device: {self.dst}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def dsts(self) -> list[str]:
        """The restore destinations in disk order (disk0 first)."""
        return self.dst.split(",")

    def describe(self) -> str:
        if self.action == "local":
            return "local disk"
        extra = ""
        if self.action == "rescue":
            extra = f" onto {self.dst}" + (" (once)" if self.once else "")
        return f"{self.action} {self.point}{extra}"


class AssignmentStore:
    """The assignment file of one repository. Safe to use from several processes and threads:
    every call re-reads the file under an exclusive ``flock``."""

    def __init__(self, pxe_dir: Path) -> None:
        self.dir = Path(pxe_dir)
        self.path = self.dir / FILE_NAME

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the flock

    def _read(self) -> dict[str, Assignment]:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise AssignmentError(f"{self.path} is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("v") != FORMAT_VERSION:
            raise AssignmentError(f"{self.path}: unsupported format (expected v{FORMAT_VERSION})")
        out: dict[str, Assignment] = {}
        for mac, rec in doc.get("machines", {}).items():
            out[mac] = Assignment(
                mac=mac,
                action=rec["action"],
                point=rec.get("point"),
                once=bool(rec.get("once", True)),
                updated_ns=int(rec.get("updated_ns", 0)),
                dst=str(rec.get("dst", DEFAULT_DST)),
            )
        return out

    def _write(self, machines: dict[str, Assignment]) -> None:
        doc = {
            "v": FORMAT_VERSION,
            "machines": {
                mac: {k: v for k, v in a.as_dict().items() if k != "mac"}
                for mac, a in sorted(machines.items())
            },
        }
        tmp = self.path.with_name(f".{FILE_NAME}.{os.getpid()}.tmp")
        with tmp.open("w") as f:
            json.dump(doc, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)

    # -- public API ---------------------------------------------------------------------
    def all(self) -> list[Assignment]:
        with self._locked():
            return sorted(self._read().values(), key=lambda a: a.mac)

    def get(self, mac: str) -> Assignment | None:
        mac = normalize_mac(mac)
        with self._locked():
            return self._read().get(mac)

    def set(
        self,
        mac: str,
        action: str,
        point: str | None = None,
        *,
        once: bool = True,
        dst: str = DEFAULT_DST,
    ) -> Assignment:
        """Create or replace the assignment of ``mac``. Raises AssignmentError on bad input."""
        a = Assignment(normalize_mac(mac), action, point, once, time.time_ns(), dst)
        with self._locked():
            machines = self._read()
            machines[a.mac] = a
            self._write(machines)
        log.info("assigned %s: %s", a.mac, a.describe())
        return a

    def remove(self, mac: str) -> Assignment:
        """Delete the assignment of ``mac``; return it. Raises AssignmentError if none."""
        mac = normalize_mac(mac)
        with self._locked():
            machines = self._read()
            old = machines.pop(mac, None)
            if old is None:
                raise AssignmentError(f"no assignment for {mac}")
            self._write(machines)
        log.info("unassigned %s (was %s)", mac, old.describe())
        return old

    def consume_once(self, mac: str) -> Assignment | None:
        """The assignment to serve now. A one-shot rescue is returned once and replaced by
        ``local`` in the same locked step, so two racing requests cannot both get it."""
        mac = normalize_mac(mac)
        with self._locked():
            machines = self._read()
            a = machines.get(mac)
            if a is not None and a.action == "rescue" and a.once:
                machines[mac] = Assignment(mac, "local", None, True, time.time_ns())
                self._write(machines)
                log.info("%s: one-shot rescue of %s served; next boot is local", mac, a.point)
            return a
