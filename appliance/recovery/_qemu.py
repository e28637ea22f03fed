"""QEMU for recovery sessions: the command line and a small synchronous QMP client.

Owns how a session's disks are attached (`-blockdev driver=nbd` per disk, node names
`nbd-<disk>`, a virtio-blk or IDE device per disk with id `dev-<disk>`) and the QMP calls the
orchestration needs (`quit`, `query-block`, `query-named-block-nodes`, block jobs). It must not
start or supervise processes (the supervisor does) nor know about the store.

QMP goes through `qemu.qmp.legacy.QEMUMonitorProtocol` (a sync shim over `QMPClient`): every
caller here is a plain synchronous CLI or daemon, and one connection lives for one operation.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from ._state import BootRequest, SessionError

log = logging.getLogger(__name__)

QEMU_BINARY = os.environ.get("DR_QEMU", "qemu-system-x86_64")


def nbd_node(disk: str) -> str:
    return f"nbd-{disk}"


def device_id(disk: str) -> str:
    return f"dev-{disk}"


def qemu_command(
    req: BootRequest, *, nbd_host: str, nbd_port: int, exports: dict[str, str], qmp_socket: Path
) -> list[str]:
    """The QEMU command line for a session; `exports` maps disk name -> NBD export name.

    The first disk gets bootindex 1. Without `--vnc` there is no display at all (`-display
    none`); the guest console is the serial port, appended to `req.serial_log`.
    """
    binary = shutil.which(QEMU_BINARY) or QEMU_BINARY
    cmd = [
        binary, "-name", f"recovery-{req.name}", "-accel", req.accel,
        "-m", req.memory, "-smp", str(req.cpus),
        "-serial", f"file:{req.serial_log}",
        "-qmp", f"unix:{qmp_socket},server=on,wait=off",
        "-nic", "none",
    ]  # fmt: skip
    if req.vnc:
        cmd += ["-vnc", req.vnc]
    else:
        cmd += ["-display", "none"]
    for i, d in enumerate(req.disks):
        name = str(d["name"])
        node = {
            "driver": "nbd",
            "node-name": nbd_node(name),
            "server": {"type": "inet", "host": nbd_host, "port": str(nbd_port)},
            "export": exports[name],
            "cache": {"direct": False, "no-flush": False},
        }
        cmd += ["-blockdev", json.dumps(node, separators=(",", ":"))]
        if req.bus == "ide":
            dev = f"ide-hd,drive={nbd_node(name)},id={device_id(name)},bus=ide.{i}"
        else:
            dev = f"virtio-blk-pci,drive={nbd_node(name)},id={device_id(name)}"
        if i == 0:
            dev += ",bootindex=1"
        cmd += ["-device", dev]
    cmd += list(req.extra_qemu_args)
    return cmd


class Qmp:
    """One QMP connection to a session's QEMU. Not thread-safe; use as a context manager.

    Commands raise `QMPError` subclasses (`ExecuteError` carries QEMU's error class/desc).
    """

    def __init__(self, socket_path: Path | str, *, timeout_s: float = 10.0) -> None:
        self.socket_path = str(socket_path)
        self.timeout_s = timeout_s
        self._mon: QEMUMonitorProtocol | None = None

    def connect(self) -> Qmp:
        deadline = time.monotonic() + self.timeout_s
        while True:
            # QEMU creates and listens on the socket in one go (server=on,wait=off): wait for
            # the file rather than let qemu.qmp log a failed connect at ERROR level.
            if not os.path.exists(self.socket_path):
                if time.monotonic() > deadline:
                    raise SessionError(f"no QMP socket at {self.socket_path}")
                time.sleep(0.02)
                continue
            mon = QEMUMonitorProtocol(self.socket_path)
            try:
                mon.connect()
            except (OSError, QMPError) as exc:
                mon.close()
                if time.monotonic() > deadline:
                    raise SessionError(
                        f"cannot connect to QMP at {self.socket_path}: {exc}"
                    ) from exc
                time.sleep(0.05)
                continue
            mon.settimeout(self.timeout_s)
            self._mon = mon
            return self

    def close(self) -> None:
        if self._mon is not None:
            try:
                self._mon.close()
            except (OSError, QMPError, EOFError) as exc:
                log.debug("closing QMP connection: %s", exc)
            self._mon = None

    def __enter__(self) -> Qmp:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cmd(self, name: str, **args: object) -> Any:
        assert self._mon is not None, "connect() first"
        log.debug("QMP %s %s", name, args)
        return self._mon.cmd(name, **args)

    def events(self, wait_s: float) -> Iterator[dict[str, Any]]:
        """Events that arrived so far, waiting up to `wait_s` for the first one."""
        assert self._mon is not None, "connect() first"
        try:
            yield from self._mon.get_events(wait=float(wait_s))
        except TimeoutError:
            return

    # -- queries -------------------------------------------------------------------------
    def status(self) -> str:
        return str(self.cmd("query-status")["status"])

    def block_nodes(self) -> list[dict[str, Any]]:
        return list(self.cmd("query-named-block-nodes", flat=True))

    def block_devices(self) -> list[dict[str, Any]]:
        return list(self.cmd("query-block"))

    def drivers_in_use(self) -> set[str]:
        """Block drivers of every node QEMU still has open (e.g. {"qcow2", "file"})."""
        return {str(n["drv"]) for n in self.block_nodes()}

    def device_root_node(self, disk: str) -> str | None:
        """Node name at the root of a guest disk device (changes when a mirror pivots)."""
        for dev in self.block_devices():
            # qdev is the id, or a QOM path such as /machine/peripheral/ID/virtio-backend.
            qdev = str(dev.get("qdev", ""))
            peripheral = f"/machine/peripheral/{device_id(disk)}"
            if qdev in (device_id(disk), peripheral) or qdev.startswith(peripheral + "/"):
                inserted = dev.get("inserted") or {}
                return inserted.get("node-name")
        return None


@contextmanager
def qmp(socket_path: Path | str, *, timeout_s: float = 10.0) -> Iterator[Qmp]:
    with Qmp(socket_path, timeout_s=timeout_s) as q:
        yield q
