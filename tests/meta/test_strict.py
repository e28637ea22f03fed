"""STRICT mode (DR_STRICT=1, on in .ci/run): an environment-dependent skip fails the run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from testlib import ROOT

SKIPPING = '''
import pytest

def test_runs():
    assert 1 + 1 == 2

def test_needs_a_tool():
    pytest.skip("frobnicator is not installed")

@pytest.mark.skipif(True, reason="no such device")
def test_needs_a_device():
    pass
'''

MODULE_SKIP = '''
import pytest
pytest.skip("tool missing for the whole module", allow_module_level=True)

def test_never():
    pass
'''


def _run(tmp_path: Path, body: str, strict: bool) -> subprocess.CompletedProcess[str]:
    case = tmp_path / "case"
    case.mkdir(exist_ok=True)
    (case / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (case / "test_case.py").write_text(body)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "DR_STRICT": "1" if strict else "0"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         "--rootdir", str(case), "-c", os.devnull, str(case)],
        capture_output=True, text=True, env=env, timeout=120,
    )


def test_strict_mode_turns_skips_into_failures(tmp_path: Path) -> None:
    res = _run(tmp_path, SKIPPING, strict=True)
    assert res.returncode == 1, res.stdout + res.stderr
    # a skip in the call phase reports as failed, one in setup (skipif) as an error
    assert "1 passed" in res.stdout and "1 failed" in res.stdout and "1 error" in res.stdout
    assert "test_needs_a_tool" in res.stdout and "test_needs_a_device" in res.stdout
    assert "frobnicator is not installed" in res.stdout
    assert "environment-dependent skips: 2 [STRICT" in res.stdout


def test_lenient_mode_counts_skips(tmp_path: Path) -> None:
    res = _run(tmp_path, SKIPPING, strict=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 passed, 2 skipped" in res.stdout
    assert "environment-dependent skips: 2 [lenient" in res.stdout


def test_strict_mode_fails_a_module_skipped_at_collection(tmp_path: Path) -> None:
    res = _run(tmp_path, MODULE_SKIP, strict=True)
    assert res.returncode != 0, res.stdout + res.stderr
    assert "tool missing for the whole module" in res.stdout
