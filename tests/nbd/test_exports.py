"""The export catalogue without a server: names, descriptions, errors, overlay sharing."""

from __future__ import annotations

from pathlib import Path

import pytest
from nbdutil import ZERO_END, ZERO_START, RepoImage

from dedupstore import (
    Locked,
    NotFound,
    ReadOnly,
    Repository,
    StoreError,
    create_overlay,
    open_overlay,
)
from nbd import Catalogue


def test_names_descriptions_and_reads(repo_image: RepoImage) -> None:
    with Repository.open(repo_image.root) as repo:
        cat = Catalogue(repo)
        names = dict(cat.list_exports())
        assert f"{repo_image.point}/disk0" in names
        assert "vm1@latest/disk0" in names
        ex = cat.open("vm1@latest/disk0", readonly=False)
        assert not ex.writable
        assert ex.size_bytes() == len(repo_image.data)
        assert ex.pread(12345, 100) == repo_image.data[12345:12445]
        with pytest.raises(ReadOnly):
            ex.pwrite(0, b"x")
        runs = ex.extents(0, len(repo_image.data))
        assert (ZERO_START, ZERO_END - ZERO_START, True) in runs
        assert len(ex.extents(0, len(repo_image.data), first_only=True)) == 1
        ex.close()
        for bad in ("", "nosuch@latest/disk0", "vm1@latest/disk9", "junk", "overlay/x",
                    "overlay/nosuch/disk0", "@/disk0"):
            with pytest.raises(StoreError) as info:
                cat.open(bad, readonly=False)
            assert getattr(info.value, "errno", None) is not None, bad


def test_overlay_shared_between_connections(repo_image: RepoImage, tmp_path: Path) -> None:
    with Repository.open(repo_image.root) as repo:
        create_overlay(repo, repo_image.point, "share")
        cat = Catalogue(repo, overlays_only=True)
        assert [n for n, _d in cat.list_exports()] == ["overlay/share/disk0"]
        with pytest.raises(NotFound):
            cat.open("vm1@latest/disk0", readonly=False)
        a = cat.open("overlay/share/disk0", readonly=False)
        b = cat.open("overlay/share/disk0", readonly=False)
        a.pwrite(100, b"hello")
        assert b.pread(100, 5) == b"hello"  # one OverlayDisk behind both connections
        with pytest.raises(Locked):
            open_overlay(repo, "share")
        a.close()
        with pytest.raises(Locked):
            open_overlay(repo, "share")
        b.close()  # the last connection releases the overlay (flushed)
        with open_overlay(repo, "share") as ov:
            assert ov.disk("disk0").pread(100, 5) == b"hello"
        from dedupstore import drop_overlay

        drop_overlay(repo, "share")


def test_allow_list_exports_only_the_assigned_point(repo_image: RepoImage) -> None:
    """A PXE session's server exports only its point: other points, their @latest alias and
    overlays are neither listed nor opened; the list is asked again on every call."""
    allowed: set[str] = {repo_image.point}
    with Repository.open(repo_image.root) as repo:
        create_overlay(repo, repo_image.point, "allowtest")
        cat = Catalogue(repo, allow=lambda: frozenset(allowed))
        try:
            names = dict(cat.list_exports())
            assert f"{repo_image.point}/disk0" in names and "vm1@latest/disk0" in names
            assert not any(n.startswith("overlay/") for n in names)
            cat.open(f"{repo_image.point}/disk0", readonly=True).close()
            with pytest.raises(NotFound, match="only assigned overlays"):
                cat.open("overlay/allowtest/disk0", readonly=False)
            allowed.clear()
            assert cat.list_exports() == []
            with pytest.raises(NotFound, match="only assigned points"):
                cat.open("vm1@latest/disk0", readonly=True)
            allowed.add("overlay/allowtest")
            assert [n for n, _ in cat.list_exports()] == ["overlay/allowtest/disk0"]
            cat.open("overlay/allowtest/disk0", readonly=False).close()
        finally:
            cat.close()
            from dedupstore import drop_overlay

            drop_overlay(repo, "allowtest")
