"""On-disk formats of the store: pack files, chunk kinds, reserved ids, index records.

Owns every byte layout written to disk (packs, index values). Never edit a magic: add a v2.

Pack file (self-describing, so the LMDB index can be rebuilt from packs alone)::

    PackHeader                          40 B   magic, pack id, tier name, creation time
    { EntryHeader  payload } *          56 B + stored_len each
    { TableEntry } * count              56 B each: a copy of every entry's header fields
    PackFooter                          32 B   magic, count, table offset, crc32 of the table

A pack whose writer died has no footer: a sequential scan recovers every entry whose header
crc and payload crc check, and stops at the first torn one.
"""

from __future__ import annotations

import hashlib
import struct
from enum import IntEnum
from typing import NewType

ChunkId = NewType("ChunkId", bytes)
"""32-byte content address (SHA-256 or BLAKE3, keyed in encrypted repositories)."""

ID_BYTES = 32
ZERO_ID = ChunkId(b"\x00" * ID_BYTES)
"""Reserved id of an all-zero block (and of an all-zero subtree of a block map): costs nothing."""


def _magic(name: str) -> bytes:
    return hashlib.sha256(f"dr-appliance {name}".encode()).digest()[:8]


PACK_MAGIC = _magic("pack v1")
FOOTER_MAGIC = _magic("pack footer v1")
ENTRY_TAG = b"DRCE"
PACK_SUFFIX = ".pack"
FORMAT_VERSION = 1


class Kind(IntEnum):
    """What a chunk holds. Stored in the pack entry header and the index."""

    BLOCK = 1  # a fixed-size block of a disk image
    FILE = 2  # a content-defined chunk of a regular file
    PAGE = 3  # a block-map index page (Merkle tree node)
    TREE = 4  # a slice of a file-tree point's metadata stream
    POINT = 5  # a point manifest
    TOMBSTONE = 6  # "point X was deleted": lets an index rebuild skip it
    LOCKREC = 7  # "point X is locked until T": lets an index rebuild restore locks


class Codec(IntEnum):
    NONE = 0
    ZSTD = 1
    LZO = 2
    GZIP = 3


# magic, pack id, tier (NUL padded), created (ns)
PACK_HEADER = struct.Struct("<8sQ16sQ")
assert PACK_HEADER.size == 40

# tag, kind, codec, flags, chunk id, stored_len, raw_len, payload crc32, header crc32
ENTRY_HEADER = struct.Struct("<4sBBH32sIIII")
assert ENTRY_HEADER.size == 56
ENTRY_HEADER_CRC_SPAN = ENTRY_HEADER.size - 4

# chunk id, payload offset, stored_len, raw_len, kind, codec, pad
TABLE_ENTRY = struct.Struct("<32sQIIBB6x")
assert TABLE_ENTRY.size == 56

# magic, count, table offset, table crc32, pad
PACK_FOOTER = struct.Struct("<8sQQI4x")
assert PACK_FOOTER.size == 32

# Index value of a chunk: pack id, payload offset, stored_len, raw_len, kind, codec
CHUNK_LOC = struct.Struct("<QQIIBB")
assert CHUNK_LOC.size == 26

MAX_CHUNK_BYTES = 16 * 1024 * 1024
"""No chunk (block, CDC chunk, page, manifest slice) is larger than this; a bigger length
in a header is corruption, never an allocation request."""

PAGE_FANOUT = 1024
"""Entries per block-map page. Leaf entries are 48 B (chunk id + xxh3-128 fingerprint), inner
entries 32 B (child page id): a leaf page maps 64 MiB of disk at 64 KiB blocks."""
LEAF_ENTRY_BYTES = 48
INNER_ENTRY_BYTES = 32
ZERO_FP = b"\x00" * 16
