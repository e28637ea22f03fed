"""Hypothesis state machine: the store against a dict-of-bytearrays model.

Rules write random extents into model disks and back them up (any mode), delete points,
run GC, rebuild the index, and "crash" (drop the writer without flushing). Invariants: every
live point reads back exactly its model bytes, and verify is clean.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
)

from dedupstore import (
    Kind,
    Repository,
    backup_image,
    disk_readers,
    gc,
    rebuild_index,
    verify,
)

BLOCK = 4096
DISK = 24 * BLOCK + 1000  # not a multiple of the block size


class StoreModel(RuleBasedStateMachine):
    points = Bundle("points")

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="dr-model-"))
        self.root = self.tmp / "repo"
        Repository.create(self.root, block_size=BLOCK, compression="zstd,1")
        self.repo = Repository.open(self.root, writable=True)
        self.disk = bytearray(DISK)
        self.img = self.tmp / "disk.img"
        self.model: dict[str, bytes] = {}

    def teardown(self) -> None:
        self.repo.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    @rule(offset=st.integers(0, DISK - 1), data=st.binary(min_size=1, max_size=3 * BLOCK),
          pattern=st.sampled_from(["data", "zero", "repeat"]))
    def write(self, offset: int, data: bytes, pattern: str) -> None:
        if pattern == "zero":
            data = bytes(len(data))
        elif pattern == "repeat":
            data = (data[:1] * len(data))
        end = min(DISK, offset + len(data))
        self.disk[offset:end] = data[: end - offset]

    @rule(target=points, mode=st.sampled_from(["full", "incremental", "differential"]))
    def backup(self, mode: str) -> str:
        self.img.write_bytes(self.disk)
        p = backup_image(self.repo, [self.img], source="m", mode=mode)
        self.model[p.name] = bytes(self.disk)
        return p.name

    @rule(name=consumes(points))
    def delete(self, name: str) -> None:
        self.repo.delete_point(self.repo.resolve(name))
        del self.model[name]

    @rule()
    def collect(self) -> None:
        gc(self.repo, compact_below=0.9, grace_s=0)

    @rule()
    def crash_and_reopen(self) -> None:
        # a half-written chunk that no point references, then the process "dies"
        self.repo.put(Kind.BLOCK, b"orphan" * 100)
        pending = self.repo._pending
        if pending is not None:
            pending.writer._drain()
            import os

            os.close(pending.writer._fd)
            pending.writer._fd = -1
            self.repo._pending = None
        self.repo.close()
        self.repo = Repository.open(self.root, writable=True)

    @rule()
    def rebuild(self) -> None:
        rebuild_index(self.repo)

    @invariant()
    def points_read_back(self) -> None:
        names = {p.name for p in self.repo.list_points()}
        assert names == set(self.model)
        for name, expected in self.model.items():
            (reader,) = disk_readers(self.repo, self.repo.resolve(name))
            assert reader.pread(0, DISK + 10) == expected

    def check_verify(self) -> None:
        assert verify(self.repo).ok


TestStoreModel = StoreModel.TestCase
TestStoreModel.settings = settings(
    max_examples=25, stateful_step_count=15, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_verify_after_random_history() -> None:
    """A fixed history through every rule, ending with a full verify."""
    m = StoreModel()
    try:
        m.write(100, b"abc" * 3000, "data")
        a = m.backup("full")
        m.write(5000, b"x", "zero")
        m.backup("incremental")
        m.crash_and_reopen()
        m.delete(a)
        m.collect()
        m.rebuild()
        m.points_read_back()
        m.check_verify()
    finally:
        m.teardown()
