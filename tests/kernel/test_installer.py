"""Tests for kernel/installer.py: the appliance disk image, the installer ISO, and a full install.

The VM test boots the installer ISO under QEMU TCG with a blank disk (``install`` entry selected by
building the ISO with ``--default install --menu-timeout 0``), waits for ``INSTALL OK``, then boots
the disk alone twice: the first boot creates the appliance's repository, the second finds it.
Every guest is bounded by a timeout and stopped by PID (``vmutil``).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from vmutil import QemuVM, free_tcp_port, qemu_vm, run_qemu

from kernel.__main__ import main as kernel_main
from kernel.initramfs import KernelBuildError
from kernel.installer import (
    ADMIN_PASSWORD_CHARS,
    ADMIN_PASSWORD_MARKER,
    ADMIN_SH,
    APPLIANCE_CMDLINE,
    BOOT_PART_MIB,
    ISO_IMAGE_PATH,
    NBD_PORT,
    NBD_PSK_IDENTITY,
    NBD_PSK_PATH,
    PROJECT_PACKAGES,
    READY_MARKER,
    SITE_EXCLUDE,
    STDLIB_EXCLUDE,
    _excluded,
    appliance_grub_cfg,
    build_appliance_image,
    cached_appliance_image,
    installer_iso_extras,
)
from kernel.iso import IsoEntry, isolinux_cfg
from kernel.testdisk import MBR_BIN, PARTITION_START_LBA, SECTOR

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
INSTALL_TIMEOUT_S = 120
BOOT_TIMEOUT_S = 90
FAIL_ON = (
    "Kernel panic",
    "No bootable device",
    "INSTALL FAILED",
    "INSTALL WARNING",
    "APPLIANCE BOOT FAILED",
    "Traceback",
)


def sfdisk_json(disk: Path) -> list[dict[str, object]]:
    out = subprocess.run(
        ["sfdisk", "-J", str(disk)], check=True, capture_output=True, text=True
    ).stdout
    parts: list[dict[str, object]] = json.loads(out)["partitiontable"]["partitions"]
    return parts


# --------------------------------------------------------------------------------------------
# no VM


def test_isolinux_cfg_rescue_only_is_unchanged() -> None:
    assert isolinux_cfg("console=ttyS0") == (
        "SERIAL 0 115200\nDEFAULT linux\nPROMPT 0\nTIMEOUT 0\n"
        "LABEL linux\n  KERNEL /boot/vmlinuz\n  INITRD /boot/initrd.img\n"
        "  APPEND console=ttyS0\n"
    )


def test_isolinux_cfg_with_install_entry() -> None:
    entry = IsoEntry("install", "/boot/vmlinuz", "/boot/install.img", "console=ttyS0 install.x=1")
    cfg = isolinux_cfg("console=ttyS0", extra_entries=[entry], menu_timeout_s=7)
    assert "DEFAULT linux\nPROMPT 1\nTIMEOUT 70\n" in cfg
    assert "LABEL install\n  KERNEL /boot/vmlinuz\n  INITRD /boot/install.img\n" in cfg
    assert "  APPEND console=ttyS0 install.x=1\n" in cfg
    cfg0 = isolinux_cfg("c", extra_entries=[entry], default="install", menu_timeout_s=0)
    assert "DEFAULT install\nPROMPT 0\nTIMEOUT 0\n" in cfg0
    with pytest.raises(KernelBuildError, match="unknown default"):
        isolinux_cfg("c", extra_entries=[entry], default="nope")
    with pytest.raises(KernelBuildError, match="unknown default"):
        isolinux_cfg("c", default="install")
    with pytest.raises(KernelBuildError, match="duplicate"):
        isolinux_cfg("c", extra_entries=[IsoEntry("linux", "/k", "/i", "c")])


def test_exclusions_keep_runtime_dependencies() -> None:
    for name in ("trio", "lmdb", "cryptography", "pyzstd", "blake3", "dissect", "msgpack",
                 "libvirt.py", "qemu", "lzo.cpython-311-x86_64-linux-gnu.so", "_cffi_backend"
                 ".cpython-311-x86_64-linux-gnu.so", "pyfuse3", "xxhash", "pyfastcdc"):  # fmt: skip
        assert not _excluded(name, SITE_EXCLUDE), name
    for name in ("mypy", "_pytest", "pip", "hypothesis", "__editable__.dr_appliance-0.1.0.pth",
                 "6ec57f84c680d3a3778b__mypyc.cpython-311-x86_64-linux-gnu.so"):  # fmt: skip
        assert _excluded(name, SITE_EXCLUDE), name
    assert _excluded("test", STDLIB_EXCLUDE)
    assert not _excluded("json", STDLIB_EXCLUDE)


def test_cli_rejects_default_install_without_installer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert kernel_main(["iso", "--out", str(tmp_path / "x.iso"), "--default", "install"]) == 1
    assert "needs --with-installer" in capsys.readouterr().err


def test_install_dst_is_validated() -> None:
    with pytest.raises(KernelBuildError, match="bad install destination"):
        installer_iso_extras(dst="sda")


#: What a generated admin password looks like (ADMIN_SH's random_chars alphabet).
GENERATED_PW_RE = re.compile(
    rf"{ADMIN_PASSWORD_MARKER}([A-HJ-NP-Za-km-z2-9]{{{ADMIN_PASSWORD_CHARS}}})\r?$", re.MULTILINE
)
#: root's /etc/shadow line as ADMIN_SH writes it: SHA-512 crypt, every numeric field set.
SHADOW_RE = re.compile(r"^root:(\$6\$([A-Za-z0-9]{16})\$[./0-9A-Za-z]{86}):\d+:0:99999:7:::\n$")


def busybox_sh(script: str, **env: str) -> str:
    """Run ``script`` after :data:`ADMIN_SH` under busybox's ash (the shell both inits use)."""
    proc = subprocess.run(["busybox", "sh", "-c", ADMIN_SH + script], capture_output=True,
                          text=True, check=False, env={"PATH": "/usr/bin:/bin", **env},
                          timeout=30)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def check_shadow_line(line: str, password: str) -> None:
    """``line`` is root's SHA-512 crypt hash of ``password`` (checked by openssl, not by us)."""
    m = SHADOW_RE.match(line)
    assert m, line
    assert password not in line
    want = subprocess.run(["openssl", "passwd", "-6", "-salt", m[2], "-stdin"], input=password,
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert m[1] == want


def pty_login(root: Path, password: str) -> str:
    """busybox ``login root`` chrooted into ``root`` on a pty: type ``password``, then ``id``;
    return what the terminal showed. The process is killed by PID at the end."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(["chroot", str(root), "/bin/busybox", "login", "root"], stdin=slave,
                            stdout=slave, stderr=slave, start_new_session=True)  # fmt: skip
    os.close(slave)
    seen = b""

    def until(*markers: bytes, timeout_s: float = 10) -> bool:
        nonlocal seen
        deadline = time.monotonic() + timeout_s
        while not any(m in seen for m in markers) and time.monotonic() < deadline:
            if select.select([master], [], [], 0.1)[0]:
                try:
                    seen += os.read(master, 4096)
                except OSError:  # the other side closed
                    break
        return any(m in seen for m in markers)

    try:
        assert until(b"Password: "), seen
        os.write(master, password.encode() + b"\n")
        # busybox login waits 3 s before "Login incorrect"; a shell prompt comes at once
        assert until(b"# ", b"Login incorrect"), seen
        if b"Login incorrect" not in seen:
            os.write(master, b"echo uid=`id -u`-ok\n")
            assert until(b"uid=0-ok"), seen
        return seen.decode(errors="replace")
    finally:
        proc.kill()
        proc.wait(10)
        os.close(master)


def test_admin_password_helpers_hash_what_busybox_login_accepts(tmp_path: Path) -> None:
    """ADMIN_SH: generated passwords are random and well-formed; the shadow line is 0600, holds
    only a SHA-512 crypt hash, and busybox's own login (as on the installed system) accepts the
    right password and refuses a wrong one."""
    pws = busybox_sh(f"random_chars {ADMIN_PASSWORD_CHARS}; random_chars {ADMIN_PASSWORD_CHARS}")
    a, b = pws.split()
    assert a != b
    assert GENERATED_PW_RE.match(f"{ADMIN_PASSWORD_MARKER}{a}")
    root = tmp_path / "root"
    for d in ("bin", "etc", "root"):
        (root / d).mkdir(parents=True)
    subprocess.run(["cp", "/bin/busybox", str(root / "bin/busybox")], check=True)
    for applet in ("sh", "id"):
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")
    password = "Corr3ct horse: 'b\\a$"  # spaces, quotes, a backslash, a dollar
    busybox_sh('printf "%s\\n" "$PW" | write_shadow "$ROOT"', PW=password, ROOT=str(root))
    shadow = root / "etc/shadow"
    assert shadow.stat().st_mode & 0o777 == 0o600
    assert not (root / "etc/shadow.new").exists()
    check_shadow_line(shadow.read_text(), password)

    wrong = pty_login(root, password + "x")
    assert "Login incorrect" in wrong and "uid=0-ok" not in wrong
    right = pty_login(root, password)
    assert "uid=0-ok" in right and "Login incorrect" not in right


def test_appliance_build_installer_iso_runs_kernel_tool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance.cli import main as appliance_main
    from appliance.commands import build

    calls: list[list[str]] = []
    monkeypatch.setattr(build, "run_kernel_tool", lambda args, **_: calls.append(args) or [])
    out = tmp_path / "i.iso"
    with pytest.raises(SystemExit) as exc:
        appliance_main(["build", "installer-iso", "--out", str(out), "--default", "install"])
    assert exc.value.code == 0
    assert calls == [[
        "iso", "--out", str(out.resolve()), "--with-installer", "--install-dst", "/dev/sda",
        "--default", "install", "--menu-timeout", "5",
    ]]  # fmt: skip


@pytest.mark.slow
def test_appliance_image_layout(tmp_path: Path) -> None:
    start = time.monotonic()
    disk = build_appliance_image(tmp_path / "app.img", project_root=PROJECT_ROOT)
    log.info("appliance image: %.1fs, %d MiB", time.monotonic() - start, disk.stat().st_size >> 20)
    data = disk.read_bytes()
    assert data[:440] == MBR_BIN.read_bytes()[:440]
    assert data[510:512] == b"\x55\xaa"
    parts = sfdisk_json(disk)
    assert [(p["start"], p["type"], p.get("bootable", False)) for p in parts] == [
        (PARTITION_START_LBA, "6", True),
        (PARTITION_START_LBA + BOOT_PART_MIB * 2048, "83", False),
    ]
    root_off = int(str(parts[1]["start"])) * SECTOR
    assert data[root_off + 1024 + 0x38 : root_off + 1024 + 0x3A] == b"\x53\xef"  # ext4 magic
    # the image is cached: a second build is a copy
    start = time.monotonic()
    assert cached_appliance_image(project_root=PROJECT_ROOT).stat().st_size == len(data)
    assert time.monotonic() - start < 5
    assert set(PROJECT_PACKAGES) >= {"appliance", "dedupstore"}


# --------------------------------------------------------------------------------------------
# VM: install from the ISO onto a blank disk, boot the installed appliance


@pytest.mark.vm
@pytest.mark.slow
def test_install_from_iso_then_boot_installed_appliance(tmp_path: Path) -> None:
    iso = tmp_path / "installer.iso"
    start = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "kernel", "iso", "--out", str(iso), "--with-installer",
         "--default", "install", "--menu-timeout", "0", "--unattended"],
        check=True, cwd=PROJECT_ROOT, timeout=600,
    )  # fmt: skip
    log.info("installer ISO: %.1fs, %.1f MiB", time.monotonic() - start, iso.stat().st_size / 2**20)
    image = cached_appliance_image(project_root=PROJECT_ROOT)
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.truncate(512 << 20)

    result = run_qemu(
        ["-cdrom", str(iso), "-drive", f"file={disk},format=raw,if=ide", "-boot", "d"],
        serial_log=tmp_path / "install.log",
        wait_for="INSTALL OK",
        fail_on=FAIL_ON,
        timeout_s=INSTALL_TIMEOUT_S,
        expect_exit=True,
    )
    log.info("install: INSTALL OK after %.1fs", result.elapsed_s)
    assert f"/dev/sr0:{ISO_IMAGE_PATH} -> /dev/sda" in result.log
    assert "INSTALL GROW /dev/sda2" in result.log
    # unattended: nothing asked, a generated admin password printed exactly once
    assert "INSTALL PASSWORD type" not in result.log
    assert result.log.count(ADMIN_PASSWORD_MARKER) == 1
    m = GENERATED_PW_RE.search(result.log)
    assert m, "no generated admin password on the console"
    password = m[1]
    # only its salted hash is on the disk, readable by root alone; the password is nowhere
    shadow, mode = root_file(disk, "/etc/shadow")
    check_shadow_line(shadow, password)
    assert mode == 0o600
    assert not disk_contains(disk, password.encode())
    # the boot partition arrived intact; partition 2 now ends at the end of the disk
    boot_bytes = (PARTITION_START_LBA + BOOT_PART_MIB * 2048) * SECTOR
    with disk.open("rb") as d, image.open("rb") as i:
        assert d.read(440) == i.read(440)
        d.seek(PARTITION_START_LBA * SECTOR)
        i.seek(PARTITION_START_LBA * SECTOR)
        assert d.read(BOOT_PART_MIB << 20) == i.read(BOOT_PART_MIB << 20)
    parts = sfdisk_json(disk)
    end = int(str(parts[1]["start"])) + int(str(parts[1]["size"]))
    assert end == disk.stat().st_size // SECTOR

    set_boot_args(disk, "appliance.halt=1")  # the first two boots report and power off
    first = run_qemu(
        ["-drive", f"file={disk},format=raw,if=ide", "-boot", "c"],
        serial_log=tmp_path / "boot1.log",
        wait_for="APPLIANCE RESULT",
        fail_on=FAIL_ON,
        timeout_s=BOOT_TIMEOUT_S,
        expect_exit=True,
    )
    log.info("installed appliance, first boot: result after %.1fs", first.elapsed_s)
    assert READY_MARKER in first.log
    assert ADMIN_PASSWORD_MARKER not in first.log  # the installer set it: never shown again
    assert "initialised repository /var/lib/appliance/repo" in first.log
    assert "APPLIANCE NET eth0 10.0.2.15/24" in first.log  # QEMU's default NIC, user network
    # the installed system's own stack: store, nbdkit + our plugin + nbdcopy, FUSE mount
    for part in ("store", "nbd", "fuse"):
        assert re.search(rf"^{part} +OK ", first.log, re.MULTILINE), part
    assert "selftest OK" in first.log
    assert "APPLIANCE RESULT rc=0" in first.log
    root_k = int(first.log.split("APPLIANCE ROOT ")[1].split("K")[0])
    assert root_k * 1024 > image.stat().st_size - boot_bytes  # grown beyond the image

    second = run_qemu(
        ["-drive", f"file={disk},format=raw,if=ide", "-boot", "c"],
        serial_log=tmp_path / "boot2.log",
        wait_for="APPLIANCE RESULT",
        fail_on=FAIL_ON,
        timeout_s=BOOT_TIMEOUT_S,
        expect_exit=True,
    )
    log.info("installed appliance, second boot: result after %.1fs", second.elapsed_s)
    assert "APPLIANCE RUN points" in second.log
    assert "no points" in second.log
    assert "APPLIANCE RESULT rc=0" in second.log

    # As installed (no appliance.halt): the appliance stays up, serves NBD on its network over
    # TLS only, and its console asks for a login.
    set_boot_args(disk, "")
    port = free_tcp_port()
    with qemu_vm(["-drive", f"file={disk},format=raw,if=ide", "-boot", "c",
                  "-nic", f"user,model=e1000,hostfwd=tcp:127.0.0.1:{port}-:{NBD_PORT}"],
                 serial_log=tmp_path / "boot3.log", fail_on=FAIL_ON,
                 serial_input=True) as vm:  # fmt: skip
        vm.wait_for(f"APPLIANCE SERVICE nbd 0.0.0.0:{NBD_PORT}", timeout_s=BOOT_TIMEOUT_S)
        assert f"tls-psk {NBD_PSK_PATH} identity {NBD_PSK_IDENTITY}" in vm.log_text()
        assert f"APPLIANCE NBD PSK created {NBD_PSK_PATH}" in vm.log_text()
        vm.wait_for("login: ", timeout_s=BOOT_TIMEOUT_S)  # a login prompt, not a shell
        assert "appliance# " not in vm.log_text()
        assert not console_login(vm, password + "x")  # a wrong password is refused
        assert console_login(vm, password)
        assert console_run(vm, "id").startswith("uid=0(root) gid=0(root)")
        mode, key_line = console_run(vm, f"stat -c %a {NBD_PSK_PATH}; cat {NBD_PSK_PATH}").split()
        assert mode == "600"
        assert re.fullmatch(rf"{NBD_PSK_IDENTITY}:[0-9a-f]{{64}}", key_line), key_line
        psk = tmp_path / "appliance.psk"
        psk.write_text(key_line + "\n")
        psk.chmod(0o600)
        tls_uri = f"nbds://{NBD_PSK_IDENTITY}@127.0.0.1:{port}/?tls-psk-file={psk}"
        listing = wait_nbd_list(tls_uri, timeout_s=60)
        assert listing["exports"] == []  # a fresh repository: nothing to export yet
        # the server is up: without the key (plain NBD, or TLS with another key) nothing answers
        assert nbd_list(f"nbd://127.0.0.1:{port}").returncode != 0
        other = tmp_path / "other.psk"
        other.write_text(f"{NBD_PSK_IDENTITY}:{os.urandom(32).hex()}\n")
        other_uri = f"nbds://{NBD_PSK_IDENTITY}@127.0.0.1:{port}/?tls-psk-file={other}"
        assert nbd_list(other_uri).returncode != 0
        assert vm.proc is not None and vm.proc.poll() is None  # still running, not halted
    assert ADMIN_PASSWORD_MARKER not in (tmp_path / "boot3.log").read_text(errors="replace")


def set_boot_args(disk: Path, extra: str) -> None:
    """Rewrite the installed disk's boot configs (syslinux.cfg for BIOS, grub.cfg for UEFI):
    the appliance command line plus `extra`."""
    fat = f"{disk}@@{PARTITION_START_LBA * SECTOR}"
    cfg = subprocess.run(["mtype", "-i", fat, "::/syslinux.cfg"], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    lines = [f"  APPEND {APPLIANCE_CMDLINE} {extra}".rstrip() if ln.strip().startswith("APPEND")
             else ln for ln in cfg.splitlines()]  # fmt: skip
    new = {"syslinux.cfg": "\n".join(lines) + "\n",
           "grub.cfg": appliance_grub_cfg(f"{APPLIANCE_CMDLINE} {extra}".rstrip())}
    for name, text in new.items():
        path = disk.with_name(name)
        path.write_text(text)
        subprocess.run(["mcopy", "-o", "-i", fat, str(path), f"::/{name}"], check=True,
                       capture_output=True)  # fmt: skip


def root_file(disk: Path, path: str) -> tuple[str, int]:
    """Text and permission bits of ``path`` in the installed disk's root filesystem (debugfs,
    read-only, on partition 2 in place)."""
    dev = f"{disk}?offset={int(str(sfdisk_json(disk)[1]['start'])) * SECTOR}"
    text = subprocess.run(["debugfs", "-R", f"cat {path}", dev], check=True, capture_output=True,
                          text=True).stdout  # fmt: skip
    stat = subprocess.run(["debugfs", "-R", f"stat {path}", dev], check=True,
                          capture_output=True, text=True).stdout  # fmt: skip
    m = re.search(r"Mode: +(0[0-7]+)", stat)
    assert m, stat
    return text, int(m[1], 8)


def disk_contains(disk: Path, needle: bytes) -> bool:
    """Whether ``needle`` is anywhere in the disk image's bytes."""
    with disk.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        return mm.find(needle) >= 0


def wait_after(vm: QemuVM, start: int, *markers: str, timeout_s: float = 60) -> str:
    """The serial log from offset ``start`` on, once it shows one of ``markers``."""
    assert vm.proc is not None
    deadline = time.monotonic() + timeout_s
    while True:
        text = vm.log_text()[start:]
        if any(m in text for m in markers):
            return text
        if vm.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no {markers} on the console; after the input:\n{text[-2000:]}")
        time.sleep(0.1)


def console_login(vm: QemuVM, password: str) -> bool:
    """Answer the getty's ``login:`` prompt as root with ``password``: True when a shell comes,
    False when login refuses (it prompts ``login:`` again)."""
    start = len(vm.log_text())
    vm.type("root\n")
    wait_after(vm, start, "Password: ")
    start = len(vm.log_text())
    vm.type(password + "\n")
    text = wait_after(vm, start, "appliance# ", "Login incorrect")
    if "Login incorrect" in text:
        wait_after(vm, start, "login: ")
        return False
    return True


def console_run(vm: QemuVM, command: str, *, timeout_s: float = 60) -> str:
    """Run ``command`` in the console's shell and return its output (``\r`` dropped)."""
    start = len(vm.log_text())
    vm.type(f'echo "@@"B; {command}; echo "@@"E\n')  # the markers do not echo as typed
    text = wait_after(vm, start, "@@E", timeout_s=timeout_s)
    return text.split("@@B", 1)[1].split("@@E", 1)[0].replace("\r", "").strip()


@pytest.mark.vm
@pytest.mark.slow
def test_appliance_image_boots_with_uefi(tmp_path: Path) -> None:
    """The same disk boots under OVMF through GRUB (/EFI/BOOT/BOOTX64.EFI on partition 1).

    Written without the installer, the image holds no admin password: its first boot generates
    one, prints it once and stores only the hash."""
    code = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
    vars_src = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
    if not (code.exists() and vars_src.exists()):
        pytest.skip("UEFI firmware missing (apt-get install ovmf)")
    disk = tmp_path / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(cached_appliance_image(project_root=PROJECT_ROOT)),
                    str(disk)], check=True)  # fmt: skip
    set_boot_args(disk, "appliance.halt=1")
    vars_fd = tmp_path / "OVMF_VARS.fd"
    vars_fd.write_bytes(vars_src.read_bytes())
    result = run_qemu(
        ["-drive", f"if=pflash,format=raw,readonly=on,file={code}",
         "-drive", f"if=pflash,format=raw,file={vars_fd}",
         "-drive", f"file={disk},format=raw,if=ide"],
        serial_log=tmp_path / "uefi.log", wait_for="APPLIANCE RESULT",
        fail_on=(*FAIL_ON, "error: "), timeout_s=BOOT_TIMEOUT_S, expect_exit=True,
        memory_mib=512,  # Debian's GRUB 2.06 EFI loader runs out of memory at 256 MiB
    )  # fmt: skip
    log.info("appliance image, UEFI boot: result after %.1fs", result.elapsed_s)
    assert "Welcome to GRUB!" in result.log and "SYSLINUX" not in result.log
    assert READY_MARKER in result.log
    assert "selftest OK" in result.log
    assert "APPLIANCE RESULT rc=0" in result.log
    assert result.log.count(ADMIN_PASSWORD_MARKER) == 1
    m = GENERATED_PW_RE.search(result.log)
    assert m, "no generated admin password on the console"
    shadow, mode = root_file(disk, "/etc/shadow")
    check_shadow_line(shadow, m[1])
    assert mode == 0o600


def nbd_list(uri: str) -> subprocess.CompletedProcess[str]:
    """`nbdinfo --list --json URI`, whatever its exit status."""
    return subprocess.run(["nbdinfo", "--list", "--json", uri], capture_output=True, text=True,
                          timeout=30, check=False)  # fmt: skip


def wait_nbd_list(uri: str, *, timeout_s: float) -> dict[str, object]:
    """`nbdinfo --list --json URI` once the server answers (nbdkit starts slowly under TCG)."""
    deadline = time.monotonic() + timeout_s
    while True:
        proc = nbd_list(uri)
        if proc.returncode == 0:
            out: dict[str, object] = json.loads(proc.stdout)
            return out
        if time.monotonic() > deadline:
            raise AssertionError(f"no NBD server at {uri}: {proc.stderr.strip()}")
        time.sleep(1)


@pytest.mark.vm
@pytest.mark.slow
@pytest.mark.parametrize("answer", ["no", "yes"])
def test_installer_asks_before_erasing(tmp_path: Path, answer: str) -> None:
    """Without --unattended the installer waits for 'yes'; anything else leaves the disk alone.

    After 'yes' it asks for the admin password, typed twice without echo (a short one and two
    different entries are refused), stores only its hash, and the installed appliance's console
    logs in with it.
    """
    iso = tmp_path / "installer.iso"
    subprocess.run(
        [sys.executable, "-m", "kernel", "iso", "--out", str(iso), "--with-installer",
         "--default", "install", "--menu-timeout", "0"],
        check=True, cwd=PROJECT_ROOT, timeout=600,
    )  # fmt: skip
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.truncate(512 << 20)
    fail_on = [f for f in FAIL_ON if f != "INSTALL FAILED" or answer == "yes"]
    password = "Typed at 1nstall: ok"  # with spaces and a colon
    with qemu_vm(["-cdrom", str(iso), "-drive", f"file={disk},format=raw,if=ide", "-boot", "d"],
                 serial_log=tmp_path / "install.log", fail_on=fail_on,
                 serial_input=True) as vm:  # fmt: skip
        vm.wait_for("INSTALL CONFIRM", timeout_s=INSTALL_TIMEOUT_S)
        assert "INSTALL START" not in vm.log_text()
        start = len(vm.log_text())
        vm.type(answer + "\n")
        if answer == "no":
            vm.wait_for("INSTALL FAILED not confirmed, /dev/sda untouched", timeout_s=30)
        else:
            for first, second, verdict in (("short", None, "too short"),
                                           (password, password + "!", "the two entries differ"),
                                           (password, password, "set for root")):  # fmt: skip
                wait_after(vm, start, "INSTALL PASSWORD type")
                start = len(vm.log_text())
                vm.type(first + "\n")
                if second is not None:
                    wait_after(vm, start, "INSTALL PASSWORD again")
                    start = len(vm.log_text())
                    vm.type(second + "\n")
                wait_after(vm, start, f"INSTALL PASSWORD {verdict}")
            vm.wait_for("INSTALL OK", timeout_s=INSTALL_TIMEOUT_S)
        vm.wait_exit(timeout_s=30)  # powers off either way
    with disk.open("rb") as f:
        head = f.read(1 << 20)
    if answer == "no":
        assert head == bytes(len(head))
        assert disk.stat().st_blocks == 0  # not one block written anywhere
        return
    assert head[510:512] == b"\x55\xaa"
    install_log = (tmp_path / "install.log").read_text(errors="replace")
    assert password not in install_log  # never echoed
    assert ADMIN_PASSWORD_MARKER not in install_log  # typed, so not generated nor printed
    shadow, mode = root_file(disk, "/etc/shadow")
    check_shadow_line(shadow, password)
    assert mode == 0o600
    assert not disk_contains(disk, password.encode())

    # the installed appliance (first boot: repository, selftest; no services) asks for a login
    set_boot_args(disk, "appliance.services=none")
    with qemu_vm(["-drive", f"file={disk},format=raw,if=ide", "-boot", "c"],
                 serial_log=tmp_path / "boot.log", fail_on=FAIL_ON,
                 serial_input=True) as vm:  # fmt: skip
        vm.wait_for("APPLIANCE RESULT rc=0", timeout_s=BOOT_TIMEOUT_S)
        vm.wait_for("login: ", timeout_s=BOOT_TIMEOUT_S)
        assert not console_login(vm, "wrong-" + password)
        assert console_login(vm, password)
        assert console_run(vm, "id").startswith("uid=0(root) gid=0(root)")
        # the login shell has the appliance's environment
        assert "no points" in console_run(vm, "appliance --repo /var/lib/appliance/repo points")
    assert ADMIN_PASSWORD_MARKER not in (tmp_path / "boot.log").read_text(errors="replace")
