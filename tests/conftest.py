"""Shared fixtures: repositories, and the rule that an unexpected WARNING fails a test."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from testlib import EXPECTED_ATTR


@pytest.fixture
def repo_dir(tmp_path: Path) -> Iterator[Path]:
    from dedupstore import Repository

    root = tmp_path / "repo"
    Repository.create(root)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_unexpected_warnings(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Any WARNING or worse logged in-process fails the test unless `assert_logs` expected it.

    (S3QL's and pyfuse3's `pytest_checklogs`: a warning nobody looks at is a bug report lost.)
    """
    yield
    stray = [
        r for when in ("setup", "call") for r in caplog.get_records(when)
        if r.levelno >= logging.WARNING and not getattr(r, EXPECTED_ATTR, False)
    ]
    if stray:
        lines = "\n".join(f"  {r.levelname} {r.name}: {r.getMessage()}" for r in stray)
        pytest.fail(f"unexpected log records (wrap the step in testlib.assert_logs):\n{lines}",
                    pytrace=False)
