"""A file-level restore out of a hostile guest filesystem stays inside DEST (issue 8 item 10).

The ext4 image is built with debugfs (entries in a known on-disk order), then directory
entries are rewritten in place: debugfs cannot create a name holding "/" (its `ln`/`write`
parse the name as a path), so files are written under marker names and the dirent's name
and name_len bytes are patched to "../escape", "evil/x", "nul\\0name" and a duplicate "twin";
one entry's inode is set to the root's to make a directory loop. dissect reads such an image
like a damaged one. (A FAT image is not built: its long names are UTF-16 fragments across
several entries, so the same patching is not a few bytes; the restore path is the same.)
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from testlib import run_cli

OUTSIDE_MARKER = b"not yours\n"

# marker name in the image -> the name the dirent gets
RENAMES = {
    b"MRKevilslashx": b"evil/x",
    b"MRKdotdotescape": b"../escape",
    b"MRKnulname": b"nul\0name",
    b"MRKdirtwin": b"twin",
}
LOOP_MARKER = b"MRKuptoroot"  # a directory entry whose inode becomes 2 (the root)


def _patch_dirents(img: Path) -> None:
    data = bytearray(img.read_bytes())
    for marker in [*RENAMES, LOOP_MARKER]:
        hits, i = [], data.find(marker)
        while i >= 0:
            # ext4 dirent: inode u32, rec_len u16, name_len u8, file_type u8, name
            if data[i - 2] == len(marker):
                hits.append(i)
            i = data.find(marker, i + 1)
        assert len(hits) == 1, (marker, hits)
        i = hits[0]
        if marker == LOOP_MARKER:
            data[i - 8 : i - 4] = (2).to_bytes(4, "little")
        else:
            new = RENAMES[marker]
            data[i - 2] = len(new)
            data[i : i + len(new)] = new
    img.write_bytes(bytes(data))


def _hostile_ext4(tmp: Path, outside: Path) -> Path:
    local = tmp / "local"
    local.mkdir()
    for name, body in [
        ("x", b"x\n"),
        ("esc", b"escape\n"),
        ("nul", b"nul\n"),
        ("tx", b"twin x\n"),
        ("readme", b"read me\n"),
        ("keep", b"keep\n"),
    ]:
        (local / name).write_bytes(body)
    cmds = f"""symlink evil {outside}
write {local}/x MRKevilslashx
write {local}/esc MRKdotdotescape
write {local}/nul MRKnulname
symlink twin {outside}
mkdir MRKdirtwin
cd MRKdirtwin
write {local}/tx x
cd /
mkdir docs
cd docs
write {local}/readme readme.txt
cd /
mkdir loopdir
mkdir loopdir/MRKuptoroot
write {local}/keep keep.txt
"""
    (tmp / "debugfs.cmds").write_text(cmds)
    img = tmp / "disk.img"
    with img.open("wb") as fh:
        fh.truncate(16 << 20)
    for cmd in (
        ["mkfs.ext4", "-q", "-F", "-b", "4096", "-O", "^metadata_csum", str(img)],
        ["debugfs", "-w", "-f", str(tmp / "debugfs.cmds"), str(img)],
    ):
        subprocess.run(cmd, check=True, capture_output=True)
    _patch_dirents(img)
    return img


def test_restore_from_hostile_ext4_stays_in_dest(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_bytes(OUTSIDE_MARKER)
    img = _hostile_ext4(tmp_path, outside)
    r = str(tmp_path / "r")
    run_cli("--repo", r, "init")
    run_cli("--repo", r, "backup", "image", str(img), "--source", "vm")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "docs").symlink_to(outside)  # a link already in DEST where the image has a dir

    res = run_cli("--repo", r, "restore", "vm@latest/disk0/fs", str(dest), warnings_ok=True)

    assert "Traceback" not in res.stderr
    # nothing outside DEST was written
    assert sorted(os.listdir(outside)) == ["keep.txt"]
    assert (outside / "keep.txt").read_bytes() == OUTSIDE_MARKER
    assert sorted(os.listdir(tmp_path)) == [
        "debugfs.cmds",
        "dest",
        "disk.img",
        "local",
        "outside",
        "r",
    ]
    # the good entries are there, the link in DEST became a real directory
    assert (dest / "keep.txt").read_bytes() == b"keep\n"
    assert not (dest / "docs").is_symlink()
    assert (dest / "docs" / "readme.txt").read_bytes() == b"read me\n"
    assert os.readlink(dest / "evil") == str(outside)  # restored as a link, never followed
    # of the duplicate "twin" (a link, then a directory) the last listed wins, as in the mount
    assert not (dest / "twin").is_symlink() and (dest / "twin" / "x").read_bytes() == b"twin x\n"
    assert sorted(os.listdir(dest / "loopdir")) == []
    # each entry left out is named once, and the summary says so
    warnings = [line for line in res.stderr.splitlines() if line.startswith("WARNING")]
    for what in ["'../escape'", "'evil/x'", "'nul\\x00name'", "'twin'", "loopdir/MRKuptoroot"]:
        assert sum(what in line for line in warnings) == 1, (what, res.stderr)
    assert len(warnings) == 5, res.stderr
    assert "5 left out" in res.stdout, res.stdout


def test_single_file_restore_does_not_follow_a_link_at_dest(tmp_path: Path) -> None:
    """DEST itself named by the user is used as given; a link at DEST/NAME is replaced."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_bytes(OUTSIDE_MARKER)
    img = _hostile_ext4(tmp_path, outside)
    r = str(tmp_path / "r")
    run_cli("--repo", r, "init")
    run_cli("--repo", r, "backup", "image", str(img), "--source", "vm")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").symlink_to(outside / "keep.txt")
    run_cli("--repo", r, "restore", "vm@latest/disk0/fs/keep.txt", str(dest))
    assert (outside / "keep.txt").read_bytes() == OUTSIDE_MARKER
    assert not (dest / "keep.txt").is_symlink()
    assert (dest / "keep.txt").read_bytes() == b"keep\n"
