"""Fixtures for vfs/ tests (helpers in vfs_testutil.py): images and repositories built once."""

from __future__ import annotations

from pathlib import Path

import pytest
from vfs_testutil import Images, backup, build_images, new_repo


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    return build_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def image_repo(tmp_path_factory: pytest.TempPathFactory, images: Images) -> Path:
    """A repository with one point vm1@<id> of disk0 + disk1 (never modified by tests)."""
    root = new_repo(tmp_path_factory.mktemp("repo") / "repo")
    backup(root, [images.disk0, images.disk1])
    return root
