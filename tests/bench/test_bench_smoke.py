"""Smoke test of the benchmark harness: a tiny dataset through borg, checked via ``--json``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
STEPS = {"image-full", "image-incr", "image-restore", "tree-full", "tree-incr", "tree-restore"}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bench_tiny_borg(tmp_path: Path) -> None:
    if shutil.which("borg") is None:
        pytest.skip("borg is not installed (apt-get install borgbackup)")
    out = tmp_path / "bench.json"
    argv = [
        sys.executable,
        "-m",
        "bench",
        "--size-gib",
        str(32 / 1024),
        "--tree-mib",
        "16",
        "--only",
        "borg",
        "--workdir",
        str(tmp_path / "work"),
        "--json",
        str(out),
    ]
    proc = subprocess.run(
        argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=110, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Targets (ours)" in proc.stdout

    doc = json.loads(out.read_text())
    assert doc["dataset"]["image_bytes"] == 32 * 1024 * 1024
    assert doc["dataset"]["tree_v1_files"] > 10
    rows = doc["rows"]
    by_variant: dict[str, set[str]] = {}
    for row in rows:
        by_variant.setdefault(row["variant"], set()).add(row["step"])
        assert row["ok"], row
        for key in ("wall_s", "mb_s", "cpu_s", "peak_rss_mib", "repo_bytes", "input_bytes"):
            assert row[key] > 0, (key, row)
        if row["step"].endswith("restore"):
            assert row["verified"] is True, row
    assert by_variant == {"borg-zstd3": STEPS, "borg-lz4": STEPS}

    # Repositories are deleted after the run (no --keep); a second run reuses the dataset.
    assert doc["dataset"]["generated"] is True
    assert not (tmp_path / "work" / "repos").exists()
    rerun = [*argv[: argv.index("--json")], "--no-encrypted"]
    proc2 = subprocess.run(
        rerun, cwd=REPO_ROOT, capture_output=True, text=True, timeout=110, check=False
    )
    assert proc2.returncode == 0, proc2.stdout[-3000:] + proc2.stderr[-3000:]
    assert "dataset reused" in proc2.stdout
