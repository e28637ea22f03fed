"""Block maps of image points: a Merkle tree of index pages over fixed-size blocks.

Owns the page layout and tree arithmetic. A leaf page holds up to PAGE_FANOUT entries of
(chunk id, xxh3-128 fingerprint); an inner page holds child page ids. A page whose entries
are all zero is not stored: its id is ZERO_ID, so an empty 1 TiB disk costs nothing. An
incremental point rewrites only the pages above changed blocks: unchanged pages hash to the
same id and dedup away, so every point is logically full at the cost of a few pages.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator

from .errors import ChunkCorrupt, ChunkMissing
from .formats import (
    INNER_ENTRY_BYTES,
    LEAF_ENTRY_BYTES,
    PAGE_FANOUT,
    ZERO_FP,
    ZERO_ID,
    ChunkId,
)

ZERO_LEAF = ZERO_ID + ZERO_FP

PutPage = Callable[[bytes], ChunkId]
"""Stores one page (returns its id); the builder never calls it for an all-zero page."""
GetPage = Callable[[ChunkId], bytes]


def depth_for(n_blocks: int) -> int:
    """Number of page levels needed (>= 1)."""
    depth, span = 1, PAGE_FANOUT
    while span < n_blocks:
        depth += 1
        span *= PAGE_FANOUT
    return depth


def zero_runs(
    offset: int, end: int, block_size: int, zero_flags: Iterable[bool]
) -> Iterator[tuple[int, int, bool]]:
    """Merge per-block zero flags into runs of (offset, length, is_zero) over [offset, end).

    `zero_flags` starts at the block holding `offset`; the first and last runs are clipped
    to `offset` and `end` (NBD block status and FUSE/SEEK_HOLE views use these runs).
    """
    if offset >= end:
        return
    pos = (offset // block_size) * block_size
    run_start, run_zero = offset, None
    for z in zero_flags:
        if run_zero is None:
            run_zero = z
        elif z != run_zero:
            yield run_start, pos - run_start, run_zero
            run_start, run_zero = pos, z
        pos += block_size
    if run_zero is not None:
        yield run_start, end - run_start, run_zero


class BlockMapBuilder:
    """Accepts leaf entries in block order and emits pages bottom-up as they fill."""

    def __init__(self, n_blocks: int, put_page: PutPage) -> None:
        self.n_blocks = n_blocks
        self.depth = depth_for(n_blocks)
        self._put = put_page
        self._levels: list[list[bytes]] = [[] for _ in range(self.depth)]
        self._count = 0

    def add(self, cid: bytes, fp: bytes) -> None:
        self._levels[0].append(cid + fp)
        self._count += 1
        if len(self._levels[0]) == PAGE_FANOUT:
            self._emit(0)

    def _emit(self, level: int) -> None:
        entries = self._levels[level]
        self._levels[level] = []
        zero = ZERO_LEAF if level == 0 else ZERO_ID
        pid = ZERO_ID if all(e == zero for e in entries) else self._put(b"".join(entries))
        if level + 1 < self.depth:
            self._levels[level + 1].append(pid)
            if len(self._levels[level + 1]) == PAGE_FANOUT:
                self._emit(level + 1)
        else:
            self._root = pid

    def finish(self) -> ChunkId:
        if self._count != self.n_blocks:
            raise ValueError(f"block map got {self._count} blocks, expected {self.n_blocks}")
        if self.n_blocks == 0:
            return ZERO_ID
        for level in range(self.depth):
            if self._levels[level]:
                self._emit(level)
        return self._root


class BlockMap:
    """Read access to one disk's block map. Thread-safe; caches decoded pages (LRU)."""

    def __init__(
        self, root: ChunkId, depth: int, n_blocks: int, get_page: GetPage, cache_pages: int = 256
    ) -> None:
        self.root = root
        self.depth = depth
        self.n_blocks = n_blocks
        self._get = get_page
        self._cache: OrderedDict[bytes, bytes] = OrderedDict()
        self._cache_pages = cache_pages
        self._lock = threading.Lock()

    def _page(self, pid: ChunkId, entry_bytes: int) -> bytes:
        with self._lock:
            page = self._cache.get(pid)
            if page is not None:
                self._cache.move_to_end(pid)
                return page
        try:
            page = self._get(pid)
        except (ChunkMissing, ChunkCorrupt) as exc:
            setattr(exc, "page_id", pid)  # noqa: B010  # which page failed (healing marks it)
            raise
        if len(page) % entry_bytes or len(page) > PAGE_FANOUT * entry_bytes:
            exc2 = ChunkCorrupt(f"block-map page {pid.hex()[:16]} has a bad length {len(page)}")
            setattr(exc2, "page_id", pid)  # noqa: B010
            raise exc2
        with self._lock:
            self._cache[pid] = page
            while len(self._cache) > self._cache_pages:
                self._cache.popitem(last=False)
        return page

    def leaf_page(self, page_no: int) -> bytes:
        """Leaf page `page_no` (covering blocks page_no*FANOUT ...), all-zero if absent."""
        pid = self.root
        for level in range(self.depth - 1, 0, -1):
            if pid == ZERO_ID:
                break
            span = PAGE_FANOUT ** (level - 1)
            idx = (page_no // span) % PAGE_FANOUT
            page = self._page(pid, INNER_ENTRY_BYTES)
            off = idx * INNER_ENTRY_BYTES
            if off + INNER_ENTRY_BYTES > len(page):
                raise ChunkCorrupt("block map is shorter than the disk")
            pid = ChunkId(page[off : off + INNER_ENTRY_BYTES])
        first = page_no * PAGE_FANOUT
        count = min(PAGE_FANOUT, self.n_blocks - first)
        if pid == ZERO_ID:
            return ZERO_LEAF * count
        page = self._page(pid, LEAF_ENTRY_BYTES)
        if len(page) != count * LEAF_ENTRY_BYTES:
            raise ChunkCorrupt(
                f"leaf page {page_no} has {len(page)} bytes, expected {count * LEAF_ENTRY_BYTES}"
            )
        return page

    def entry(self, block: int) -> tuple[ChunkId, bytes]:
        """(chunk id, fingerprint) of one block."""
        if not 0 <= block < self.n_blocks:
            raise IndexError(block)
        page = self.leaf_page(block // PAGE_FANOUT)
        off = (block % PAGE_FANOUT) * LEAF_ENTRY_BYTES
        return ChunkId(page[off : off + 32]), page[off + 32 : off + LEAF_ENTRY_BYTES]

    def entries(self, first: int = 0, last: int | None = None) -> Iterator[tuple[ChunkId, bytes]]:
        """Entries of blocks [first, last) in order, one page fetch per 1024 blocks."""
        end = self.n_blocks if last is None else min(last, self.n_blocks)
        b = first
        while b < end:
            page_no = b // PAGE_FANOUT
            page = self.leaf_page(page_no)
            stop = min(end, (page_no + 1) * PAGE_FANOUT)
            for i in range(b, stop):
                off = (i % PAGE_FANOUT) * LEAF_ENTRY_BYTES
                yield ChunkId(page[off : off + 32]), page[off + 32 : off + LEAF_ENTRY_BYTES]
            b = stop

    def page_ids(self) -> Iterator[ChunkId]:
        """Every stored page id of this map (for GC marking and verify)."""
        yield from self._walk(self.root, self.depth - 1)

    def _walk(self, pid: ChunkId, level: int) -> Iterator[ChunkId]:
        if pid == ZERO_ID:
            return
        yield pid
        if level == 0:
            return
        page = self._page(pid, INNER_ENTRY_BYTES)
        for off in range(0, len(page), INNER_ENTRY_BYTES):
            yield from self._walk(ChunkId(page[off : off + INNER_ENTRY_BYTES]), level - 1)
