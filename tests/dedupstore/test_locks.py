"""Locks only extend (issue 8 item 5): shortening needs force, immutable repositories refuse
it outright, every change is recorded and an index rebuild restores it."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from testlib import assert_logs, make_image, run_cli

from dedupstore import InvalidArgument, Locked, Repository, backup_image, rebuild_index
from dedupstore import delete_point as delete_checked

DAY = 86400.0


def _point(root: Path, tmp_path: Path, *, immutable: bool = False) -> str:
    Repository.create(root, immutable=immutable)
    img = make_image(tmp_path / "d.img", 1)
    with Repository.open(root, writable=True) as repo:
        return backup_image(repo, [img], source="vm1", mode="full").name


def test_lock_cannot_be_shortened_or_removed_without_force(tmp_path: Path) -> None:
    root = tmp_path / "r"
    name = _point(root, tmp_path)
    now = time.time()
    with Repository.open(root, writable=True) as repo:
        p = repo.lock_point(repo.resolve(name), now + 10 * DAY)
        p = repo.lock_point(p, now + 20 * DAY)  # extending is always fine
        with pytest.raises(Locked, match="can only be extended"):
            repo.lock_point(p, now + 5 * DAY)
        with pytest.raises(Locked, match="can only be extended"):
            repo.lock_point(p, None)
        with pytest.raises(Locked, match="can only be extended"):
            repo.lock_point(p, 0.0)  # 1970: what used to unlock a point
        assert repo.resolve(name).locked_until == now + 20 * DAY
        with pytest.raises(Locked, match="locked until"):
            delete_checked(repo, repo.resolve(name))
        with assert_logs("changed by force"):
            p = repo.lock_point(p, now + 1 * DAY, force=True)
        with assert_logs("changed by force"):
            p = repo.lock_point(p, None, force=True)
        hist = repo.lock_history(p)
        assert [(h["prev"], h["until"], h["forced"]) for h in hist] == [
            (None, now + 10 * DAY, False),
            (now + 10 * DAY, now + 20 * DAY, False),
            (now + 20 * DAY, now + 1 * DAY, True),
            (now + 1 * DAY, None, True),
        ]
        with pytest.raises(InvalidArgument, match="in the past"):
            repo.lock_point(p, now - DAY)
        delete_checked(repo, repo.resolve(name))  # unlocked: deletable
        assert repo.list_points() == []


def test_immutable_repository_refuses_shortening_and_deletion_even_forced(
    tmp_path: Path,
) -> None:
    root = tmp_path / "r"
    name = _point(root, tmp_path, immutable=True)
    now = time.time()
    with Repository.open(root, writable=True) as repo:
        assert repo.config.immutable
        p = repo.lock_point(repo.resolve(name), now + 10 * DAY)
        for until in (now + DAY, None):
            with pytest.raises(Locked, match="immutable"):
                repo.lock_point(p, until, force=True)
        with pytest.raises(Locked, match="immutable"):
            repo.delete_point(repo.resolve(name), force=True)
        p = repo.lock_point(p, now + 30 * DAY)
        assert repo.resolve(name).locked_until == now + 30 * DAY


def test_rebuild_restores_lock_and_history(tmp_path: Path) -> None:
    """Plain repository: the newest record wins (a forced shortening stays shortened)."""
    root = tmp_path / "r"
    name = _point(root, tmp_path)
    now = time.time()
    with Repository.open(root, writable=True) as repo:
        p = repo.lock_point(repo.resolve(name), now + 10 * DAY)
        with assert_logs("changed by force"):
            repo.lock_point(p, now + 2 * DAY, force=True)
        hist = repo.lock_history(p)
    shutil.rmtree(root / "index")
    with Repository.open(root, writable=True) as repo:
        rebuild_index(repo)
        p = repo.resolve(name)
        assert p.locked_until == now + 2 * DAY
        assert repo.lock_history(p) == hist


def test_rebuild_of_immutable_repository_keeps_the_latest_end(tmp_path: Path) -> None:
    """Immutable: locks only extend, so the rebuild takes the latest end date of any record,
    even when a newer record says less (as a replayed or forged one would)."""
    root = tmp_path / "r"
    name = _point(root, tmp_path, immutable=True)
    now = time.time()
    with Repository.open(root, writable=True) as repo:
        p = repo.lock_point(repo.resolve(name), now + 40 * DAY)
        # a later LOCKREC with an earlier end, as only a tampered repository would hold
        import msgpack

        from dedupstore import Kind

        repo.put(
            Kind.LOCKREC,
            msgpack.packb(
                {"lock": p.name, "until": now + DAY, "prev": None, "time_ns": time.time_ns()}
            ),
        )
        repo.flush()
    shutil.rmtree(root / "index")
    with Repository.open(root, writable=True) as repo:
        rebuild_index(repo)
        assert repo.resolve(name).locked_until == now + 40 * DAY


def test_cli_acceptance_lock_then_shorter_lock_is_refused(tmp_path: Path) -> None:
    r = str(tmp_path / "r")
    img = make_image(tmp_path / "disk.img", 1)
    run_cli("--repo", r, "init")
    run_cli("--repo", r, "backup", "image", str(img), "--source", "vm1")
    run_cli("--repo", r, "lock", "vm1@latest", "--until", "2030-01-01")
    short = run_cli("--repo", r, "lock", "vm1@latest", "--until", "2020-01-01", check=False)
    assert short.returncode != 0
    assert "can only be extended" in short.stderr and "Traceback" not in short.stderr
    gone = run_cli("--repo", r, "delete", "vm1@latest", check=False)
    assert gone.returncode != 0 and "locked until 2030-01-01" in gone.stderr
    no_force = run_cli("--repo", r, "unlock", "vm1@latest", check=False)
    assert no_force.returncode != 0 and "--force" in no_force.stderr
    out = run_cli("--repo", r, "unlock", "vm1@latest", "--force", warnings_ok=True)
    assert "changed by force" in out.stderr  # the log line of a forced change
    hist = json.loads(run_cli("--repo", r, "lock", "vm1@latest", "--history", "--json").stdout)
    assert hist["locked_until"] is None
    assert [h["forced"] for h in hist["history"]] == [False, True]
    text = run_cli("--repo", r, "lock", "vm1@latest", "--history").stdout
    assert "2030-01-01 00:00:00 UTC -> none  (forced)" in text
    run_cli("--repo", r, "delete", "vm1@latest")


def test_cli_immutable_repository(tmp_path: Path) -> None:
    r = str(tmp_path / "r")
    img = make_image(tmp_path / "disk.img", 1)
    out = run_cli("--repo", r, "init", "--immutable")
    assert "immutable" in out.stdout
    assert json.loads((tmp_path / "r" / "config.json").read_text())["immutable"] is True
    run_cli("--repo", r, "backup", "image", str(img), "--source", "vm1")
    run_cli("--repo", r, "lock", "vm1@latest", "--until", "2030-01-01")
    for args in (
        ("lock", "vm1@latest", "--until", "2029-01-01", "--force"),
        ("unlock", "vm1@latest", "--force"),
    ):
        res = run_cli("--repo", r, *args, check=False)
        assert res.returncode != 0 and "immutable" in res.stderr, res.stderr
    res = run_cli("--repo", r, "delete", "vm1@latest", check=False)
    assert res.returncode != 0 and "immutable" in res.stderr
    pruned = json.loads(run_cli("--repo", r, "prune", "--keep-last", "1", "--json").stdout)
    assert pruned["deleted"] == []
    run_cli("--repo", r, "lock", "vm1@latest", "--until", "2031-01-01")
