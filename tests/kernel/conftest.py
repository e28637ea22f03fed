"""Fixtures for kernel/ tests: the rescue system built once per session, and tests/ on sys.path.

``tests/vmutil.py`` is a plain module next to the test packages; this conftest makes it
importable as ``vmutil`` however pytest is started.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

log = logging.getLogger(__name__)

TESTS_DIR = Path(__file__).resolve().parent.parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))


@pytest.fixture(scope="session")
def rescue_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(kernel, initrd) of the rescue system, copied into a session temp dir."""
    from kernel.rescue import build_rescue

    return build_rescue(tmp_path_factory.mktemp("rescue"))
