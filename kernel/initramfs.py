"""Initramfs building blocks shared by the test disk and the rescue system.

This module owns everything that turns host files into a bootable initramfs without root tricks
or external archivers:

* locating Debian's kernel (``/boot/vmlinuz-*``) and its module tree,
* resolving kernel modules with their dependencies from ``modules.dep`` (decompressing
  ``.ko.xz`` / ``.ko.gz`` / ``.ko.zst`` at build time),
* collecting a dynamically linked binary with its shared libraries and the dynamic loader
  (``ldd``),
* writing a ``newc`` cpio archive in pure Python (device nodes such as ``/dev/console`` need no
  ``mknod``), gzip-compressed or not,
* a content-keyed cache (``var/cache/kernel/`` by default, ``DR_KERNEL_CACHE`` overrides) so that a
  repeated build of the same inputs is a file lookup.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import lzma
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

#: Bump when the archive layout changes so that stale cache entries are not reused.
FORMAT_VERSION = "1"

BUSYBOX = Path("/bin/busybox")
MODULES_ROOT = Path("/lib/modules")
BOOT_DIR = Path("/boot")


class KernelBuildError(RuntimeError):
    """A build input is missing or a build tool failed (message is one line, user-facing)."""


class BootFiles(NamedTuple):
    """A kernel image and the initramfs that goes with it."""

    kernel: Path
    initrd: Path


# --------------------------------------------------------------------------------------------
# cache


def cache_dir() -> Path:
    """The build cache: ``$DR_KERNEL_CACHE`` or ``<repo>/var/cache/kernel``."""
    env = os.environ.get("DR_KERNEL_CACHE")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "var" / "cache" / "kernel"


def file_fingerprint(path: Path) -> str:
    """A cheap identity for a build input: resolved path, size and mtime."""
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


# --------------------------------------------------------------------------------------------
# kernel and modules


def _version_key(text: str) -> list[int | str]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


def find_kernel(boot_dir: Path = BOOT_DIR, modules_root: Path = MODULES_ROOT) -> tuple[Path, str]:
    """Newest ``/boot/vmlinuz-<ver>`` that has a matching ``/lib/modules/<ver>``."""
    candidates = []
    for image in boot_dir.glob("vmlinuz-*"):
        version = image.name.removeprefix("vmlinuz-")
        if (modules_root / version / "modules.dep").is_file():
            candidates.append((version, image))
    if not candidates:
        raise KernelBuildError(
            f"no {boot_dir}/vmlinuz-* with modules in {modules_root} "
            "(apt-get install linux-image-amd64)"
        )
    version, image = max(candidates, key=lambda c: _version_key(c[0]))
    if not os.access(image, os.R_OK):
        raise KernelBuildError(f"kernel image {image} is not readable")
    return image, version


def _module_name(relpath: str) -> str:
    name = relpath.rsplit("/", 1)[-1]
    name = re.sub(r"\.ko(\.(xz|gz|zst))?$", "", name)
    return name.replace("-", "_")


@dataclass
class ModuleTree:
    """``modules.dep`` and ``modules.builtin`` of one kernel version."""

    version: str
    root: Path
    deps: dict[str, list[str]] = field(default_factory=dict)  # name -> [dep relpaths]
    paths: dict[str, str] = field(default_factory=dict)  # name -> relpath
    builtin: set[str] = field(default_factory=set)

    @classmethod
    def load(cls, version: str, modules_root: Path = MODULES_ROOT) -> ModuleTree:
        root = modules_root / version
        tree = cls(version=version, root=root)
        for line in (root / "modules.dep").read_text().splitlines():
            if ":" not in line:
                continue
            mod, _, rest = line.partition(":")
            name = _module_name(mod)
            tree.paths[name] = mod
            tree.deps[name] = rest.split()
        builtin = root / "modules.builtin"
        if builtin.is_file():
            tree.builtin = {_module_name(x) for x in builtin.read_text().split()}
        return tree

    def load_order(self, names: Iterable[str]) -> list[str]:
        """Module relpaths to ``insmod`` in order (deps first); built-in modules are skipped.

        A module that is neither built in nor present raises ``KernelBuildError``.
        """
        order: list[str] = []
        seen: set[str] = set()

        def visit(name: str) -> None:
            name = name.replace("-", "_")
            if name in seen:
                return
            seen.add(name)
            if name in self.builtin:
                return
            if name not in self.paths:
                raise KernelBuildError(f"kernel module {name} not found in {self.root}")
            # modules.dep lists the full transitive closure, most-dependent first: load the
            # listed deps in reverse, each after its own deps.
            for dep in reversed(self.deps[name]):
                visit(_module_name(dep))
            order.append(self.paths[name])

        for n in names:
            visit(n)
        return order

    def read_module(self, relpath: str) -> bytes:
        """The module's ELF bytes, decompressed if Debian ships it compressed."""
        path = self.root / relpath
        data = path.read_bytes()
        if relpath.endswith(".xz"):
            return lzma.decompress(data)
        if relpath.endswith(".gz"):
            return gzip.decompress(data)
        if relpath.endswith(".zst"):
            return subprocess.run(
                ["zstd", "-dc", str(path)], check=True, capture_output=True
            ).stdout
        return data


def module_dest(relpath: str) -> str:
    """Where a module lands in the initramfs: ``/lib/modules/<name>.ko`` (flat, uncompressed)."""
    return f"lib/modules/{_module_name(relpath)}.ko"


# --------------------------------------------------------------------------------------------
# shared libraries


_LDD_LINE = re.compile(r"^\s*(?:\S+\s+=>\s+)?(/\S+)\s+\(0x[0-9a-f]+\)\s*$")


def shared_libraries(binary: Path) -> list[Path]:
    """Absolute paths (as the loader names them) of every library ``binary`` loads, via ``ldd``.

    The dynamic loader itself is included (e.g. ``/lib64/ld-linux-x86-64.so.2``).
    """
    try:
        out = subprocess.run(
            ["ldd", str(binary)], check=True, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise KernelBuildError(f"ldd {binary} failed: {exc}") from exc
    libs: list[Path] = []
    for line in out.splitlines():
        if "not found" in line:
            raise KernelBuildError(f"{binary}: missing library: {line.strip()}")
        m = _LDD_LINE.match(line)
        if m:
            libs.append(Path(m.group(1)))
    return libs


def library_closure(binaries: Iterable[Path]) -> list[Path]:
    """Every library (and the loader) the ``binaries`` load, each once, in first-seen order."""
    libs: dict[Path, None] = {}
    for b in binaries:
        libs.update(dict.fromkeys(shared_libraries(b)))
    return list(libs)


# --------------------------------------------------------------------------------------------
# cpio (newc)


class CpioWriter:
    """Accumulates a ``newc`` cpio archive in memory-friendly chunks (all entries owned by root)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1
        self._dirs: set[str] = set()

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        name = name.lstrip("/")
        namez = name.encode() + b"\0"
        fields = [
            self._ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data),
            0, 0, rdev[0], rdev[1], len(namez), 0,
        ]  # fmt: skip
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._parts.append(header + namez + b"\0" * (-(len(header) + len(namez)) % 4))
        if data:
            self._parts.append(data + b"\0" * (-len(data) % 4))

    def mkdir(self, name: str, mode: int = 0o755) -> None:
        """Add a directory and any missing parents."""
        name = name.strip("/")
        parts = name.split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in self._dirs:
                self._dirs.add(d)
                self._entry(d, stat.S_IFDIR | mode)

    def _parent(self, name: str) -> None:
        parent = name.strip("/").rpartition("/")[0]
        if parent:
            self.mkdir(parent)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._parent(name)
        self._entry(name, stat.S_IFREG | mode, data)

    def copy(self, name: str, src: Path, mode: int | None = None) -> None:
        """Add the content of ``src`` (symlinks followed) under ``name``."""
        if mode is None:
            mode = stat.S_IMODE(src.stat().st_mode)
        self.file(name, src.read_bytes(), mode)

    def symlink(self, name: str, target: str) -> None:
        self._parent(name)
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._parent(name)
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self._parts)


def add_busybox(cpio: CpioWriter, busybox: Path = BUSYBOX) -> None:
    """``/bin/busybox`` plus a symlink for every applet at its usual path."""
    if not busybox.is_file():
        raise KernelBuildError(f"{busybox} missing (apt-get install busybox-static)")
    cpio.copy("bin/busybox", busybox, 0o755)
    applets = subprocess.run(
        [str(busybox), "--list-full"], check=True, capture_output=True, text=True
    ).stdout.split()
    for applet in applets:
        if applet != "bin/busybox":
            cpio.symlink(applet, "/bin/busybox")


def add_base_layout(cpio: CpioWriter) -> None:
    """The directories and device nodes an early ``/init`` needs."""
    for d in ("dev", "proc", "sys", "tmp", "run", "etc", "root", "mnt", "lib/modules"):
        cpio.mkdir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.file("etc/group", b"root:x:0:\n")


def add_binaries(
    cpio: CpioWriter,
    binaries: Iterable[Path],
    bin_dir: str,
    libs: Iterable[Path],
    substitute: Callable[[Path], Path | None] | None = None,
) -> None:
    """Copy ``binaries`` into ``bin_dir`` and ``libs`` to the paths the loader names them by.

    ``substitute(lib)`` may name a file to ship instead of ``lib`` (or None to keep it).
    """
    for b in binaries:
        cpio.copy(f"{bin_dir}/{b.name}", b, 0o755)
    for lib in libs:
        cpio.copy(str(lib), (substitute(lib) if substitute else None) or lib, 0o755)


def add_modules(cpio: CpioWriter, tree: ModuleTree, names: Iterable[str]) -> list[str]:
    """Copy ``names`` and their deps into ``/lib/modules``; write ``/lib/modules/load.order``.

    Returns the in-archive paths in load order.
    """
    order = tree.load_order(names)
    dests = []
    for rel in order:
        dest = module_dest(rel)
        cpio.file(dest, tree.read_module(rel))
        dests.append("/" + dest)
    cpio.file("lib/modules/load.order", ("\n".join(dests) + "\n").encode())
    return dests


def write_cached(
    key_parts: Iterable[str],
    name: str,
    build: Callable[[], bytes],
    *,
    compress: bool = True,
) -> Path:
    """Return ``<cache>/<name>-<key>.cpio[.gz]``, building it with ``build()`` if missing."""
    h = hashlib.sha256()
    for part in (FORMAT_VERSION, name, str(compress), *key_parts):
        h.update(part.encode() + b"\0")
    key = h.hexdigest()[:16]
    out = cache_dir() / f"{name}-{key}.cpio{'.gz' if compress else ''}"
    if out.is_file():
        log.debug("initramfs cache hit %s", out)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    data = build()
    if compress:
        data = gzip.compress(data, compresslevel=6, mtime=0)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{name}-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
    log.info("built initramfs %s (%d bytes)", out, len(data))
    return out


def copy_into(src: Path, dst: Path) -> None:
    """Copy a build product to a caller's path (atomically replacing it)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def require_tool(name: str, package: str) -> str:
    """Absolute path of a host tool, or a one-line error naming the Debian package."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        raise KernelBuildError(f"{name} not found (apt-get install {package})")
    return path
