"""Per-machine boot assignments: which MAC boots what, persisted as one JSON file.

Owns MAC address parsing/normalisation and the file ``<repo>/pxe/assignments.json`` (0600:
it holds each assignment's secret token)::

    {"v": 1, "machines": {"52:54:00:12:34:56": {"action": "rescue", "point": "vm1@3",
                                                "once": true, "dst": "/dev/sda",
                                                "token": "<hex>", "fetched_ns": 0,
                                                "pinned": null, "updated_ns": ...}}}

Every ``assign`` arms the assignment with a fresh random ``token``. The machine's boot script
(which carries the secrets: the rescue system's callback token, NBD PSK, CHAP) is handed out
once per arming: :meth:`AssignmentStore.fetch` marks it spent (``fetched_ns``) in the same
locked step, so a second fetch (another client knowing the MAC) gets nothing. A rescue stays
armed until the rescue system reports success with the token (:meth:`AssignmentStore.complete`):
only then does a one-shot rescue turn into ``local``. A failed restore leaves it armed.

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
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
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
    #: rescue only: after the rescue system reported success, the machine falls back to
    #: ``local`` (otherwise a machine that reboots after its restore would restore again).
    once: bool = True
    updated_ns: int = 0
    #: rescue only: the local disk(s) the point's disks are written to, in order, comma-separated
    #: (``restore.dst``): disk0 onto the first, disk1 onto the second, ...
    dst: str = DEFAULT_DST
    #: per-arming secret: the rescue system's success callback names it; "" for ``local``
    token: str = ""
    #: when the boot script of this arming was handed out (0: not yet): it is handed out once
    fetched_ns: int = 0
    #: rescue/sanboot: the point id the script was made for (``@latest`` pinned at fetch)
    pinned: str | None = None

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

    def public_dict(self) -> dict[str, Any]:
        """``as_dict`` without the secret token (for listings)."""
        d = self.as_dict()
        d.pop("token", None)
        return d

    @property
    def armed(self) -> bool:
        """A boot script is waiting to be fetched (rescue/sanboot, not fetched yet)."""
        return self.action != "local" and not self.fetched_ns

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
        if self.fetched_ns:
            extra += " (script fetched; assign again to re-arm)"
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
                token=str(rec.get("token", "")),
                fetched_ns=int(rec.get("fetched_ns", 0)),
                pinned=rec.get("pinned"),
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
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds tokens
        with os.fdopen(fd, "w") as f:
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
        """Create or replace (re-arm) the assignment of ``mac`` with a fresh token.
        Raises AssignmentError on bad input."""
        token = secrets.token_hex(16) if action != "local" else ""
        a = Assignment(normalize_mac(mac), action, point, once, time.time_ns(), dst, token)
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

    def fetch(self, mac: str, pin: Callable[[Assignment], str] | None = None) -> Fetch:
        """The assignment of ``mac`` as its boot-script request sees it, in one locked step.

        ``local``/none: returned as is (``first`` False). Rescue/sanboot armed: marked spent
        (``fetched_ns``), ``pinned`` set to ``pin(a)`` (the point id the script is made for),
        and ``first`` is True: the caller may hand out the secrets. Already spent: ``first``
        False, nothing changes. Exceptions of ``pin`` propagate and leave the record armed.
        """
        mac = normalize_mac(mac)
        with self._locked():
            machines = self._read()
            a = machines.get(mac)
            if a is None or not a.armed:
                return Fetch(a, False)
            pinned = pin(a) if pin is not None else a.point
            a = replace(a, fetched_ns=time.time_ns(), pinned=pinned)
            machines[mac] = a
            self._write(machines)
        log.info("%s: boot script for %s handed out; spent until assigned again", mac, a.point)
        return Fetch(a, True)

    def unfetch(self, mac: str, token: str) -> None:
        """Undo :meth:`fetch` of the arming ``token`` (the script could not be made)."""
        mac = normalize_mac(mac)
        with self._locked():
            machines = self._read()
            a = machines.get(mac)
            if a is not None and a.token == token:
                machines[mac] = replace(a, fetched_ns=0, pinned=None)
                self._write(machines)

    def complete(self, token: str) -> Assignment | None:
        """The rescue system of the arming ``token`` reports success. A one-shot rescue turns
        into ``local``; ``--always`` is re-armed with a new token. Returns the completed
        assignment, or None if no rescue assignment carries ``token`` (wrong or spent)."""
        if not token:
            return None
        with self._locked():
            machines = self._read()
            for mac, a in machines.items():
                if a.action == "rescue" and a.token and secrets.compare_digest(a.token, token):
                    if a.once:
                        machines[mac] = Assignment(mac, "local", None, True, time.time_ns())
                    else:
                        machines[mac] = replace(
                            a,
                            token=secrets.token_hex(16),
                            fetched_ns=0,
                            pinned=None,
                            updated_ns=time.time_ns(),
                        )
                    self._write(machines)
                    log.info(
                        "%s: rescue of %s reported done; next boot is %s",
                        mac,
                        a.pinned or a.point,
                        "local" if a.once else "rescue again",
                    )
                    return a
        return None

    def find_token(self, token: str) -> Assignment | None:
        """The assignment armed with ``token`` (read-only), or None."""
        if not token:
            return None
        with self._locked():
            for a in self._read().values():
                if a.token and secrets.compare_digest(a.token, token):
                    return a
        return None

    def write_pinned_points(self, path: Path) -> list[str]:
        """Write :meth:`pinned_points` to ``path`` (one per line, atomically) in the same
        locked step, so racing writers never leave an older list behind. Returns them."""
        with self._locked():
            names = sorted({a.pinned for a in self._read().values()
                            if a.action == "rescue" and a.fetched_ns and a.pinned})  # fmt: skip
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text("".join(f"{n}\n" for n in names))
            tmp.replace(path)
        return names

    def pinned_points(self) -> list[str]:
        """Point ids the NBD server may export now: the pinned points of rescue assignments
        whose script was handed out and whose restore has not reported success."""
        with self._locked():
            return sorted(
                {
                    a.pinned
                    for a in self._read().values()
                    if a.action == "rescue" and a.fetched_ns and a.pinned
                }
            )


@dataclass(frozen=True, slots=True)
class Fetch:
    """What :meth:`AssignmentStore.fetch` found: the assignment (None: unassigned) and whether
    this request is the one-time first fetch of its arming."""

    assignment: Assignment | None
    first: bool
