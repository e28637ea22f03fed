"""Shared fixtures: repositories."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def repo_dir(tmp_path: Path) -> Iterator[Path]:
    from dedupstore import Repository

    root = tmp_path / "repo"
    Repository.create(root)
    yield root
    shutil.rmtree(root, ignore_errors=True)
