"""libvirt backend: a transient-free, defined domain whose disks are NBD network disks.

Owns the domain XML for a session (`type='qemu'` for TCG, `kvm` with `--accel kvm`; one
`<disk type='network'><source protocol='nbd' name='overlay/S/diskN'>` per disk; serial console
to the session's log file), define/start/destroy/undefine, and the live move of the disks onto
local files (`block_copy`: virDomainBlockCopy + pivot, what `appliance migrate` does). Imports
`libvirt` lazily so the rest of the package works without it. Must not start libvirtd (the host
or a test does).
"""

from __future__ import annotations

import contextlib
import logging
import time
import xml.etree.ElementTree as ET
from typing import Any

from ._state import BootRequest, PivotedError, SessionError

log = logging.getLogger(__name__)

_DISK_TARGETS = "abcdefghijklmnopqrstuvwxyz"


def _memory_kib(text: str) -> int:
    units = {"K": 1, "M": 1024, "G": 1024 * 1024}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text) * 1024  # plain numbers are MiB, as QEMU's -m


def domain_name(session: str) -> str:
    return f"recovery-{session}"


def domain_xml(req: BootRequest, *, nbd_host: str, nbd_port: int, exports: dict[str, str]) -> str:
    """Domain XML for the session (see module docstring)."""
    dom = ET.Element("domain", type="kvm" if req.accel == "kvm" else "qemu")
    ET.SubElement(dom, "name").text = domain_name(req.name)
    ET.SubElement(dom, "memory", unit="KiB").text = str(_memory_kib(req.memory))
    ET.SubElement(dom, "vcpu").text = str(req.cpus)
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine="pc").text = "hvm"
    features = ET.SubElement(dom, "features")  # without ACPI a guest poweroff only halts
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = "restart"
    ET.SubElement(dom, "on_crash").text = "destroy"
    devices = ET.SubElement(dom, "devices")
    for i, d in enumerate(req.disks):
        name = str(d["name"])
        disk = ET.SubElement(devices, "disk", type="network", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type="raw", cache="writeback")
        src = ET.SubElement(disk, "source", protocol="nbd", name=exports[name])
        ET.SubElement(src, "host", name=nbd_host, port=str(nbd_port))
        bus = "ide" if req.bus == "ide" else "virtio"
        prefix = "hd" if bus == "ide" else "vd"
        ET.SubElement(disk, "target", dev=f"{prefix}{_DISK_TARGETS[i]}", bus=bus)
        ET.SubElement(disk, "alias", name=f"ua-{name}")
        if i == 0:
            ET.SubElement(disk, "boot", order="1")
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=req.serial_log)
    ET.SubElement(serial, "target", port="0")
    console = ET.SubElement(devices, "console", type="file")
    ET.SubElement(console, "source", path=req.serial_log)
    ET.SubElement(console, "target", type="serial", port="0")
    if req.vnc:
        port = 5900 + int(req.vnc.lstrip(":").split(",")[0])
        ET.SubElement(devices, "graphics", type="vnc", port=str(port), listen="127.0.0.1")
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")


def _quiet(ctx: object, err: object) -> None:
    log.debug("libvirt: %s", err)


def connect(uri: str) -> Any:
    try:
        import libvirt
    except ImportError as exc:
        raise SessionError("libvirt-python is not installed") from exc
    # libvirt's default handler prints every error on stderr, even the ones we handle.
    libvirt.registerErrorHandler(_quiet, None)
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise SessionError(f"cannot connect to libvirt at {uri}: {exc}") from exc


def define_and_start(
    req: BootRequest, *, nbd_host: str, nbd_port: int, exports: dict[str, str]
) -> tuple[Any, Any]:
    """Define and start the domain; returns (connection, domain). Raises SessionError."""
    import libvirt

    assert req.libvirt_uri is not None
    conn = connect(req.libvirt_uri)
    xml = domain_xml(req, nbd_host=nbd_host, nbd_port=nbd_port, exports=exports)
    log.info("defining libvirt domain %s", domain_name(req.name))
    try:
        dom = conn.defineXML(xml)
    except libvirt.libvirtError as exc:
        conn.close()
        raise SessionError(f"libvirt refused the domain: {exc}") from exc
    try:
        dom.create()
    except libvirt.libvirtError as exc:
        try:
            dom.undefine()
        finally:
            conn.close()
        raise SessionError(f"libvirt could not start the domain: {exc}") from exc
    return conn, dom


def is_active(dom: Any) -> bool:
    import libvirt

    try:
        return bool(dom.isActive())
    except libvirt.libvirtError:
        return False


def destroy(conn: Any, dom: Any) -> None:
    """Power the domain off (hard) and undefine it; tolerate a domain already gone."""
    import libvirt

    for op in (dom.destroy, dom.undefine):
        try:
            if op is dom.destroy and not dom.isActive():
                continue
            op()
        except libvirt.libvirtError as exc:
            log.info("libvirt %s: %s", op.__name__, exc)
    try:
        conn.close()
    except libvirt.libvirtError as exc:
        log.debug("closing libvirt connection: %s", exc)


def destroy_by_name(uri: str, session: str) -> None:
    import libvirt

    conn = connect(uri)
    try:
        dom = conn.lookupByName(domain_name(session))
    except libvirt.libvirtError:
        conn.close()
        return
    destroy(conn, dom)


def _live_disks(dom: Any) -> list[ET.Element]:
    """The <disk> elements of the running domain (XML from our own libvirtd: trusted)."""
    return list(ET.fromstring(dom.XMLDesc()).iterfind("devices/disk"))  # noqa: S314


def disk_devs(dom: Any) -> dict[str, tuple[str, str]]:
    """{our disk name: (libvirt target dev, bus)} from the live XML (user aliases `ua-NAME`)."""
    out: dict[str, tuple[str, str]] = {}
    for disk in _live_disks(dom):
        alias, target = disk.find("alias"), disk.find("target")
        if alias is None or target is None:
            continue
        name = alias.get("name", "")
        if name.startswith("ua-"):
            out[name[3:]] = (target.get("dev", ""), target.get("bus", ""))
    return out


def _file_disk_xml(path: str, fmt: str, dev: str | None = None, bus: str | None = None) -> str:
    disk = ET.Element("disk", type="file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type=fmt)
    ET.SubElement(disk, "source", file=path)
    if dev:
        ET.SubElement(disk, "target", dev=dev, bus=bus or "virtio")
    return ET.tostring(disk, encoding="unicode")


def block_copy(
    uri: str, session: str, targets: list[tuple[str, str, str]], *, timeout_s: float
) -> None:
    """Move the running domain's disks onto local files: `virDomainBlockCopy`, then pivot.

    `targets`: (disk name, existing target file, "qcow2"|"raw"). Every copy job must reach
    ready (libvirt mirrors the guest's writes made meanwhile) before any disk pivots; then the
    persistent definition is pointed at the files too, so a restart of the domain does not go
    back to the (soon stopped) NBD export. Before the pivot a failure cancels every job and the
    VM keeps running from NBD. Raises SessionError.
    """
    import libvirt

    conn = connect(uri)
    started: list[str] = []
    pivoted: list[str] = []
    try:
        try:
            dom = conn.lookupByName(domain_name(session))
        except libvirt.libvirtError as exc:
            raise SessionError(f"libvirt domain {domain_name(session)} not found: {exc}") from exc
        devs = disk_devs(dom)
        missing = [d for d, _p, _f in targets if d not in devs]
        if missing:
            raise SessionError(f"the domain has no disk(s) {missing} (aliases ua-NAME)")
        flags = (libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT
                 | libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB)  # fmt: skip
        try:
            for disk, path, fmt in targets:
                dev = devs[disk][0]
                log.info("libvirt block copy of %s (%s) to %s", disk, dev, path)
                dom.blockCopy(dev, _file_disk_xml(path, fmt), None, flags)
                started.append(dev)
            _wait_copies_ready(dom, started, timeout_s=timeout_s)
            for dev in started:
                _pivot(dom, dev)
                pivoted.append(dev)
        except libvirt.libvirtError as exc:
            if pivoted:  # some disks already run on their targets: those files must stay
                raise PivotedError(f"libvirt block copy failed after {pivoted} moved: {exc}"
                                   ) from exc  # fmt: skip
            raise SessionError(f"libvirt block copy failed: {exc}") from exc
        now = disk_sources(dom)
        for disk, path, _fmt in targets:
            if now.get(devs[disk][0]) != path:
                raise PivotedError(f"{disk}: the domain runs on {now.get(devs[disk][0])!r}")
        for disk, path, fmt in targets:
            dev, bus = devs[disk]
            try:
                dom.updateDeviceFlags(_file_disk_xml(path, fmt, dev, bus),
                                      libvirt.VIR_DOMAIN_AFFECT_CONFIG)  # fmt: skip
            except libvirt.libvirtError as exc:  # the live VM is fine; only its definition
                log.warning("%s: could not update the persistent definition: %s", disk, exc)
    finally:
        for dev in started:
            if dev not in pivoted:  # back to NBD for the disks that did not move
                with contextlib.suppress(libvirt.libvirtError):
                    dom.blockJobAbort(dev, 0)
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


def _pivot(dom: Any, dev: str, timeout_s: float = 10.0) -> None:
    """Pivot `dev` onto its copy; libvirt may call a job that has copied everything "not ready"
    for a moment (its READY event is still on the way): retry briefly."""
    import libvirt

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            dom.blockJobAbort(dev, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
            return
        except libvirt.libvirtError as exc:
            if "ready" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _wait_copies_ready(dom: Any, devs: list[str], *, timeout_s: float) -> None:
    """Poll the copy jobs until each has copied everything (`cur == end`), i.e. is ready."""
    deadline = time.monotonic() + timeout_s
    while True:
        if not dom.isActive():
            raise SessionError("the domain stopped during the block copy")
        infos = {dev: dom.blockJobInfo(dev, 0) for dev in devs}
        gone = [dev for dev, info in infos.items() if not info]
        if gone:
            raise SessionError(f"block copy job(s) of {gone} ended before the pivot")
        if all(i["end"] > 0 and i["cur"] == i["end"] for i in infos.values()):
            return
        if time.monotonic() > deadline:
            raise SessionError(f"block copy not ready after {timeout_s:.0f} s: {infos}")
        time.sleep(0.2)


def disk_sources(dom: Any) -> dict[str, str]:
    """{target dev: source file, or "nbd:NAME" for a network disk} of the live domain."""
    out: dict[str, str] = {}
    for disk in _live_disks(dom):
        target, src = disk.find("target"), disk.find("source")
        if target is None or src is None:
            continue
        if disk.get("type") == "network":
            out[target.get("dev", "")] = f"{src.get('protocol')}:{src.get('name')}"
        else:
            out[target.get("dev", "")] = src.get("file") or src.get("dev") or ""
    return out
