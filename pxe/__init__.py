"""pxe: network boot front-end — proxy-DHCP/TFTP (dnsmasq), boot HTTP, iPXE scripts, iSCSI.

Modules: ``assignments`` (which MAC boots what, ``<repo>/pxe/assignments.json``), ``ipxe``
(script text), ``dnsmasq`` (proxy-DHCP + TFTP configuration and process), ``http`` (boot HTTP
server with Range support, the rescue callback, optional HTTPS), ``iscsi`` (the appliance's
one tgtd, targets, portal owners, nbdfuse backing files), ``_proc`` (detached helpers stopped
by PID).

It receives plain values from ``appliance/`` — NBD URIs, paths, a ``script_for`` callback —
and never imports ``nbd/``, ``vfs/`` or the store: ``appliance/commands/pxe.py`` wires those.
"""

from pxe.assignments import ACTIONS, Assignment, AssignmentError, AssignmentStore, normalize_mac
from pxe.dnsmasq import DnsmasqError, DnsmasqProcess, ProxyDhcpConfig, render_config
from pxe.http import BootHttpServer
from pxe.ipxe import ScriptError
from pxe.iscsi import IscsiError, TargetDaemon, Tgt, port_owners, target_iqn

__all__ = [
    "ACTIONS",
    "Assignment",
    "AssignmentError",
    "AssignmentStore",
    "BootHttpServer",
    "DnsmasqError",
    "DnsmasqProcess",
    "IscsiError",
    "ProxyDhcpConfig",
    "ScriptError",
    "TargetDaemon",
    "Tgt",
    "normalize_mac",
    "port_owners",
    "render_config",
    "target_iqn",
]
