"""Decoders on garbage: only FormatError/ChunkCorrupt may escape, never a crash or a hang."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from dedupstore import ChunkCorrupt, FormatError, Kind
from dedupstore._codec import ChunkCodec, Keys, decompress
from dedupstore._pack import PackWriter, scan_pack
from dedupstore.formats import PACK_HEADER, Codec


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=4096))
def test_scan_pack_on_garbage(blob: bytes) -> None:
    with tempfile.NamedTemporaryFile(suffix=".pack") as fh:
        fh.write(blob)
        fh.flush()
        try:
            scan = scan_pack(Path(fh.name))
        except FormatError:
            return
        assert all(e.stored_len <= len(blob) for e in scan.entries)


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=PACK_HEADER.size, max_value=20_000), st.binary(min_size=1,
                                                                           max_size=16))
def test_scan_pack_after_damage(cut: int, junk: bytes) -> None:
    """A real pack, damaged anywhere: scanning returns the intact prefix or FormatError."""
    with tempfile.TemporaryDirectory() as d:
        w = PackWriter(Path(d), "capacity", 1)
        payloads = [os.urandom(1000 + i) for i in range(12)]
        for i, p in enumerate(payloads):
            w.add(bytes([i]) * 32, Kind.FILE, Codec.NONE, p, len(p))
        w.seal()
        data = bytearray(w.path.read_bytes())
        pos = min(cut, len(data) - 1)
        data[pos : pos + len(junk)] = junk
        w.path.write_bytes(bytes(data))
        try:
            scan = scan_pack(w.path)
        except FormatError:
            return
        for e in scan.entries:
            assert bytes(data[e.offset : e.offset + e.stored_len]) == payloads[e.chunk_id[0]]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(list(Codec)), st.binary(max_size=2048), st.integers(0, 100_000))
def test_decompress_garbage(codec: Codec, blob: bytes, raw_len: int) -> None:
    try:
        out = decompress(codec, blob, raw_len)
    except ChunkCorrupt:
        return
    assert len(out) == raw_len


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=2048))
def test_open_payload_garbage_encrypted(blob: bytes) -> None:
    c = ChunkCodec("sha256", Codec.ZSTD, 3, Keys(os.urandom(32), os.urandom(32)))
    try:
        c.open_payload(Kind.BLOCK, Codec.ZSTD, b"\0" * 32, blob, 100)
    except ChunkCorrupt:
        return
    raise AssertionError("garbage authenticated")
