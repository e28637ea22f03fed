"""Seeded, reproducible benchmark dataset: two disk images and two file trees.

Owns everything under the data directory (``var/bench/data`` by default):

* ``disk-v1.img``: a raw image made of 64 KiB-aligned regions of zeros (~30 %), text-like
  compressible data (~30 %), random incompressible data (~25 %) and copies of earlier regions
  (~15 %), half of them from a 64 KiB-aligned source offset and half from a non-aligned one.
* ``disk-v2.img``: v1 with a few hundred KiB inserted in the middle (everything after it
  shifts; the tail is truncated so the size stays the same), then ~3 % of its 4 KiB blocks
  rewritten in scattered runs.
* ``tree-v1/``: thousands of files of mixed sizes in nested directories (text-like, random,
  mixed, zero-filled, duplicates of earlier files), all with fixed seeded mtimes.
* ``tree-v2/``: tree-v1 with a few % of the files modified, some removed and some added.
  Unchanged files are *hard links* to the tree-v1 inodes, so size/mtime/ctime/inode all match
  and the tools' files caches see them as unchanged when the tree is staged at the same path.

``stamp.json`` records the generator version, seed and sizes plus reference digests of v2; a
dataset whose stamp matches is reused as is.  Generation is pure standard library (seeded
``random.Random``: no numpy) and writes into the page cache, so it runs at a few hundred MB/s.
This module must not run any backup tool and must not touch anything outside the data directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

GENERATOR_VERSION = 1
KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

# Region kinds of the disk image and the share of the image bytes each should cover.
IMAGE_MIX: dict[str, float] = {"zeros": 0.30, "text": 0.30, "random": 0.25, "dup": 0.15}
REGION_ALIGN_BYTES = 64 * KIB
BLOCK_BYTES = 4 * KIB
V2_REWRITE_FRACTION = 0.03
# Not a multiple of 4 KiB on purpose: after the insertion point nothing lines up with v1 any more,
# neither 64 KiB blocks nor 4 KiB blocks; only content-defined chunking can find the old data.
V2_INSERT_BYTES = 300 * KIB + 1000
# Fixed mtimes (2024-01-01T00:00:00Z and one day later) keep the trees reproducible and old
# enough for every files cache.
TREE_MTIME_V1_S = 1_704_067_200
TREE_MTIME_V2_S = TREE_MTIME_V1_S + 86_400
STAMP_NAME = "stamp.json"
COPY_BUF_BYTES = 8 * MIB


@dataclass(frozen=True, slots=True)
class DatasetSpec:
    """What to generate; two specs that compare equal generate byte-identical datasets."""

    seed: int
    image_bytes: int
    tree_bytes: int
    version: int = GENERATOR_VERSION


@dataclass(frozen=True, slots=True)
class Dataset:
    """A generated dataset on disk plus the reference values used to verify restores."""

    root: Path
    spec: DatasetSpec
    image_v2_sha256: str
    tree_v1_bytes: int
    tree_v2_bytes: int
    tree_v1_files: int
    tree_v2_files: int
    tree_v2_digest: str
    image_mix_bytes: dict[str, int]
    generate_s: float

    @property
    def image_v1(self) -> Path:
        return self.root / "disk-v1.img"

    @property
    def image_v2(self) -> Path:
        return self.root / "disk-v2.img"

    @property
    def tree_v1(self) -> Path:
        return self.root / "tree-v1"

    @property
    def tree_v2(self) -> Path:
        return self.root / "tree-v2"


class TextSource:
    """Seeded text-like bytes: random lines drawn from a pool built from a Zipf-ish vocabulary.

    zstd-3 compresses the output ≈ 2.6x in 64 KiB pieces and ≈ 3.3x in 2 MiB pieces; a line pool
    of 64 Ki lines means two 64 KiB pieces practically never share content, so text regions
    compress but do not deduplicate against each other.
    """

    _LETTERS = "etaoinshrdlcumwfgypbvkjxqz"
    _LETTER_WEIGHTS = (
        12.7,
        9.1,
        8.2,
        7.5,
        7.0,
        6.7,
        6.3,
        6.1,
        6.0,
        4.3,
        4.0,
        2.8,
        2.8,
        2.4,
        2.4,
        2.2,
        2.0,
        2.0,
        1.9,
        1.5,
        1.0,
        0.8,
        0.2,
        0.15,
        0.1,
        0.07,
    )

    def __init__(self, rng: random.Random, vocab_words: int = 6000, pool_lines: int = 65536):
        self._rng = rng
        vocab = [
            "".join(rng.choices(self._LETTERS, self._LETTER_WEIGHTS, k=rng.randint(2, 10)))
            for _ in range(vocab_words)
        ]
        weights = [1.0 / (rank + 1) ** 0.9 for rank in range(vocab_words)]
        words_per_line = 12
        words = rng.choices(vocab, weights, k=pool_lines * words_per_line)
        lines: list[bytes] = []
        for i in range(pool_lines):
            count = rng.randint(4, words_per_line)
            start = i * words_per_line
            ending = "\n" if rng.random() < 0.7 else ". "
            lines.append((" ".join(words[start : start + count]) + ending).encode())
        self._lines = lines
        self._mean_line_bytes = sum(map(len, lines)) / len(lines)

    def take(self, size_bytes: int) -> bytes:
        """Return exactly ``size_bytes`` of fresh text-like bytes."""
        if size_bytes <= 0:
            return b""
        # 5 % more lines than the mean predicts, then top up: almost always one join.
        out = b"".join(
            self._rng.choices(self._lines, k=int(size_bytes / self._mean_line_bytes * 1.05) + 1)
        )
        while len(out) < size_bytes:
            out += b"".join(self._rng.choices(self._lines, k=64))
        return out[:size_bytes]


def _log_uniform(rng: random.Random, low: int, high: int) -> int:
    return int(math.exp(rng.uniform(math.log(low), math.log(high))))


def _write_image_v1(
    path: Path, size_bytes: int, rng: random.Random, text: TextSource
) -> dict[str, int]:
    """Write the v1 image region by region; return the bytes written per region kind."""
    target = {kind: share * size_bytes for kind, share in IMAGE_MIX.items()}
    done = dict.fromkeys(IMAGE_MIX, 0)
    # Non-zero regions written so far, as (offset, length): the pool dup regions copy from.
    sources: list[tuple[int, int]] = []
    max_region = max(REGION_ALIGN_BYTES, min(16 * MIB, size_bytes // 16))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        offset = 0
        while offset < size_bytes:
            # Pick a kind with probability proportional to what it still lacks: random order,
            # final shares close to IMAGE_MIX even for tiny images.
            deficits = {k: max(0.0, target[k] - done[k]) for k in IMAGE_MIX}
            if not sources:
                deficits["dup"] = 0.0
            if sum(deficits.values()) <= 0:
                deficits = {"zeros": 0.0, "text": 1.0, "random": 1.0, "dup": 0.0}
            kind = rng.choices(list(deficits), list(deficits.values()))[0]
            length = _log_uniform(rng, REGION_ALIGN_BYTES, max_region)
            length = max(REGION_ALIGN_BYTES, length // REGION_ALIGN_BYTES * REGION_ALIGN_BYTES)
            length = min(length, size_bytes - offset)
            if kind == "zeros":
                # Real zeros, not a hole: every tool reads the same bytes from the page cache.
                zero = bytes(min(length, COPY_BUF_BYTES))
                pos = 0
                while pos < length:
                    n = min(len(zero), length - pos)
                    os.pwrite(fd, zero[:n], offset + pos)
                    pos += n
            elif kind in ("text", "random"):
                pos = 0
                while pos < length:
                    n = min(COPY_BUF_BYTES, length - pos)
                    chunk = text.take(n) if kind == "text" else rng.randbytes(n)
                    os.pwrite(fd, chunk, offset + pos)
                    pos += n
                sources.append((offset, length))
            else:
                src_off, src_len = rng.choice(sources)
                if rng.random() < 0.5:
                    # Aligned copy: same phase modulo 64 KiB, fixed-size blocks dedup it.
                    start = src_off + rng.randrange(0, src_len, REGION_ALIGN_BYTES)
                else:
                    # Non-aligned copy: any byte offset; only content-defined chunking finds it.
                    start = src_off + rng.randrange(1, src_len)
                    if start % REGION_ALIGN_BYTES == 0:
                        start += 1
                length = min(length, offset - start)
                pos = 0
                while pos < length:
                    n = min(COPY_BUF_BYTES, length - pos)
                    os.pwrite(fd, os.pread(fd, n, start + pos), offset + pos)
                    pos += n
            done[kind] += length
            offset += length
        os.ftruncate(fd, size_bytes)
    finally:
        os.close(fd)
    return done


def _copy_range(src_fd: int, dst_fd: int, src_off: int, dst_off: int, length: int) -> None:
    while length > 0:
        n = os.copy_file_range(src_fd, dst_fd, min(length, 1 << 30), src_off, dst_off)
        if n <= 0:
            raise OSError(f"copy_file_range returned {n}")
        src_off += n
        dst_off += n
        length -= n


def _write_image_v2(v1: Path, v2: Path, rng: random.Random, text: TextSource) -> None:
    """v2 = v1 + an insertion in the middle (tail truncated) + ~3 % of 4 KiB blocks rewritten."""
    size_bytes = v1.stat().st_size
    insert_len = min(V2_INSERT_BYTES, size_bytes // 8)
    insert_at = (size_bytes // 2) // BLOCK_BYTES * BLOCK_BYTES + rng.randrange(BLOCK_BYTES)
    src = os.open(v1, os.O_RDONLY)
    dst = os.open(v2, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _copy_range(src, dst, 0, 0, insert_at)
        os.pwrite(dst, text.take(insert_len), insert_at)
        _copy_range(
            src, dst, insert_at, insert_at + insert_len, size_bytes - insert_at - insert_len
        )
        # Rewrite scattered runs of 1..64 blocks until 3 % of the blocks differ; half the runs
        # get random bytes, half text.  A bitmap counts each block once even when runs overlap.
        blocks = size_bytes // BLOCK_BYTES
        hit = bytearray(blocks)
        goal = int(blocks * V2_REWRITE_FRACTION)
        rewritten = 0
        while rewritten < goal:
            run = min(_log_uniform(rng, 1, 65), blocks)
            first = rng.randrange(0, blocks - run + 1)
            length = run * BLOCK_BYTES
            data = rng.randbytes(length) if rng.random() < 0.5 else text.take(length)
            os.pwrite(dst, data, first * BLOCK_BYTES)
            for b in range(first, first + run):
                if not hit[b]:
                    hit[b] = 1
                    rewritten += 1
        os.ftruncate(dst, size_bytes)
    finally:
        os.close(src)
        os.close(dst)


@dataclass(frozen=True, slots=True)
class _TreeFile:
    relpath: str
    size_bytes: int


def _tree_dirs(rng: random.Random, count: int, words: list[str]) -> list[str]:
    dirs = [""]
    depth = {"": 0}
    while len(dirs) < count:
        parent = rng.choice(dirs)
        if depth[parent] >= 5:
            continue
        name = f"{rng.choice(words)}-{len(dirs)}"
        child = f"{parent}/{name}" if parent else name
        dirs.append(child)
        depth[child] = depth[parent] + 1
    return dirs


def _file_content(kind: str, size_bytes: int, rng: random.Random, text: TextSource) -> bytes:
    if kind == "text":
        return text.take(size_bytes)
    if kind == "random":
        return rng.randbytes(size_bytes)
    if kind == "zeros":
        return bytes(size_bytes)
    half = size_bytes // 2
    return text.take(half) + rng.randbytes(size_bytes - half)


def _write_file(path: Path, data: bytes, mtime_s: int) -> None:
    path.write_bytes(data)
    os.utime(path, (mtime_s, mtime_s))


def _write_tree_v1(
    root: Path, total_bytes: int, rng: random.Random, text: TextSource
) -> list[_TreeFile]:
    """Write tree-v1; return its files in creation order."""
    words = [w.decode() for w in text.take(64 * KIB).replace(b".", b" ").split() if w.isalpha()]
    words = words or ["file"]
    # Sizes: 70 % small (100 B..64 KiB), 28 % medium (64 KiB..2 MiB), 2 % large (2..16 MiB):
    # ≈ 300 KiB on average, so 1 GiB is ≈ 3,500 files.
    large_cap = max(4 * MIB, total_bytes // 32)
    expected_files = max(8, total_bytes // (300 * KIB))
    dirs = _tree_dirs(rng, max(2, expected_files // 25), words)
    files: list[_TreeFile] = []
    contents_by_index: list[tuple[str, int]] = []  # (relpath, size) of non-duplicate files
    written = 0
    root.mkdir(parents=True)
    for d in dirs[1:]:
        (root / d).mkdir(parents=True, exist_ok=True)
    while written < total_bytes:
        r = rng.random()
        if r < 0.70:
            size = _log_uniform(rng, 100, 64 * KIB)
        elif r < 0.98:
            size = _log_uniform(rng, 64 * KIB, 2 * MIB)
        else:
            size = _log_uniform(rng, 2 * MIB, min(16 * MIB, large_cap))
        size = min(size, total_bytes - written) or 1
        k = rng.random()
        kind = (
            "text"
            if k < 0.50
            else "random"
            if k < 0.80
            else "mixed"
            if k < 0.88
            else "zeros"
            if k < 0.90
            else "dup"
        )
        if kind == "dup" and not contents_by_index:
            kind = "text"
        ext = {"text": "txt", "random": "bin", "mixed": "dat", "zeros": "img", "dup": "txt"}[kind]
        directory = rng.choice(dirs)
        name = f"{rng.choice(words)}-{len(files)}.{ext}"
        relpath = f"{directory}/{name}" if directory else name
        if kind == "dup":
            src_rel, size = rng.choice(contents_by_index)
            data = (root / src_rel).read_bytes()
        else:
            data = _file_content(kind, size, rng, text)
            contents_by_index.append((relpath, size))
        _write_file(root / relpath, data, TREE_MTIME_V1_S + len(files))
        files.append(_TreeFile(relpath, size))
        written += size
    return files


def _write_tree_v2(
    v1_root: Path, v2_root: Path, files: list[_TreeFile], rng: random.Random, text: TextSource
) -> None:
    """tree-v2: hard links for unchanged files, new inodes for modified and added ones."""
    v2_root.mkdir(parents=True)
    for dirpath, _dirnames, _filenames in os.walk(v1_root):
        rel = os.path.relpath(dirpath, v1_root)
        (v2_root / rel).mkdir(parents=True, exist_ok=True)
    dirs = sorted({os.path.dirname(f.relpath) for f in files})
    for i, f in enumerate(files):
        r = rng.random()
        src = v1_root / f.relpath
        dst = v2_root / f.relpath
        if r < 0.01:
            continue  # removed
        if r < 0.05:
            # Modified: overwrite a run in the middle and append a little; never touch v1's inode.
            data = bytearray(src.read_bytes())
            if data:
                at = rng.randrange(len(data))
                patch = text.take(min(len(data) - at, rng.randint(16, 8 * KIB)))
                data[at : at + len(patch)] = patch
            data += text.take(rng.randint(10, 4 * KIB))
            _write_file(dst, bytes(data), TREE_MTIME_V2_S + i)
        else:
            os.link(src, dst)
    added = max(1, len(files) // 50)
    for j in range(added):
        size = _log_uniform(rng, 100, 256 * KIB)
        kind = "text" if rng.random() < 0.6 else "random"
        directory = rng.choice(dirs)
        name = f"added-{j}.{'txt' if kind == 'text' else 'bin'}"
        relpath = f"{directory}/{name}" if directory else name
        _write_file(v2_root / relpath, _file_content(kind, size, rng, text), TREE_MTIME_V2_S + j)


def iter_tree_files(root: Path) -> Iterator[tuple[str, Path]]:
    """Yield (relative path, path) of the regular files under ``root`` in sorted order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                yield os.path.relpath(path, root), path


def file_sha256(path: Path) -> str:
    """SHA-256 hex digest of one file."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def tree_digest(root: Path) -> tuple[str, int, int]:
    """Return (digest over relative paths and contents, total bytes, file count) of a tree."""
    outer = hashlib.sha256()
    total = 0
    count = 0
    for rel, path in iter_tree_files(root):
        size = path.stat().st_size
        outer.update(f"{rel}\0{size}\0{file_sha256(path)}\n".encode())
        total += size
        count += 1
    return outer.hexdigest(), total, count


def _load_stamp(root: Path, spec: DatasetSpec) -> Dataset | None:
    stamp = root / STAMP_NAME
    try:
        raw = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return None
    if raw.get("spec") != asdict(spec):
        return None
    ds = Dataset(
        root=root,
        spec=spec,
        image_v2_sha256=raw["image_v2_sha256"],
        tree_v1_bytes=raw["tree_v1_bytes"],
        tree_v2_bytes=raw["tree_v2_bytes"],
        tree_v1_files=raw["tree_v1_files"],
        tree_v2_files=raw["tree_v2_files"],
        tree_v2_digest=raw["tree_v2_digest"],
        image_mix_bytes=raw["image_mix_bytes"],
        generate_s=raw["generate_s"],
    )
    for p in (ds.image_v1, ds.image_v2):
        if not p.is_file() or p.stat().st_size != spec.image_bytes:
            return None
    if not ds.tree_v1.is_dir() or not ds.tree_v2.is_dir():
        return None
    return ds


def ensure_dataset(root: Path, spec: DatasetSpec, log: bool = True) -> tuple[Dataset, bool]:
    """Return the dataset under ``root``, generating it unless a matching stamp is present.

    The second value says whether it was (re)generated.  Anything else under ``root`` is
    deleted before generating; the stamp is written last, so an interrupted run regenerates.
    """
    existing = _load_stamp(root, spec)
    if existing is not None:
        return existing, False
    t0 = time.perf_counter()
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    # Separate streams per artefact: changing the tree size does not change the image bytes.
    image_rng = random.Random(f"image:{spec.seed}")
    tree_rng = random.Random(f"tree:{spec.seed}")
    image_text = TextSource(random.Random(f"image-text:{spec.seed}"))
    tree_text = TextSource(random.Random(f"tree-text:{spec.seed}"))
    partial = Dataset(root, spec, "", 0, 0, 0, 0, "", {}, 0.0)

    def say(msg: str) -> None:
        if log:
            print(f"  [data] {msg} ({time.perf_counter() - t0:.1f} s)", flush=True)

    mix = _write_image_v1(partial.image_v1, spec.image_bytes, image_rng, image_text)
    say(f"disk-v1.img {spec.image_bytes / MIB:.0f} MiB written")
    _write_image_v2(partial.image_v1, partial.image_v2, image_rng, image_text)
    say("disk-v2.img written")
    files = _write_tree_v1(partial.tree_v1, spec.tree_bytes, tree_rng, tree_text)
    say(f"tree-v1 written ({len(files)} files)")
    _write_tree_v2(partial.tree_v1, partial.tree_v2, files, tree_rng, tree_text)
    say("tree-v2 written")
    v2_sha = file_sha256(partial.image_v2)
    v2_digest, v2_bytes, v2_files = tree_digest(partial.tree_v2)
    v1_bytes = sum(f.size_bytes for f in files)
    say("reference digests computed")
    ds = Dataset(
        root=root,
        spec=spec,
        image_v2_sha256=v2_sha,
        tree_v1_bytes=v1_bytes,
        tree_v2_bytes=v2_bytes,
        tree_v1_files=len(files),
        tree_v2_files=v2_files,
        tree_v2_digest=v2_digest,
        image_mix_bytes=mix,
        generate_s=round(time.perf_counter() - t0, 2),
    )
    stamp = {k: v for k, v in asdict(ds).items() if k not in ("root",)}
    (root / STAMP_NAME).write_text(json.dumps(stamp, indent=1, sort_keys=True) + "\n")
    return ds, True


STAGED_IMAGE = "current.img"
STAGED_TREE = "current-tree"
STAGE_MARKER = "staged.json"


def unstage_leftovers(root: Path) -> None:
    """Undo a staging rename left behind by an interrupted run (see ``staged``)."""
    marker = root / STAGE_MARKER
    if not marker.exists():
        return
    for staged_name, original in json.loads(marker.read_text()).items():
        if (root / staged_name).exists() and not (root / original).exists():
            os.rename(root / staged_name, root / original)
    marker.unlink()


@contextlib.contextmanager
def staged(root: Path, original: Path, staged_name: str) -> Iterator[Path]:
    """Rename ``original`` to ``root/staged_name`` for the duration of the block.

    A rename keeps inodes, sizes, mtimes and ctimes, so v1 and v2 appear at one path exactly as
    generated (hard-linked files of tree-v2 stay identical to v1's for every files cache).
    """
    target = root / staged_name
    marker = root / STAGE_MARKER
    marker.write_text(json.dumps({staged_name: original.name}))
    os.rename(original, target)
    try:
        yield target
    finally:
        os.rename(target, original)
        marker.unlink()
