"""The CLI contract, end to end through the `appliance` executable."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from testlib import flip_byte, make_image, run_cli, sha256_file

PW = {"APPLIANCE_PASSPHRASE": "correct horse"}


def test_encrypted_image_flow_and_verify_names_points(tmp_path: Path) -> None:
    r = str(tmp_path / "r")
    img = make_image(tmp_path / "disk.img", 8)
    run_cli("--repo", r, "init", "--encryption", "aes-256-gcm", env=PW)
    run_cli("--repo", r, "backup", "image", str(img), "--source", "vm1", env=PW)
    with open(img, "r+b") as fh:
        fh.seek(3 << 20)
        fh.write(os.urandom(10_000))
    out = run_cli("--repo", r, "backup", "image", str(img), "--source", "vm1", "--mode",
                  "incremental", "--json", env=PW)
    inc = json.loads(out.stdout)
    assert inc["mode"] == "incremental" and inc["stats"]["new_chunks"] <= 2
    run_cli("--repo", r, "restore", "vm1@latest", str(tmp_path / "out.img"), env=PW)
    assert sha256_file(tmp_path / "out.img") == sha256_file(img)
    assert run_cli("--repo", r, "verify", env=PW).returncode == 0
    points = json.loads(run_cli("--repo", r, "points", "--json", env=PW).stdout)
    assert [p["mode"] for p in points] == ["full", "incremental"]
    # flip one byte inside the first pack's payloads
    pack = sorted((tmp_path / "r" / "packs").rglob("*.pack"))[0]
    flip_byte(pack, pack.stat().st_size // 2)
    bad = run_cli("--repo", r, "verify", env=PW, check=False)
    assert bad.returncode != 0
    for p in points:
        assert f"DAMAGED {p['name']}" in bad.stdout
    # wrong passphrase: one clear line, no traceback
    wrong = run_cli("--repo", r, "points", env={"APPLIANCE_PASSPHRASE": "nope"}, check=False)
    assert wrong.returncode != 0
    assert "wrong passphrase" in wrong.stderr and "Traceback" not in wrong.stderr


def test_files_flow_stats_prune_gc(tmp_path: Path) -> None:
    r = str(tmp_path / "r")
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "one.txt").write_text("one\n" * 1000)
    (src / "two.bin").write_bytes(os.urandom(300_000))
    os.symlink("a/one.txt", src / "link")
    run_cli("--repo", r, "init", "--compression", "lzo", "--hash", "blake3")
    for _ in range(3):
        run_cli("--repo", r, "backup", "files", str(src), "--source", "docs")
    dest = tmp_path / "dest"
    run_cli("--repo", r, "restore", "docs@latest", str(dest))
    assert subprocess.run(["diff", "-r", str(src), str(dest)]).returncode == 0
    st = json.loads(run_cli("--repo", r, "stats", "--json").stdout)
    assert st["points"] == 3 and st["dedup_ratio"] >= 2.9
    pr = json.loads(run_cli("--repo", r, "prune", "--keep-last", "1", "--json").stdout)
    assert len(pr["deleted"]) == 2 and len(pr["kept"]) == 1
    gc = json.loads(run_cli("--repo", r, "gc", "--json").stdout)
    assert gc["live_chunks"] > 0
    run_cli("--repo", r, "restore", "docs@latest/a/one.txt", str(tmp_path / "one.txt"))
    assert (tmp_path / "one.txt").read_text() == "one\n" * 1000


def test_lock_synthesize_repair(tmp_path: Path) -> None:
    r = str(tmp_path / "r")
    img = make_image(tmp_path / "d.img", 2)
    run_cli("--repo", r, "init", "--block-size", "16K", "--compression", "gzip")
    run_cli("--repo", r, "backup", "image", str(img), "--source", "vm", "--mode", "full")
    run_cli("--repo", r, "synthesize", "vm")
    pts = json.loads(run_cli("--repo", r, "points", "--json").stdout)
    assert pts[-1]["mode"] == "synthetic"
    run_cli("--repo", r, "lock", pts[0]["name"], "--until", "2099-01-01")
    res = run_cli("--repo", r, "delete", pts[0]["name"], check=False)
    assert res.returncode != 0 and "locked until 2099-01-01" in res.stderr
    pr = json.loads(run_cli("--repo", r, "prune", "--keep-last", "1", "--json").stdout)
    assert pr["deleted"] == [] and {"point": pts[0]["name"], "reason": "locked"} in pr["kept"]
    rep = json.loads(run_cli("--repo", r, "repair", "--rebuild-index", "--json").stdout)
    assert rep["points"] == 2
    run_cli("--repo", r, "restore", pts[-1]["name"], str(tmp_path / "o.img"))
    assert sha256_file(tmp_path / "o.img") == sha256_file(img)


def test_user_errors_are_one_line(tmp_path: Path) -> None:
    r = str(tmp_path / "r")
    cases = [
        ("--repo", r, "points"),  # no repository
        ("--repo", r, "init", "--block-size", "3K"),
    ]
    for args in cases:
        res = run_cli(*args, check=False)
        assert res.returncode != 0
        assert "Traceback" not in res.stderr
        assert res.stderr.strip().count("\n") == 0, res.stderr
    run_cli("--repo", r, "init")
    for args in [("restore", "ghost@latest", str(tmp_path / "x")),
                 ("backup", "image", str(tmp_path / "missing.img"), "--source", "a"),
                 ("backup", "files", str(tmp_path), "--source", "bad/name"),
                 ("lock", "ghost@latest", "--until", "soon")]:
        res = run_cli("--repo", r, *args, check=False)
        assert res.returncode != 0, args
        assert "Traceback" not in res.stderr and res.stderr.startswith("appliance: error:")


def test_second_writer_is_refused(tmp_path: Path) -> None:
    from dedupstore import Repository

    r = tmp_path / "r"
    run_cli("--repo", str(r), "init")
    img = make_image(tmp_path / "d.img", 1)
    with Repository.open(r, writable=True):
        res = run_cli("--repo", str(r), "backup", "image", str(img), "--source", "x",
                      check=False)
        assert res.returncode != 0 and "busy" in res.stderr
        # readers still work while the writer holds the lock
        assert run_cli("--repo", str(r), "points").returncode == 0


def test_bench_command() -> None:
    out = json.loads(run_cli("bench", "--json").stdout)
    assert out["sha256"] > 0 and out["zstd-3 compress"] > 0


def test_used_only_backup_of_ext4_image(tmp_path: Path) -> None:
    """--used-only reads less than the image, and the restored filesystem is intact."""
    src = tmp_path / "files"
    src.mkdir()
    for i in range(20):
        (src / f"f{i}.bin").write_bytes(os.urandom(200_000))
    img = tmp_path / "disk.img"
    part = tmp_path / "p1.img"
    with open(img, "wb") as fh:
        fh.truncate(64 << 20)
    subprocess.run(["sfdisk", "-q", str(img)], input=b"label: dos\nstart=2048, type=83\n",
                   check=True)
    with open(part, "wb") as fh:
        fh.truncate(63 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(src), str(part)], check=True)
    with open(img, "r+b") as fh:
        fh.seek(1 << 20)
        fh.write(part.read_bytes())
    r = str(tmp_path / "r")
    run_cli("--repo", r, "init")
    st = json.loads(run_cli("--repo", r, "backup", "image", str(img), "--source", "u",
                            "--used-only", "--json").stdout)["stats"]
    assert st["read_bytes"] < 0.6 * (64 << 20)
    out = tmp_path / "out.img"
    run_cli("--repo", r, "restore", "u@latest", str(out))
    with open(out, "rb") as fh:
        fh.seek(1 << 20)
        (tmp_path / "p1-restored.img").write_bytes(fh.read(63 << 20))
    fsck = subprocess.run(["e2fsck", "-fn", str(tmp_path / "p1-restored.img")],
                          capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout
    # file-level restore straight out of the image point
    run_cli("--repo", r, "restore", "u@latest/disk0/p1/f7.bin", str(tmp_path / "f7.bin"))
    assert (tmp_path / "f7.bin").read_bytes() == (src / "f7.bin").read_bytes()


def test_repair_a_garbage_index(tmp_path: Path) -> None:
    """An unreadable index is a one-line error; repair rebuilds it from the packs."""
    r = str(tmp_path / "r")
    img = make_image(tmp_path / "d.img", 3)
    run_cli("--repo", r, "init")
    run_cli("--repo", r, "backup", "image", str(img), "--source", "vm1")
    (tmp_path / "r" / "index" / "data.mdb").write_bytes(b"garbage" * 100)
    bad = run_cli("--repo", r, "points", check=False)
    assert bad.returncode != 0 and "rebuild-index" in bad.stderr and "Traceback" not in bad.stderr
    run_cli("--repo", r, "repair", "--rebuild-index")
    run_cli("--repo", r, "restore", "vm1@latest", str(tmp_path / "o.img"))
    assert sha256_file(tmp_path / "o.img") == sha256_file(img)
