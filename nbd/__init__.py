"""nbd: exports backup points and overlays over NBD (nbdkit + a Python plugin).

Export names: `SOURCE@ID/diskN` and `SOURCE@latest/diskN` (read-only image points),
`overlay/NAME/diskN` (writable overlays). `NbdServer` runs the server as a child process;
`_exports.Catalogue` is the protocol-free core the nbdkit plugin (`_plugin.py`) adapts.
Imports only `dedupstore`'s public surface; never imports vfs/ or pxe/.
"""

from ._exports import OVERLAY_PREFIX, Catalogue, Export, overlay_export_name, point_export_name
from .server import (
    DEFAULT_LISTEN,
    NbdServer,
    NbdServerError,
    free_port,
    is_loopback,
    parse_listen,
    write_psk_file,
)

__all__ = [
    "DEFAULT_LISTEN",
    "OVERLAY_PREFIX",
    "Catalogue",
    "Export",
    "NbdServer",
    "NbdServerError",
    "free_port",
    "is_loopback",
    "overlay_export_name",
    "parse_listen",
    "point_export_name",
    "write_psk_file",
]
