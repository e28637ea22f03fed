"""dedupstore: the deduplicating block store every other package stands on.

Design (see README "How the store is laid out on disk"):

* Chunks are content-addressed (SHA-256 by default, BLAKE3 optional; HMAC/keyed BLAKE3 in
  encrypted repositories), compressed per chunk when that helps (zstd, lzo, gzip) and sealed
  with AES-256-GCM when the repository is encrypted.
* Chunk payloads live in append-only pack files (formats.py) on a tier; the LMDB index maps
  ids to pack locations and holds the point catalogue. Packs are self-describing, so
  `rebuild_index` recreates the index (points included) from packs alone.
* Image points: fixed-size blocks under a Merkle tree of index pages (_blockmap.py), so an
  incremental point stores changed blocks and the pages above them, and is logically full.
* File-tree points: content-defined chunks (FastCDC) plus a metadata stream (_filetree.py).
* Crash safety: packs are sealed and fsynced before the index points into them; a point is
  committed last. A killed writer's unsealed pack is salvaged by the next writer.
* Locking: one writer process (flock on `lock`); any number of concurrent readers (LMDB MVCC).
  Each read-only open holds a lease (`readers/<pid>-...lock`, flock-held; _readers.py).
* GC: mark from every point, every point deleted less than the grace period (24 h) ago and
  every point deleted after the oldest live reader lease started; sweep the index, then
  compact packs whose live share is low. An unindexed pack is deleted only if the writer
  recorded creating it (meta `writing`) or it is provably empty; others go to `quarantine/`.
* Healing: `verify` re-hashes every chunk and marks damaged ones bad in the index; a bad
  chunk counts as absent, so the next backup producing it (full, or incremental: the
  fingerprint shortcut checks the index too) stores a fresh copy that replaces it.
  `repair_chunks` repoints marks to intact copies found in packs and drops damaged copies;
  `rebuild_index` salvages every crc-intact entry of a damaged pack.
* Every msgpack value in LMDB carries an xxh3 and point manifests are re-hashed against
  their chunk id when read: a damaged record is a StoreError naming it, never wrong data.

This module is the only import surface of the package.
"""

from ._codec import Keys
from ._config import (
    KEY_FD_ENV,
    KeyHandoff,
    KeyInfo,
    RepoConfig,
    add_key,
    change_passphrase,
    export_keys,
    import_keys,
    inherited_keys,
    list_keys,
    paper_text,
    parse_paper,
    parse_size,
    remove_key,
    unlock_keys,
)
from ._dest import Dest, DestMeta, UnsafePath, set_fd_meta, valid_name
from ._dest import placement as restore_placement
from ._filetree import (
    FileTree,
    TreeEntry,
    TreeStats,
    backup_tree,
    display_path,
    open_tree,
    restore_tree,
)
from ._imagepoint import (
    DiskReader,
    ImageStats,
    backup_image,
    disk_readers,
    restore_image,
    synthesize,
)
from ._maint import (
    DEFAULT_GRACE_S,
    ChunkRepairReport,
    GcReport,
    RebuildReport,
    VerifyReport,
    delete_point,
    gc,
    parse_until,
    point_refs,
    protected_points,
    prune_plan,
    rebuild_index,
    refuse_under_readers,
    repair_chunks,
    stats,
    verify,
)
from ._overlay import (
    Overlay,
    OverlayDisk,
    OverlayDiskInfo,
    OverlayInfo,
    commit_overlay,
    create_overlay,
    drop_overlay,
    list_overlays,
    open_overlay,
    overlay_catalogue_lock,
    overlay_info,
    overlays_on,
    sync_overlays,
)
from ._readers import ReaderInfo, live_readers
from ._repo import Point, PutResult, Repository, split_ref
from .errors import (
    AlreadyExists,
    ChunkCorrupt,
    ChunkMissing,
    FormatError,
    InvalidArgument,
    Locked,
    NotFound,
    OutOfSpace,
    ReadOnly,
    StoreError,
    WrongPassphrase,
)
from .formats import ZERO_ID, ChunkId, Kind

__all__ = [
    "DEFAULT_GRACE_S",
    "KEY_FD_ENV",
    "ZERO_ID",
    "AlreadyExists",
    "ChunkCorrupt",
    "ChunkId",
    "ChunkMissing",
    "ChunkRepairReport",
    "Dest",
    "DestMeta",
    "DiskReader",
    "FileTree",
    "FormatError",
    "GcReport",
    "ImageStats",
    "InvalidArgument",
    "KeyHandoff",
    "KeyInfo",
    "Keys",
    "Kind",
    "Locked",
    "NotFound",
    "OutOfSpace",
    "Overlay",
    "OverlayDisk",
    "OverlayDiskInfo",
    "OverlayInfo",
    "Point",
    "PutResult",
    "ReadOnly",
    "ReaderInfo",
    "RebuildReport",
    "RepoConfig",
    "Repository",
    "StoreError",
    "TreeEntry",
    "TreeStats",
    "UnsafePath",
    "VerifyReport",
    "WrongPassphrase",
    "add_key",
    "backup_image",
    "backup_tree",
    "change_passphrase",
    "commit_overlay",
    "create_overlay",
    "delete_point",
    "disk_readers",
    "display_path",
    "drop_overlay",
    "export_keys",
    "gc",
    "import_keys",
    "inherited_keys",
    "list_keys",
    "list_overlays",
    "live_readers",
    "open_overlay",
    "open_tree",
    "overlay_catalogue_lock",
    "overlay_info",
    "overlays_on",
    "paper_text",
    "parse_paper",
    "parse_size",
    "parse_until",
    "point_refs",
    "protected_points",
    "prune_plan",
    "rebuild_index",
    "refuse_under_readers",
    "remove_key",
    "repair_chunks",
    "restore_image",
    "restore_placement",
    "restore_tree",
    "set_fd_meta",
    "split_ref",
    "stats",
    "sync_overlays",
    "synthesize",
    "unlock_keys",
    "valid_name",
    "verify",
]
