"""appliance.recovery: instant VM recovery sessions (boot a backup point, run it, migrate it).

A session = an overlay on an image point (dedupstore) + nbdkit exporting it (nbd.NbdServer) +
a VM attached over NBD (QEMU via QMP, or a libvirt domain), owned by a per-session supervisor
daemon (`supervisor.py`) with its state under `<repo>/sessions/<name>/` (`_state.py`).
`_sessions.py` holds the operations the CLI calls; `_qemu.py` the QEMU command line and QMP
client; `_libvirt.py` the domain XML.

This package wires dedupstore and nbd; it must not serve NBD itself nor touch store internals
(only `dedupstore`'s public surface), and nothing below `appliance/` may import it.
"""

from ._qemu import Qmp, qemu_command
from ._sessions import (
    MigrationTarget,
    StopResult,
    boot_session,
    get_session,
    list_sessions,
    migrate_session,
    stop_session,
)
from ._state import (
    FAILED,
    MIGRATED,
    RUNNING,
    STARTING,
    STOPPED,
    BootRequest,
    ProcRef,
    SessionError,
    SessionInfo,
)

__all__ = [
    "FAILED",
    "MIGRATED",
    "RUNNING",
    "STARTING",
    "STOPPED",
    "BootRequest",
    "MigrationTarget",
    "ProcRef",
    "Qmp",
    "SessionError",
    "SessionInfo",
    "StopResult",
    "boot_session",
    "get_session",
    "list_sessions",
    "migrate_session",
    "qemu_command",
    "stop_session",
]
