"""Fixtures for NBD tests: a real repository with a real image, and real nbdkit servers.

Every server is started on port 0 (socket activation: no port race) and stopped by PID in a
finalizer, so a failing test never leaves nbdkit behind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nbdutil import RepoImage, make_image, need

from dedupstore import Repository, backup_image
from nbd import NbdServer


@pytest.fixture(scope="module")
def repo_image(tmp_path_factory: pytest.TempPathFactory) -> RepoImage:
    base = tmp_path_factory.mktemp("nbdrepo")
    root = base / "repo"
    Repository.create(root)
    img = base / "disk.img"
    data = make_image(img)
    with Repository.open(root, writable=True) as repo:
        p = backup_image(repo, [img], source="vm1", mode="full")
    return RepoImage(root, img, data, p.name)


@pytest.fixture
def server_factory() -> Iterator[Callable[..., NbdServer]]:
    """Start NbdServers; every one is stopped (SIGTERM, then SIGKILL by PID) at teardown."""
    need("nbdkit")
    started: list[NbdServer] = []

    def start(root: Path, **kw: Any) -> NbdServer:
        if "socket" not in kw:
            kw.setdefault("listen", "127.0.0.1:0")
        srv = NbdServer(root, **kw)
        started.append(srv)
        srv.start()
        return srv

    yield start
    for srv in started:
        srv.stop(timeout_s=5)


@pytest.fixture
def server(repo_image: RepoImage, server_factory: Callable[..., NbdServer]) -> NbdServer:
    return server_factory(repo_image.root)
