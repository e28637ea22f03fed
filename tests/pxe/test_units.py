"""Unit tests of pxe/: MACs, assignments, iPXE scripts, dnsmasq config, the boot HTTP server,
and the CLI's one-line errors. No VMs; the iSCSI test runs real tgtd/nbdfuse/nbdkit."""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from pxeutil import PointRepo, Serve, run_cli, sha256_file
from testlib import assert_logs

from pxe.assignments import Assignment, AssignmentError, AssignmentStore, normalize_mac
from pxe.dnsmasq import (
    BIOS_LOADER,
    CHAIN_SCRIPT,
    UEFI_LOADER,
    DnsmasqError,
    ProxyDhcpConfig,
    check_config,
    prepare_tftp_root,
    render_config,
    unreadable_for_others,
)
from pxe.http import BootHttpServer, RangeError, parse_range
from pxe.ipxe import (
    ScriptError,
    chain_script,
    iscsi_root_path,
    local_script,
    rescue_script,
    sanboot_script,
    spent_script,
    unassigned_script,
)

# -- MACs and assignments ---------------------------------------------------------------------


@pytest.mark.parametrize("text", ["52:54:00:AB:cd:01", "52-54-00-ab-cd-01", "525400abcd01",
                                  "5254.00ab.cd01", " 52:54:00:ab:cd:01 "])  # fmt: skip
def test_normalize_mac_accepts_common_spellings(text: str) -> None:
    assert normalize_mac(text) == "52:54:00:ab:cd:01"


@pytest.mark.parametrize("text", ["", "zz", "52:54:00:ab:cd", "52:54:00:ab:cd:01:02",
                                  "52:54:00:ab:cd:0g", "01:00:5e:00:00:01"])  # fmt: skip
def test_normalize_mac_rejects_bad_addresses(text: str) -> None:
    with pytest.raises(AssignmentError, match="bad MAC"):
        normalize_mac(text)


def test_assignment_validation() -> None:
    with pytest.raises(AssignmentError, match="takes no point"):
        Assignment("52:54:00:00:00:01", "local", "vm1@latest")
    with pytest.raises(AssignmentError, match="needs a backup point"):
        Assignment("52:54:00:00:00:01", "sanboot", None)
    with pytest.raises(AssignmentError, match="unknown action"):
        Assignment("52:54:00:00:00:01", "format-c", "vm1@latest")
    with pytest.raises(AssignmentError, match="bad point"):
        Assignment("52:54:00:00:00:01", "rescue", "vm1 @latest")


def test_assignments_persist_across_instances(tmp_path: Path) -> None:
    store = AssignmentStore(tmp_path / "pxe")
    store.set("52-54-00-00-00-01", "rescue", "vm1@latest")
    store.set("52:54:00:00:00:02", "sanboot", "vm2@3")
    store.set("52:54:00:00:00:03", "local")
    store.set("52:54:00:00:00:02", "sanboot", "vm2@4")  # replaces

    again = AssignmentStore(tmp_path / "pxe")
    got = {a.mac: (a.action, a.point) for a in again.all()}
    assert got == {
        "52:54:00:00:00:01": ("rescue", "vm1@latest"),
        "52:54:00:00:00:02": ("sanboot", "vm2@4"),
        "52:54:00:00:00:03": ("local", None),
    }
    doc = json.loads((tmp_path / "pxe" / "assignments.json").read_text())
    assert doc["v"] == 1 and set(doc["machines"]) == set(got)

    assert again.remove("52:54:00:00:00:03").action == "local"
    with pytest.raises(AssignmentError, match="no assignment"):
        again.remove("52:54:00:00:00:03")
    assert AssignmentStore(tmp_path / "pxe").get("52:54:00:00:00:03") is None


def test_script_is_handed_out_once_and_rescue_consumed_only_on_done(tmp_path: Path) -> None:
    """A fetch spends the arming's script but leaves the rescue armed; only `complete` with the
    arming's token consumes it (once: -> local; --always: re-armed with a new token)."""
    store = AssignmentStore(tmp_path)
    a1 = store.set("52:54:00:00:00:01", "rescue", "vm1@latest")
    a2 = store.set("52:54:00:00:00:02", "rescue", "vm1@latest", once=False)
    assert len(a1.token) == 32 and a1.token != a2.token and a1.armed
    first = store.fetch("52:54:00:00:00:01", pin=lambda a: "vm1@7")
    assert first.first and first.assignment is not None and first.assignment.pinned == "vm1@7"
    second = store.fetch("52:54:00:00:00:01")
    assert not second.first  # spent: the secrets went out with the first answer
    a = store.get("52:54:00:00:00:01")
    assert a is not None and a.action == "rescue" and not a.armed  # still a rescue
    assert store.pinned_points() == ["vm1@7"]
    assert store.complete("0" * 32) is None and store.complete("") is None
    assert store.complete(a1.token) is not None
    after = store.get("52:54:00:00:00:01")
    assert after is not None and after.action == "local"
    assert store.complete(a1.token) is None  # a token works once
    assert store.pinned_points() == []
    store.fetch("52:54:00:00:00:02")
    assert store.complete(a2.token) is not None
    again = store.get("52:54:00:00:00:02")
    assert again is not None and again.action == "rescue" and again.armed
    assert again.token != a2.token
    assert store.fetch("52:54:00:00:00:09").assignment is None
    assert (tmp_path / "assignments.json").stat().st_mode & 0o077 == 0  # tokens: root only


def test_fetch_races_hand_out_the_script_exactly_once(tmp_path: Path) -> None:
    store = AssignmentStore(tmp_path)
    store.set("52:54:00:00:00:01", "rescue", "vm1@latest")
    results: list[bool] = []
    lock = threading.Lock()

    def ask() -> None:
        f = AssignmentStore(tmp_path).fetch("52:54:00:00:00:01")
        with lock:
            results.append(f.first)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]


def test_rescue_destination(tmp_path: Path) -> None:
    store = AssignmentStore(tmp_path)
    store.set("52:54:00:00:00:01", "rescue", "vm1@latest", dst="/dev/nvme0n1")
    a = AssignmentStore(tmp_path).get("52:54:00:00:00:01")
    assert a is not None and a.dst == "/dev/nvme0n1"
    assert a.describe() == "rescue vm1@latest onto /dev/nvme0n1 (once)"
    for bad in ("sda", "/dev/sda restore.src=nbd://evil/x", "/dev/../etc/passwd"):
        with pytest.raises(AssignmentError, match="bad restore destination"):
            store.set("52:54:00:00:00:01", "rescue", "vm1@latest", dst=bad)


def test_corrupt_assignment_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "assignments.json").write_text("{not json")
    with pytest.raises(AssignmentError, match="not valid JSON"):
        AssignmentStore(tmp_path).all()


# -- iPXE scripts -------------------------------------------------------------------------------


def test_chain_script_asks_for_this_machines_script() -> None:
    s = chain_script("http://10.0.2.2:8080/")
    assert s.startswith("#!ipxe\n")
    assert "chain --autofree http://10.0.2.2:8080/boot/${netX/mac:hexhyp}.ipxe" in s


def test_rescue_script() -> None:
    s = rescue_script("http://10.0.0.1:8080", "console=ttyS0 restore.src=nbd://10.0.0.1:10809/x")
    lines = s.splitlines()
    assert lines[0] == "#!ipxe"
    assert ("kernel http://10.0.0.1:8080/rescue/vmlinuz initrd=initrd.img console=ttyS0 "
            "restore.src=nbd://10.0.0.1:10809/x") in lines  # fmt: skip
    assert "initrd http://10.0.0.1:8080/rescue/initrd.img" in lines
    assert lines[-1] == "boot"
    for bad in ("a\nshell", "x=${root-path}"):
        with pytest.raises(ScriptError):
            rescue_script("http://10.0.0.1:8080", bad)


def test_sanboot_script_and_root_path() -> None:
    iqn = "iqn.2024-01.org.dr-appliance:pxe-525400000001"
    rp = iscsi_root_path("10.0.2.2", 3260, iqn)
    assert rp == f"iscsi:10.0.2.2::3260:1:{iqn}"  # LUN 1: tgt's LUN 0 is the controller
    assert iscsi_root_path("fd00::1", 3260, iqn).startswith("iscsi:[fd00::1]::3260:1:")
    assert f"sanboot {rp}\n" in sanboot_script(rp)
    with_chap = sanboot_script(rp, chap=("dr-x", "0123456789abcdef"))
    assert "set username dr-x\nset password 0123456789abcdef\n" in with_chap
    assert with_chap.index("set password") < with_chap.index("sanboot ")
    with pytest.raises(ScriptError):
        sanboot_script(rp, chap=("dr-x", "bad ${secret}"))
    with pytest.raises(ScriptError, match="target name"):
        iscsi_root_path("10.0.2.2", 3260, "not-an-iqn")
    with pytest.raises(ScriptError, match="port"):
        iscsi_root_path("10.0.2.2", 0, iqn)
    with pytest.raises(ScriptError):
        iscsi_root_path("10.0.2.2 ; shell", 3260, iqn)


def test_local_and_unassigned_scripts() -> None:
    local = local_script()
    assert "iseq ${platform} efi && goto firmware ||" in local  # UEFI: back to the firmware
    assert "sanboot --no-describe --drive 0x80 || goto firmware" in local  # BIOS: drive 0x80
    s = unassigned_script("52:54:00:00:00:01")
    assert "52:54:00:00:00:01" in s and s.rstrip().endswith("exit")
    spent = spent_script("52:54:00:00:00:01")
    assert "already handed out" in spent and "exit" not in spent  # never the local disk
    assert "chain --autofree ${cwuri} || goto spent" in spent


# -- dnsmasq ------------------------------------------------------------------------------------


def _cfg(tmp_path: Path, **kw: str) -> ProxyDhcpConfig:
    args: dict[str, object] = {"interface": "eth9", "subnet": "192.168.77.0",
                               "tftp_root": tmp_path / "tftp", "server_ip": "192.168.77.1",
                               "pid_file": tmp_path / "dnsmasq.pid"}  # fmt: skip
    args.update(kw)
    return ProxyDhcpConfig(**args)  # type: ignore[arg-type]


def test_dnsmasq_config_is_proxy_dhcp_and_tftp_only(tmp_path: Path) -> None:
    conf = render_config(_cfg(tmp_path))
    lines = conf.splitlines()
    assert "port=0" in lines  # no DNS
    assert "dhcp-range=192.168.77.0,proxy" in lines  # never hands out addresses
    assert not [x for x in lines if x.startswith("dhcp-range=") and not x.endswith(",proxy")]
    assert "enable-tftp" in lines and f"tftp-root={tmp_path / 'tftp'}" in lines
    assert "interface=eth9" in lines
    assert "dhcp-userclass=set:ipxe,iPXE" in lines
    assert any(x.startswith("pxe-service=tag:!ipxe,x86PC,") and "undionly" in x for x in lines)
    assert any(x.startswith("pxe-service=tag:!ipxe,X86-64_EFI,") and UEFI_LOADER in x
               for x in lines)  # fmt: skip
    assert any(x.startswith("pxe-service=tag:ipxe,x86PC,") and CHAIN_SCRIPT in x for x in lines)


@pytest.mark.parametrize(
    ("field", "value"),
    [("subnet", "192.168.77"), ("server_ip", "x"), ("interface", "eth0,lo"), ("interface", "")],
)
def test_dnsmasq_config_rejects_bad_values(tmp_path: Path, field: str, value: str) -> None:
    with pytest.raises(DnsmasqError):
        render_config(_cfg(tmp_path, **{field: value}))


@pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="dnsmasq missing")
def test_dnsmasq_accepts_generated_config(tmp_path: Path) -> None:
    conf = tmp_path / "dnsmasq.conf"
    conf.write_text(render_config(_cfg(tmp_path)))
    check_config(conf)  # dnsmasq --test
    conf.write_text(render_config(_cfg(tmp_path)) + "no-such-option\n")
    with pytest.raises(DnsmasqError, match="rejects"):
        check_config(conf)


@pytest.mark.skipif(not Path("/usr/lib/ipxe/undionly.kpxe").exists(), reason="ipxe missing")
def test_tftp_root_layout(tmp_path: Path) -> None:
    root = tmp_path / "tftp"
    prepare_tftp_root(root, "http://192.168.77.1:8080")
    assert (root / BIOS_LOADER).stat().st_size > 0
    assert (root / "undionly.0").read_bytes() == (root / BIOS_LOADER).read_bytes()
    assert (root / UEFI_LOADER).stat().st_size > 0
    assert "http://192.168.77.1:8080/boot/" in (root / CHAIN_SCRIPT).read_text()


def test_unreadable_for_others() -> None:
    base = Path(tempfile.mkdtemp(prefix="drpxe-unit-"))  # /tmp: world-traversable parents
    try:
        base.chmod(0o755)
        closed = base / "closed"
        (closed / "tftp").mkdir(parents=True, mode=0o755)
        closed.chmod(0o700)
        assert unreadable_for_others(closed / "tftp") == closed
        closed.chmod(0o755)
        assert unreadable_for_others(closed / "tftp") is None
    finally:
        shutil.rmtree(base)


# -- boot HTTP server ---------------------------------------------------------------------------


def test_parse_range() -> None:
    assert parse_range(None, 100) is None
    assert parse_range("bytes=0-9", 100) == (0, 9)
    assert parse_range("bytes=90-", 100) == (90, 99)
    assert parse_range("bytes=-10", 100) == (90, 99)
    assert parse_range("bytes=95-200", 100) == (95, 99)
    assert parse_range("bytes=0-1,5-6", 100) is None  # multi-range: whole file
    for bad in ("bytes=100-", "bytes=5-4", "bytes=-0"):
        with pytest.raises(RangeError):
            parse_range(bad, 100)


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[tuple[BootHttpServer, list[tuple[str, str]]]]:
    rescue = tmp_path / "rescue"
    rescue.mkdir()
    (rescue / "vmlinuz").write_bytes(bytes(range(256)) * 40)
    calls: list[tuple[str, str]] = []

    def script_for(mac: str, host: str) -> str:
        calls.append((mac, host))
        if mac.endswith("ff"):
            raise RuntimeError("boom")
        return f"#!ipxe\necho {mac} via {host}\n"

    srv = BootHttpServer(("127.0.0.1", 0), rescue_dir=rescue, script_for=script_for)
    srv.start()
    try:
        yield srv, calls
    finally:
        srv.stop()


def _get(
    url: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_http_boot_script_by_mac(
    http_server: tuple[BootHttpServer, list[tuple[str, str]]],
) -> None:
    srv, calls = http_server
    base = f"http://127.0.0.1:{srv.port}"
    status, _, body = _get(f"{base}/boot/52%3A54%3A00%3AAB%3A00%3A01.ipxe",
                           {"Host": "10.0.2.2:8080"})  # fmt: skip
    assert status == 200
    assert body == b"#!ipxe\necho 52:54:00:ab:00:01 via 10.0.2.2\n"
    status, _, _ = _get(f"{base}/boot/52-54-00-ab-00-02.ipxe")
    assert status == 200 and calls[-1] == ("52:54:00:ab:00:02", "127.0.0.1")
    assert _get(f"{base}/boot/01-00-5e-00-00-01.ipxe")[0] == 400  # multicast: not a NIC
    assert _get(f"{base}/boot/zz-zz-zz-zz-zz-zz.ipxe")[0] == 404
    with assert_logs(r"boot HTTP request /boot/52-54-00-ab-00-ff\.ipxe failed",
                     level=logging.ERROR, count=1):
        assert _get(f"{base}/boot/52-54-00-ab-00-ff.ipxe")[0] == 500  # callback bug: 500
    assert _get(f"{base}/boot/52-54-00-ab-00-03.ipxe")[0] == 200
    n = len(calls)
    status, headers, body = _get(f"{base}/boot/52-54-00-ab-00-04.ipxe", method="HEAD")
    assert status == 405 and headers["Allow"] == "GET" and len(calls) == n  # no callback
    assert _get(f"{base}/etc/passwd")[0] == 404
    assert _get(f"{base}/rescue/../../etc/passwd")[0] == 404
    status, _, body = _get(f"{base}/boot.ipxe", {"Host": "10.9.9.9:8080"})
    assert status == 200 and b"http://10.9.9.9:8080/boot/" in body


def test_http_rescue_files_support_ranges(
    http_server: tuple[BootHttpServer, list[tuple[str, str]]],
) -> None:
    srv, _ = http_server
    data = (srv.rescue_dir / "vmlinuz").read_bytes()
    url = f"http://127.0.0.1:{srv.port}/rescue/vmlinuz"
    status, headers, body = _get(url)
    assert status == 200 and body == data and headers["Accept-Ranges"] == "bytes"
    status, headers, body = _get(url, {"Range": "bytes=100-199"})
    assert status == 206 and body == data[100:200]
    assert headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    status, _, body = _get(url, {"Range": "bytes=-16"})
    assert status == 206 and body == data[-16:]
    status, headers, _ = _get(url, {"Range": f"bytes={len(data)}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(data)}"
    status, headers, body = _get(url, method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) == len(data)
    status, _, _ = _get(f"http://127.0.0.1:{srv.port}/rescue/initrd.img")
    assert status == 404  # not built


# -- CLI ------------------------------------------------------------------------------------------


@pytest.mark.skipif(any(shutil.which(t) is None for t in ("tgtd", "nbdfuse")),
                    reason="needs tgt, libnbd-bin")  # fmt: skip
def test_cli_assign_list_unassign(point_repo: PointRepo) -> None:
    from pxeutil import teardown_iscsi
    from vmutil import free_tcp_port

    env = {"APPLIANCE_REPO": str(point_repo.root)}
    out = run_cli("pxe", "assign", "52-54-00-00-00-0A", "rescue", "vm1@latest", env=env).stdout
    assert out.strip() == "52:54:00:00:00:0a: rescue vm1@latest onto /dev/sda (once)"
    try:
        run_cli("pxe", "assign", "52:54:00:00:00:0b", "sanboot", point_repo.point, "--portal",
                f"127.0.0.1:{free_tcp_port()}", env=env)  # fmt: skip
    finally:
        teardown_iscsi(point_repo.root)
    run_cli("pxe", "assign", "52:54:00:00:00:0c", "local", env=env)
    items = json.loads(run_cli("pxe", "list", "--json", env=env).stdout)
    assert [(a["mac"], a["action"]) for a in items] == [
        ("52:54:00:00:00:0a", "rescue"), ("52:54:00:00:00:0b", "sanboot"),
        ("52:54:00:00:00:0c", "local"),
    ]  # fmt: skip
    assert all("token" not in a for a in items)  # listings never show the secret
    assert "52:54:00:00:00:0b  sanboot" in run_cli("pxe", "list", env=env).stdout
    for mac in ("52:54:00:00:00:0a", "52:54:00:00:00:0b", "52:54:00:00:00:0c"):
        run_cli("pxe", "unassign", mac, env=env)
    assert run_cli("pxe", "list", env=env).stdout.strip() == "no assignments"


@pytest.mark.parametrize(("args", "message"), [
    (("pxe", "assign", "nonsense", "local"), "bad MAC address 'nonsense'"),
    (("pxe", "assign", "52:54:00:00:00:01", "rescue", "nosuch@latest"), "no points for source"),
    (("pxe", "assign", "52:54:00:00:00:01", "sanboot"), "needs a point"),
    (("pxe", "assign", "52:54:00:00:00:01", "local", "vm1@latest"), "takes no point"),
    (("pxe", "unassign", "52:54:00:00:00:99"), "no assignment for 52:54:00:00:00:99"),
    (("iscsi", "unexport", "nosuch"), "no iSCSI session 'nosuch'"),
    (("iscsi", "export", "vm1@latest", "--name", "../x"), "bad session name"),
])  # fmt: skip
def test_cli_errors_are_one_line(
    point_repo: PointRepo, args: tuple[str, ...], message: str
) -> None:
    proc = run_cli(*args, env={"APPLIANCE_REPO": str(point_repo.root)}, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("appliance: error: ") and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_cli_build_iso_into_directory_is_an_error(tmp_path: Path) -> None:
    proc = run_cli("build", "iso", "--out", str(tmp_path), check=False)
    assert proc.returncode == 2 and "is a directory" in proc.stderr


def test_boot_planner_script_per_assignment(point_repo: PointRepo, tmp_path: Path) -> None:
    """What the HTTP server answers for each kind of assignment (no VM, no iSCSI)."""
    from appliance.commands.pxe import BootPlanner, IscsiSessions, assignments

    root = point_repo.root
    store = assignments(root)
    store.set("52:54:00:00:01:01", "rescue", "vm1@latest", dst="/dev/vda")
    store.set("52:54:00:00:01:02", "local")
    planner = BootPlanner(
        root, http_port=8080, nbd_port=10809, sessions=IscsiSessions(root), passphrase=None
    )
    try:
        s = planner.script_for("52:54:00:00:01:01", "10.0.0.1")
        assert "kernel http://10.0.0.1:8080/rescue/vmlinuz " in s
        # @latest is pinned to the point's id, so a backup landing mid-restore changes nothing
        assert f"restore.src=nbd://10.0.0.1:10809/{point_repo.point}/disk0 " in s
        assert "restore.dst=/dev/vda restore.zero=0 restore.reboot=1" in s
        a = store.get("52:54:00:00:01:01")
        assert a is not None and f"restore.report=http://10.0.0.1:8080/rescue/{a.token}" in s
        with assert_logs("boot script asked for again", level=logging.WARNING):
            again = planner.script_for("52:54:00:00:01:01", "10.0.0.1")
        assert again == spent_script("52:54:00:00:01:01")  # secrets went out once
        assert planner.script_for("52:54:00:00:01:02", "10.0.0.1") == local_script()
        assert planner.script_for("52:54:00:00:01:09", "10.0.0.1") == unassigned_script(
            "52:54:00:00:01:09"
        )
    finally:
        for mac in ("52:54:00:00:01:01", "52:54:00:00:01:02"):
            store.remove(mac)


def _post(url: str, body: bytes = b"") -> int:
    return _get_req(urllib.request.Request(url, data=body, method="POST"))[0]


def _get_req(req: urllib.request.Request) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_rescue_assignment_is_consumed_only_by_the_done_callback(
    point_repo: PointRepo, tmp_path: Path
) -> None:
    """Through the real HTTP server: fetching the rescue script leaves the assignment armed;
    a second GET gets no secrets and a HEAD nothing; POST done with a wrong token is refused;
    a reported failure re-arms it (a reboot restores again); done with the right token
    consumes it, once."""
    from appliance.commands.pxe import BootPlanner, IscsiSessions, assignments, nbd_allow_path

    root = point_repo.root
    mac = "52:54:00:00:09:01"
    store = assignments(root)
    store.set(mac, "rescue", "vm1@latest")
    token = store.get(mac).token  # type: ignore[union-attr]
    planner = BootPlanner(root, http_port=0, nbd_port=10809, sessions=IscsiSessions(root),
                          passphrase=None, nbd_psk=("dr-appliance", "ab" * 32))  # fmt: skip
    rescue = tmp_path / "rescue"
    rescue.mkdir()
    srv = BootHttpServer(("127.0.0.1", 0), rescue_dir=rescue, script_for=planner.script_for,
                         report=planner.report)  # fmt: skip
    planner.http_port = srv.port
    srv.start()
    base = f"http://127.0.0.1:{srv.port}"
    script_url = f"{base}/boot/{mac.replace(':', '-')}.ipxe"
    try:
        assert _get(script_url, method="HEAD")[0] == 405
        assert store.get(mac).armed  # type: ignore[union-attr]  # HEAD changed nothing
        status, _, body = _get(script_url)
        script = body.decode()
        assert status == 200 and f"restore.report={base}/rescue/{token}" in script
        assert "restore.psk=dr-appliance:" + "ab" * 32 in script
        assert (f"restore.src=nbds://dr-appliance@127.0.0.1:10809/{point_repo.point}/disk0"
                "?tls-psk-file=/etc/nbd.psk ") in script  # fmt: skip
        a = store.get(mac)
        assert a is not None and a.action == "rescue"  # fetched, still armed
        assert nbd_allow_path(root).read_text() == f"{point_repo.point}\n"  # NBD opens it
        with assert_logs("boot script asked for again", level=logging.WARNING):
            status, _, body = _get(script_url)
        assert status == 200 and token not in body.decode() and b"restore.psk" not in body
        with assert_logs("unknown or spent token", level=logging.WARNING):
            assert _post(f"{base}/rescue/{'0' * 32}/done") == 403
        assert _post(f"{base}/rescue/{token}/nonsense") == 404
        assert store.get(mac).action == "rescue"  # type: ignore[union-attr]
        with assert_logs("FAILED: nbdcopy exited 1", level=logging.ERROR):
            assert _post(f"{base}/rescue/{token}/failed", b"nbdcopy exited 1") == 200
        a = store.get(mac)
        assert a is not None and a.action == "rescue" and a.armed  # the next boot restores
        assert nbd_allow_path(root).read_text() == ""
        status, _, body = _get(script_url)
        assert status == 200 and f"/rescue/{token}" in body.decode()
        assert _post(f"{base}/rescue/{token}/done", b"RESTORE OK 1") == 200
        a = store.get(mac)
        assert a is not None and a.action == "local"
        assert nbd_allow_path(root).read_text() == ""
        with assert_logs("unknown or spent token", level=logging.WARNING):
            assert _post(f"{base}/rescue/{token}/done") == 403  # once
    finally:
        srv.stop()
        with contextlib.suppress(AssignmentError):
            store.remove(mac)


def test_boot_http_server_over_https(tmp_path: Path) -> None:
    """`--https CERT,KEY`: scripts and (Range) files over TLS; plain HTTP gets nothing."""
    import ssl

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    rescue = tmp_path / "rescue"
    rescue.mkdir()
    (rescue / "vmlinuz").write_bytes(os.urandom(300_000))
    srv = BootHttpServer(("127.0.0.1", 0), rescue_dir=rescue,
                         script_for=lambda mac, host: f"#!ipxe\necho {mac}\n",
                         tls=(cert, key))  # fmt: skip
    srv.start()
    try:
        ctx = ssl.create_default_context(cafile=str(cert))
        ctx.check_hostname = False
        base = f"https://127.0.0.1:{srv.port}"
        with urllib.request.urlopen(f"{base}/boot/52-54-00-00-00-01.ipxe", context=ctx,
                                    timeout=10) as r:  # fmt: skip
            assert r.read() == b"#!ipxe\necho 52:54:00:00:00:01\n"
        req = urllib.request.Request(f"{base}/rescue/vmlinuz", headers={"Range": "bytes=5-"})
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            assert r.status == 206 and r.read() == (rescue / "vmlinuz").read_bytes()[5:]
        with urllib.request.urlopen(f"{base}/boot.ipxe", context=ctx, timeout=10) as r:
            assert f"https://127.0.0.1:{srv.port}/boot/" in r.read().decode()
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/boot.ipxe", timeout=10)
    finally:
        srv.stop()


# -- iSCSI export without a VM ------------------------------------------------------------------


@pytest.mark.nbd_client
@pytest.mark.skipif(any(shutil.which(t) is None for t in ("tgtd", "nbdfuse", "qemu-io")),
                    reason="needs tgt, libnbd-bin, qemu-utils")  # fmt: skip
def test_iscsi_export_write_unexport_commit(point_repo: PointRepo, tmp_path: Path) -> None:
    from pxeutil import teardown_iscsi
    from vmutil import free_tcp_port

    env = {"APPLIANCE_REPO": str(point_repo.root)}
    port = free_tcp_port()
    try:
        s = json.loads(
            run_cli(
                "iscsi",
                "export",
                point_repo.point,
                "--name",
                "take1",
                "--portal",
                f"127.0.0.1:{port}",
                "--chap",
                "--json",
                env=env,
            ).stdout
        )
        # idempotent: exporting again returns the live session
        again = json.loads(run_cli("iscsi", "export", point_repo.point, "--name", "take1",
                                   "--json", env=env).stdout)  # fmt: skip
        assert again["nbd_server"] == s["nbd_server"] and again["tid"] == s["tid"]
        # CHAP: without the session's credentials no initiator gets in
        anon = subprocess.run(["qemu-img", "info", f"iscsi://127.0.0.1:{port}/{s['iqn']}/1"],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert anon.returncode != 0
        wrong = subprocess.run(
            ["qemu-img", "info", f"iscsi://{s['chap_user']}%nope@127.0.0.1:{port}/{s['iqn']}/1"],
            capture_output=True, text=True, timeout=60)  # fmt: skip
        assert wrong.returncode != 0
        assert len(s["chap_secret"]) == 16
        lun = f"iscsi://{s['chap_user']}%{s['chap_secret']}@127.0.0.1:{port}/{s['iqn']}/1"
        copy = tmp_path / "via-iscsi.img"
        subprocess.run(["qemu-img", "convert", "-O", "raw", lun, str(copy)], check=True,
                       capture_output=True, timeout=60)  # fmt: skip
        assert sha256_file(copy) == point_repo.sha256
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k", lun],
                       check=True, capture_output=True, timeout=60)  # fmt: skip
        listed = json.loads(run_cli("iscsi", "list", "--json", env=env).stdout)
        assert [(x["name"], x["alive"]) for x in listed] == [("take1", True)]
        out = run_cli("iscsi", "unexport", "take1", "--commit", "--drop", env=env).stdout
        new_point = out.strip().rsplit(" ", 1)[-1]
        assert run_cli("iscsi", "list", env=env).stdout.strip() == "no iSCSI sessions"
        from pxe.iscsi import TargetDaemon

        assert TargetDaemon().state() is None  # the last target went: tgtd stopped
        restored = tmp_path / "committed.img"
        run_cli("restore", f"{new_point}/disk0", str(restored), env=env)
        data = restored.read_bytes()
        assert data[1 << 20 : (1 << 20) + 65536] == b"\x5a" * 65536
        original = point_repo.disk.read_bytes()
        assert data[: 1 << 20] == original[: 1 << 20]
        assert data[(1 << 20) + 65536 :] == original[(1 << 20) + 65536 :]
    finally:
        teardown_iscsi(point_repo.root)


@pytest.mark.nbd_client
@pytest.mark.skipif(any(shutil.which(t) is None for t in ("tgtd", "nbdfuse", "qemu-io")),
                    reason="needs tgt, libnbd-bin, qemu-utils")  # fmt: skip
def test_iscsi_export_of_two_disks_is_two_luns(point_repo: PointRepo, tmp_path: Path) -> None:
    """Every disk of a point is a LUN of the session's target: disk0 LUN 1, disk1 LUN 2."""
    from pxeutil import teardown_iscsi
    from vmutil import free_tcp_port

    root = tmp_path / "repo2"
    env = {"APPLIANCE_REPO": str(root)}
    disk1 = tmp_path / "data.img"
    disk1.write_bytes(os.urandom(3 << 20) + bytes(1 << 20))
    run_cli("init", env=env)
    point = json.loads(run_cli("backup", "image", str(point_repo.disk), str(disk1), "--source",
                               "two", "--json", env=env).stdout)["point"]  # fmt: skip
    port = free_tcp_port()
    try:
        out = run_cli("iscsi", "export", point, "--name", "pair", "--portal",
                      f"127.0.0.1:{port}", env=env).stdout  # fmt: skip
        assert "LUN 1 = disk0, LUN 2 = disk1" in out
        s = json.loads(run_cli("iscsi", "list", "--json", env=env).stdout)[0]
        assert [(d["disk"], d["lun"]) for d in s["disks"]] == [("disk0", 1), ("disk1", 2)]
        assert s["chap_user"] is None  # no --chap: open, as for a standby host's initiator
        assert "open to every initiator" in out
        base = f"iscsi://127.0.0.1:{port}/{s['iqn']}"
        for lun, src in ((1, point_repo.disk), (2, disk1)):
            subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src),
                            f"{base}/{lun}"], check=True, capture_output=True,
                           timeout=60)  # fmt: skip
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x77 3M 64k", f"{base}/2"],
                       check=True, capture_output=True, timeout=60)  # fmt: skip
        out = run_cli("iscsi", "unexport", "pair", "--commit", "--drop", env=env).stdout
        new_point = out.strip().rsplit(" ", 1)[-1]
        got = tmp_path / "d1.img"
        run_cli("restore", f"{new_point}/disk1", str(got), env=env)
        data, orig = got.read_bytes(), disk1.read_bytes()
        assert data[3 << 20 : (3 << 20) + 65536] == b"\x77" * 65536
        assert data[: 3 << 20] == orig[: 3 << 20]
        assert data[(3 << 20) + 65536 :] == orig[(3 << 20) + 65536 :]
        d0 = tmp_path / "d0.img"
        run_cli("restore", f"{new_point}/disk0", str(d0), env=env)
        assert sha256_file(d0) == point_repo.sha256  # the other LUN untouched
    finally:
        teardown_iscsi(root)


def test_rescue_of_a_two_disk_point_needs_one_destination_per_disk(
    point_repo: PointRepo, tmp_path: Path
) -> None:
    """disk0 -> first --dst, disk1 -> second; a count mismatch is refused, and a point that
    grew a disk since the assignment gets an explanatory script instead of a half restore."""
    from appliance.commands.pxe import BootPlanner, IscsiSessions, assignments

    root = tmp_path / "repo2"
    env = {"APPLIANCE_REPO": str(root)}
    disk1 = tmp_path / "data.img"
    disk1.write_bytes(os.urandom(1 << 20))
    run_cli("init", env=env)
    run_cli("backup", "image", str(point_repo.disk), "--source", "two", env=env)
    mac = "52:54:00:00:02:01"
    run_cli("pxe", "assign", mac, "rescue", "two@latest", env=env)  # one disk: default dst
    point = json.loads(run_cli("backup", "image", str(point_repo.disk), str(disk1),
                               "--source", "two", "--json", env=env).stdout)["point"]  # fmt: skip
    planner = BootPlanner(
        root, http_port=8080, nbd_port=10809, sessions=IscsiSessions(root), passphrase=None
    )
    with assert_logs("has 2 disk\\(s\\), the assignment names 1", level=logging.ERROR):
        s = planner.script_for(mac, "10.0.0.1")
    assert "restore.src" not in s and "reassign with --dst" in s

    bad = run_cli("pxe", "assign", mac, "rescue", "two@latest", env=env, check=False)
    assert bad.returncode == 2
    assert "has 2 disk(s) (disk0, disk1) but --dst names 1" in bad.stderr
    assert "--dst /dev/sda,/dev/sdb" in bad.stderr
    dup = run_cli("pxe", "assign", mac, "rescue", "two@latest", "--dst", "/dev/sda,/dev/sda",
                  env=env, check=False)  # fmt: skip
    assert dup.returncode == 2 and "repeat" in dup.stderr
    run_cli("pxe", "assign", mac, "rescue", "two@latest", "--dst", "/dev/vda,/dev/vdb", env=env)
    s = planner.script_for(mac, "10.0.0.1")
    assert (f"restore.src=nbd://10.0.0.1:10809/{point}/disk0,"
            f"nbd://10.0.0.1:10809/{point}/disk1 restore.dst=/dev/vda,/dev/vdb ") in s  # fmt: skip
    after = assignments(root).get(mac)
    # handed out, still a rescue until the rescue system reports success
    assert after is not None and after.action == "rescue" and after.pinned == point


# -- one tgtd per appliance, SAN boot prepared on assignment ---------------------------------------

_NEEDS_ISCSI = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("tgtd", "nbdfuse", "qemu-img")),
    reason="needs tgt, libnbd-bin, qemu-utils",
)


@pytest.mark.nbd_client
@_NEEDS_ISCSI
def test_two_repositories_share_one_tgtd_with_distinct_iqns(
    point_repo: PointRepo, tmp_path: Path
) -> None:
    """Two repositories export a session of the same name on one portal: one tgtd serves
    both, the IQNs differ (repository id + session), and each LUN serves its own repository's
    bytes. The daemon outlives the first unexport and stops with the last target."""
    from pxeutil import teardown_iscsi
    from vmutil import free_tcp_port

    from pxe.iscsi import TargetDaemon, port_owners

    root_b = tmp_path / "repo-b"
    disk_b = tmp_path / "b.img"
    disk_b.write_bytes(os.urandom(8 << 20))
    env_a = {"APPLIANCE_REPO": str(point_repo.root)}
    env_b = {"APPLIANCE_REPO": str(root_b)}
    run_cli("init", env=env_b)
    point_b = json.loads(run_cli("backup", "image", str(disk_b), "--source", "vm1", "--json",
                                 env=env_b).stdout)["point"]  # fmt: skip
    port = free_tcp_port()
    portal = f"127.0.0.1:{port}"
    try:
        sa = json.loads(run_cli("iscsi", "export", point_repo.point, "--name", "vm-latest",
                                "--portal", portal, "--json", env=env_a).stdout)  # fmt: skip
        st = TargetDaemon().state()
        assert st is not None
        sb = json.loads(run_cli("iscsi", "export", point_b, "--name", "vm-latest",
                                "--portal", portal, "--json", env=env_b).stdout)  # fmt: skip
        assert TargetDaemon().state() == st  # reused, not a second daemon
        assert [o.pid for o in port_owners("127.0.0.1", port)] == [st["proc"]["pid"]]
        assert sa["iqn"] != sb["iqn"]
        assert sa["iqn"].endswith(".vm-latest") and sb["iqn"].endswith(".vm-latest")
        for s, disk in ((sa, point_repo.disk), (sb, disk_b)):
            subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(disk),
                            f"iscsi://{portal}/{s['iqn']}/1"], check=True,
                           capture_output=True, timeout=60)  # fmt: skip
        run_cli("iscsi", "unexport", "vm-latest", "--drop", env=env_a)
        assert TargetDaemon().state() == st  # repository B still has a target
        subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(disk_b),
                        f"iscsi://{portal}/{sb['iqn']}/1"], check=True, capture_output=True,
                       timeout=60)  # fmt: skip
        run_cli("iscsi", "unexport", "vm-latest", "--drop", env=env_b)
        assert TargetDaemon().state() is None
    finally:
        teardown_iscsi(point_repo.root)
        teardown_iscsi(root_b)


@pytest.mark.nbd_client
@_NEEDS_ISCSI
def test_busy_iscsi_portal_is_an_error_naming_its_owner(point_repo: PointRepo) -> None:
    """A port another process listens on is refused with its pid and command, whether tgtd
    must be started for it or a running tgtd is asked to add it."""
    import socket

    from pxeutil import teardown_iscsi
    from vmutil import free_tcp_port

    env = {"APPLIANCE_REPO": str(point_repo.root)}
    squatter = socket.socket()
    squatter.bind(("0.0.0.0", 0))  # a wildcard listener collides with 127.0.0.1 too
    squatter.listen(1)
    busy = squatter.getsockname()[1]
    try:
        for name in ("busy1", "busy2"):
            proc = run_cli("iscsi", "export", point_repo.point, "--name", name, "--portal",
                           f"127.0.0.1:{busy}", env=env, check=False)  # fmt: skip
            assert proc.returncode == 2, proc.stdout + proc.stderr
            assert f"iSCSI portal 127.0.0.1:{busy} is busy: pid {os.getpid()} (" in proc.stderr
            assert "python" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
            listed = json.loads(run_cli("iscsi", "list", "--json", env=env).stdout)
            assert name not in [x["name"] for x in listed]  # nothing half-made left
            if name == "busy1":  # now with a tgtd running on another portal
                run_cli("iscsi", "export", point_repo.point, "--name", "ok1", "--portal",
                        f"127.0.0.1:{free_tcp_port()}", env=env)  # fmt: skip
    finally:
        squatter.close()
        teardown_iscsi(point_repo.root)


@pytest.mark.nbd_client
@_NEEDS_ISCSI
def test_sanboot_is_prepared_on_assign_and_its_script_handed_out_once(
    serve: Serve, point_repo: PointRepo
) -> None:
    """`pxe assign MAC sanboot P` makes the overlay and the target before any fetch; the
    script with the CHAP secret is handed out once (second GET: no secret; HEAD: nothing);
    assigning again rotates the secret; `pxe serve` says on exit which sessions it leaves."""
    env = serve.env()
    mac = "52:54:00:d1:00:42"
    session = "pxe-525400d10042"
    out = run_cli("pxe", "assign", mac, "sanboot", point_repo.point, env=env).stdout
    assert f"iSCSI session {session}" in out and f"127.0.0.1:{serve.portal_port}" in out
    s = json.loads(run_cli("iscsi", "list", "--json", env=env).stdout)[0]
    assert (s["name"], s["alive"]) == (session, True)  # before any fetch
    overlays = json.loads(run_cli("overlay", "list", "--json", env=env).stdout)
    assert session in [o["name"] for o in overlays]
    url = serve.url(f"/boot/{mac.replace(':', '-')}.ipxe")
    assert _get(url, method="HEAD")[0] == 405
    status, _, body = _get(url)
    script = body.decode()
    assert status == 200 and f"set password {s['chap_secret']}" in script
    assert f"sanboot iscsi:127.0.0.1::{serve.portal_port}:1:{s['iqn']}" in script
    status, _, body = _get(url)
    assert status == 200 and b"set password" not in body and s["chap_secret"].encode() not in body
    lun = f"127.0.0.1:{serve.portal_port}/{s['iqn']}/1"
    ok = subprocess.run(["qemu-img", "info", f"iscsi://{s['chap_user']}%{s['chap_secret']}@{lun}"],
                        capture_output=True, timeout=60)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    run_cli("pxe", "assign", mac, "sanboot", point_repo.point, env=env)  # re-arm: new secret
    s2 = json.loads(run_cli("iscsi", "list", "--json", env=env).stdout)[0]
    assert s2["chap_secret"] != s["chap_secret"] and s2["iqn"] == s["iqn"]
    old = subprocess.run(["qemu-img", "info", f"iscsi://{s['chap_user']}%{s['chap_secret']}@{lun}"],
                         capture_output=True, timeout=60)  # fmt: skip
    assert old.returncode != 0  # whoever saw the spent script cannot log in any more

    # supervised: the tgtd dies, `pxe serve` restarts it and the session (same credentials)
    from pxe.iscsi import TargetDaemon

    st = TargetDaemon().state()
    assert st is not None
    os.kill(st["proc"]["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while f"restarted iSCSI session {session}" not in serve.log_path.read_text():
        assert time.monotonic() < deadline and serve.proc.poll() is None, serve.log_path.read_text()
        time.sleep(0.2)
    st2 = TargetDaemon().state()
    assert st2 is not None and st2["proc"] != st["proc"]
    s3 = json.loads(run_cli("iscsi", "list", "--json", env=env).stdout)[0]
    assert s3["alive"] and s3["chap_secret"] == s2["chap_secret"]
    again = subprocess.run(
        ["qemu-img", "info", f"iscsi://{s2['chap_user']}%{s2['chap_secret']}@{lun}"],
        capture_output=True, timeout=60)  # fmt: skip
    assert again.returncode == 0, again.stderr

    serve.proc.send_signal(signal.SIGTERM)
    assert serve.proc.wait(30) == 0
    text = serve.log_path.read_text()
    assert "1 SAN-boot/iSCSI session(s) keep running" in text
    assert f"{session}: {point_repo.point}" in text and f"appliance pxe unassign {mac}" in text


@pytest.mark.nbd_client
@pytest.mark.skipif(shutil.which("nbdinfo") is None, reason="needs libnbd-bin")
def test_pxe_serve_nbd_is_tls_and_exports_only_points_being_restored(
    serve: Serve, point_repo: PointRepo
) -> None:
    """`pxe serve`'s NBD server needs the PSK (clear text is refused) and exports nothing
    until a rescue script is handed out; then exactly the pinned point, until it is done."""
    env = serve.env()
    psk = serve.root / "pxe" / "nbd.psk"
    assert psk.stat().st_mode & 0o077 == 0
    user = psk.read_text().split(":", 1)[0]
    base = f"nbds://{user}@127.0.0.1:{serve.nbd_port}"

    def exports() -> set[str]:
        out = subprocess.run(["nbdinfo", "--list", "--json", f"{base}/?tls-psk-file={psk}"],
                             capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
        return {e["export-name"] for e in json.loads(out.stdout)["exports"]}

    assert exports() == set()
    clear = subprocess.run(["nbdinfo", "--list", f"nbd://127.0.0.1:{serve.nbd_port}"],
                           capture_output=True, timeout=60)  # fmt: skip
    assert clear.returncode != 0
    mac = "52:54:00:d1:00:43"
    run_cli("pxe", "assign", mac, "rescue", point_repo.point, env=env)
    assert exports() == set()  # assigned, not booting yet
    status, _, body = _get(serve.url(f"/boot/{mac.replace(':', '-')}.ipxe"))
    assert status == 200 and b"restore.psk=" in body
    # the pinned point (and @latest only if it is that point: other tests commit new points)
    assert exports() - {"vm1@latest/disk0"} == {f"{point_repo.point}/disk0"}
    size = subprocess.run(["nbdinfo", "--size",
                           f"{base}/{point_repo.point}/disk0?tls-psk-file={psk}"],
                          capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    assert int(size.stdout) == point_repo.size
    token = next(a for a in assignments_of(serve) if a.mac == mac).token
    assert _post(serve.url(f"/rescue/{token}/done"), b"RESTORE OK") == 200
    assert exports() == set()


def assignments_of(serve: Serve) -> list[Assignment]:
    return AssignmentStore(serve.root / "pxe").all()
