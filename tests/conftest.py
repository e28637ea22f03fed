"""Shared fixtures: repositories, and the rule that an unexpected WARNING fails a test."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


# -- STRICT mode: in CI a missing tool is a failure, not a silent skip ----------------------
STRICT = os.environ.get("DR_STRICT", "") not in ("", "0")
_skips: list[str] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Count every skip; with DR_STRICT=1 (set by .ci/run) turn it into a failure.

    Every skip in this suite is environment-dependent (a tool, a device, a namespace that this
    machine lacks): on the CI machine, which installs everything itself, each one means a test
    that did not run, so it must be seen.
    """
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skips.append(f"{item.nodeid}: {reason}")
        if STRICT:
            report.outcome = "failed"
            report.longrepr = f"STRICT mode (DR_STRICT=1): a skip fails in CI: {reason}"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    mode = "STRICT (skips fail)" if STRICT else "lenient (DR_STRICT unset: skips pass)"
    terminalreporter.write_line(f"environment-dependent skips: {len(_skips)} [{mode}]")
    for line in _skips:
        terminalreporter.write_line(f"  skipped: {line}")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    """A module skipped at collection time (allow_module_level) counts and fails the same way."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skips.append(f"{collector.nodeid}: {reason}")
        if STRICT:
            report.outcome = "failed"
            report.longrepr = f"STRICT mode (DR_STRICT=1): module skipped: {reason}"
