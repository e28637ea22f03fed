"""File-tree restores never write outside DEST (issue 8 item 16).

Symlinks already in DEST are not followed (they are replaced where the point has a
directory), symlinks the restore itself creates are never traversed, hard links in DEST are
not written through, and names such as ".." in a (crafted) point are skipped with a warning.
Hostile points are built from a real backup whose item stream is rewritten and committed as
a new point, as a damaged or forged repository would hold it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from testlib import assert_logs

from dedupstore import Dest, Kind, Point, Repository, UnsafePath, backup_tree, restore_tree

Items = list[dict[str, Any]]


def _backup(repo_dir: Path, src: Path) -> Point:
    with Repository.open(repo_dir, writable=True) as repo:
        return backup_tree(repo, src, source="t", mode="full")


def _craft(repo_dir: Path, base: Point, edit: Callable[[Items], Items]) -> Point:
    """A new point whose item stream is `edit(items of base)`."""
    with Repository.open(repo_dir, writable=True) as repo:
        base = repo.resolve(base.name)
        unpacker = msgpack.Unpacker(raw=False)
        for cid in base.manifest["tree"]:
            unpacker.feed(repo.get(bytes(cid)))
        items = edit(list(unpacker))
        stream = b"".join(msgpack.packb(i) for i in items)
        tree_id = repo.put(Kind.TREE, stream).chunk_id
        now = time.time_ns()
        manifest = {
            **base.manifest,
            "id": repo.new_point_id("t", now),
            "time_ns": now,
            "tree": [tree_id],
            "entries": len(items),
            "parent": None,
        }
        return repo.commit_point(manifest)


def _item(items: Items, path: str) -> dict[str, Any]:
    return next(i for i in items if i["p"] == path)


def _outside_untouched(outside: Path) -> None:
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]
    assert (outside / "keep.txt").read_bytes() == b"not yours\n"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    d = tmp_path / "outside"
    d.mkdir()
    (d / "keep.txt").write_bytes(b"not yours\n")
    return d


def test_symlink_in_dest_is_replaced_not_followed(
    repo_dir: Path, tmp_path: Path, outside: Path
) -> None:
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "hosts").write_bytes(b"127.0.0.1 localhost\n")
    (src / "top.txt").write_bytes(b"top\n")
    p = _backup(repo_dir, src)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "etc").symlink_to(outside)  # DEST/etc -> /elsewhere
    (dest / "top.txt").symlink_to(outside / "keep.txt")  # a file name that is a link
    with Repository.open(repo_dir) as repo:
        assert restore_tree(repo, p, dest) == 4
    _outside_untouched(outside)
    assert not (dest / "etc").is_symlink() and (dest / "etc").is_dir()
    assert (dest / "etc" / "hosts").read_bytes() == b"127.0.0.1 localhost\n"
    assert not (dest / "top.txt").is_symlink()
    assert (dest / "top.txt").read_bytes() == b"top\n"


def test_subpath_restore_into_symlinked_dir(repo_dir: Path, tmp_path: Path, outside: Path) -> None:
    """Restoring one directory of a point: links beneath DEST are still not followed."""
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "f").write_bytes(b"f\n")
    p = _backup(repo_dir, src)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "b").symlink_to(outside)
    with Repository.open(repo_dir) as repo:
        restore_tree(repo, p, dest, subpath="a")
    _outside_untouched(outside)
    assert (dest / "b" / "f").read_bytes() == b"f\n" and not (dest / "b").is_symlink()


def test_hard_link_in_dest_is_not_written_through(
    repo_dir: Path, tmp_path: Path, outside: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "keep.txt").write_bytes(b"restored\n")
    p = _backup(repo_dir, src)
    dest = tmp_path / "dest"
    dest.mkdir()
    os.link(outside / "keep.txt", dest / "keep.txt")
    with Repository.open(repo_dir) as repo:
        restore_tree(repo, p, dest)
    _outside_untouched(outside)
    assert (dest / "keep.txt").read_bytes() == b"restored\n"


def test_symlink_created_by_the_restore_is_never_traversed(
    repo_dir: Path, tmp_path: Path, outside: Path
) -> None:
    """A point with `a -> OUTSIDE` followed by `a/file` (and `b -> OUTSIDE` then a directory
    `b` holding `b/file`): the first file is skipped, the directory replaces the link."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "file").write_bytes(b"payload\n")
    os.symlink(outside, src / "a")
    p = _backup(repo_dir, src)

    def edit(items: Items) -> Items:
        link, d, f = _item(items, "a"), _item(items, "d"), _item(items, "d/file")
        root = _item(items, "")
        return [
            root,
            link,
            {**f, "p": "a/file"},
            {**link, "p": "b"},
            {**d, "p": "b"},
            {**f, "p": "b/file"},
        ]

    evil = _craft(repo_dir, p, edit)
    dest = tmp_path / "dest"
    with Repository.open(repo_dir) as repo, assert_logs(r"'a/file'.*not a directory", count=1):
        restore_tree(repo, evil, dest)
    _outside_untouched(outside)
    assert (dest / "a").is_symlink() and os.readlink(dest / "a") == str(outside)
    assert not (dest / "b").is_symlink()
    assert (dest / "b" / "file").read_bytes() == b"payload\n"


@pytest.mark.parametrize("bad", ["..", "../escape", "x/../../escape", "./.", ""])
def test_dot_dot_paths_in_a_point_are_skipped(repo_dir: Path, tmp_path: Path, bad: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"payload\n")
    (src / "x").mkdir()
    p = _backup(repo_dir, src)

    def edit(items: Items) -> Items:
        return [*items, {**_item(items, "f"), "p": bad if bad else "x//y"}]

    evil = _craft(repo_dir, p, edit)
    dest = tmp_path / "deep" / "dest"
    with Repository.open(repo_dir) as repo, assert_logs("unsafe name", count=1):
        restore_tree(repo, evil, dest)
    assert sorted(os.listdir(tmp_path / "deep")) == ["dest"]
    assert sorted(os.listdir(tmp_path)) == ["deep", "repo", "src"]
    assert (dest / "f").read_bytes() == b"payload\n"


def test_nonempty_dir_in_the_way_is_kept(repo_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "name").write_bytes(b"a file\n")
    p = _backup(repo_dir, src)
    dest = tmp_path / "dest"
    (dest / "name").mkdir(parents=True)
    (dest / "name" / "mine").write_bytes(b"keep\n")
    with Repository.open(repo_dir) as repo, assert_logs("non-empty directory", count=1):
        restore_tree(repo, p, dest)
    assert (dest / "name" / "mine").read_bytes() == b"keep\n"


def test_dest_writer_round_trips_undecodable_names(tmp_path: Path, outside: Path) -> None:
    """Names arrive as str with surrogate escapes; the writer creates the original bytes."""
    name = b"caf\xe9-\xff".decode("utf-8", "surrogateescape")
    with Dest(tmp_path / "d") as out:
        out.mkdir(name)
        fd = out.create_file(f"{name}/{name}")
        os.write(fd, b"x")
        os.close(fd)
        out.symlink(f"{name}/link", str(outside))
        with pytest.raises(UnsafePath):
            out.create_file(f"{name}/link/evil")
    assert os.listdir(os.fsencode(tmp_path / "d")) == [b"caf\xe9-\xff"]
    assert (tmp_path / "d" / name / name).read_bytes() == b"x"
    _outside_untouched(outside)


def test_nested_symlink_in_dest_is_replaced(repo_dir: Path, tmp_path: Path, outside: Path) -> None:
    src = tmp_path / "src"
    (src / "a" / "b" / "c").mkdir(parents=True)
    (src / "a" / "b" / "c" / "f").write_bytes(b"deep\n")
    (src / "a" / "g").write_bytes(b"g\n")
    p = _backup(repo_dir, src)
    dest = tmp_path / "dest"
    (dest / "a").mkdir(parents=True)
    (dest / "a" / "b").symlink_to(outside)
    (dest / "a" / "g").symlink_to(outside / "keep.txt")
    with Repository.open(repo_dir) as repo:
        restore_tree(repo, p, dest)
    _outside_untouched(outside)
    assert (dest / "a" / "b" / "c" / "f").read_bytes() == b"deep\n"
    assert (dest / "a" / "g").read_bytes() == b"g\n" and not (dest / "a" / "g").is_symlink()
