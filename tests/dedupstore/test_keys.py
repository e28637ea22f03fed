"""Key slots (issue 8 item 18): passwd re-wraps without rewriting data, several keys, export
and import (also on paper), the old passphrase refused afterwards, old configs still open."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from testlib import make_image, sha256_file

from dedupstore import (
    InvalidArgument,
    KeyHandoff,
    Repository,
    WrongPassphrase,
    add_key,
    backup_image,
    change_passphrase,
    export_keys,
    import_keys,
    inherited_keys,
    list_keys,
    paper_text,
    parse_paper,
    remove_key,
    restore_image,
)


@pytest.fixture
def enc_repo(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "r"
    Repository.create(root, encryption="aes-256-gcm", passphrase="old")
    img = make_image(tmp_path / "d.img", 2)
    with Repository.open(root, passphrase="old", writable=True) as repo:
        backup_image(repo, [img], source="vm1", mode="full")
    return root, img


def _packs(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in (root / "packs").rglob("*.pack")}


def _restores(root: Path, pw: str, img: Path, out: Path) -> None:
    with Repository.open(root, passphrase=pw) as repo:
        restore_image(repo, repo.resolve("vm1@latest"), out)
    assert sha256_file(out) == sha256_file(img)


def test_passwd_rewraps_and_refuses_the_old_passphrase(
    enc_repo: tuple[Path, Path], tmp_path: Path
) -> None:
    root, img = enc_repo
    before = _packs(root)
    with pytest.raises(WrongPassphrase):
        change_passphrase(root, "wrong", "new")
    kid = change_passphrase(root, "old", "new")
    assert [k.id for k in list_keys(root)] == [kid]
    with pytest.raises(WrongPassphrase, match="wrong passphrase"):
        Repository.open(root, passphrase="old")
    _restores(root, "new", img, tmp_path / "out.img")
    assert _packs(root) == before  # no data rewritten
    assert oct((root / "config.json").stat().st_mode & 0o777) == "0o600"
    assert not (root / "config.json.tmp").exists()


def test_several_keys_and_remove(enc_repo: tuple[Path, Path], tmp_path: Path) -> None:
    root, img = enc_repo
    first = list_keys(root)[0].id
    second = add_key(root, "old", "second", "backup admin")
    third = add_key(root, "second", "third", "")
    keys = {k.id: k.name for k in list_keys(root)}
    assert keys == {first: "default", second: "backup admin", third: third}
    for pw in ("old", "second", "third"):
        _restores(root, pw, img, tmp_path / f"out-{pw}.img")
    with pytest.raises(InvalidArgument, match="another key"):
        remove_key(root, "second", second)  # not with its own passphrase
    remove_key(root, "third", second)
    with pytest.raises(WrongPassphrase):
        Repository.open(root, passphrase="second")
    remove_key(root, "third", first)
    with pytest.raises(WrongPassphrase):
        Repository.open(root, passphrase="old")
    with pytest.raises(InvalidArgument, match="last key"):
        remove_key(root, "third", third)
    _restores(root, "third", img, tmp_path / "out.img")


def test_export_import_json_and_paper(enc_repo: tuple[Path, Path], tmp_path: Path) -> None:
    root, img = enc_repo
    doc = export_keys(root)
    assert doc["repo_id"] == json.loads((root / "config.json").read_text())["repo_id"]
    paper = paper_text(doc)
    assert parse_paper(paper) == doc
    change_passphrase(root, "old", "new")
    with pytest.raises(WrongPassphrase):
        import_keys(root, doc, "new")  # the export holds the old slot: its passphrase opens it
    import_keys(root, parse_paper(paper), "old")  # puts the slot of the same id back
    _restores(root, "old", img, tmp_path / "out.img")
    with pytest.raises(WrongPassphrase):
        Repository.open(root, passphrase="new")
    # a typo on paper is found and named
    lines = paper.splitlines()
    n = next(i for i, line in enumerate(lines) if line.strip().startswith("2:"))
    head, _, rest = lines[n].partition(":")
    data, _, check = rest.rpartition("-")
    i = next(i for i, c in enumerate(data) if c in "0123456789abcdef")
    data = data[:i] + ("1" if data[i] != "1" else "2") + data[i + 1 :]
    lines[n] = f"{head}:{data}-{check}"
    with pytest.raises(InvalidArgument, match="line 2"):
        parse_paper("\n".join(lines))
    # another repository's export is refused
    other = tmp_path / "other"
    Repository.create(other, encryption="aes-256-gcm", passphrase="old")
    with pytest.raises(InvalidArgument, match="repository"):
        import_keys(other, doc, "old")


def test_config_from_before_key_slots_still_opens(tmp_path: Path) -> None:
    """A v1 config (one key without id/name, no key check) opens, and can be re-keyed."""
    root = tmp_path / "r"
    Repository.create(root, encryption="aes-256-gcm", passphrase="pw")
    cfg = json.loads((root / "config.json").read_text())
    del cfg["key_check"]
    for k in ("id", "name", "created"):
        del cfg["key"][k]
    (root / "config.json").write_text(json.dumps(cfg))
    Repository.open(root, passphrase="pw").close()
    [info] = list_keys(root)
    assert len(info.id) == 8
    change_passphrase(root, "pw", "pw2")
    Repository.open(root, passphrase="pw2").close()
    with pytest.raises(WrongPassphrase):
        Repository.open(root, passphrase="pw")


def test_key_handoff_over_a_pipe(enc_repo: tuple[Path, Path]) -> None:
    root, _img = enc_repo
    with Repository.open(root, passphrase="old") as repo:
        keys = repo.keys
    assert keys is not None and "enc_key" not in repr(keys)
    with KeyHandoff(keys) as h:
        (fd,) = h.fds
        assert fd >= 10  # clear of the fds a child claims (nbdkit's socket is 3)
        os.environ.update(h.env)
        got = inherited_keys()
    assert got == keys
    assert inherited_keys() is None  # read once; the variable is gone
    with Repository.open(root, keys=got) as repo:
        assert repo.resolve("vm1@latest")
    other = root.parent / "other"
    Repository.create(other, encryption="aes-256-gcm", passphrase="old")
    with pytest.raises(WrongPassphrase, match="another repository"):
        Repository.open(other, keys=got)


@given(st.text())
def test_parse_paper_fuzz(text: str) -> None:
    """Any typed-in text is a key export or one clear InvalidArgument, nothing else."""
    with contextlib.suppress(InvalidArgument):
        parse_paper(text)


@given(st.lists(st.binary(max_size=40), max_size=5))
def test_parse_paper_fuzz_lines(parts: list[bytes]) -> None:
    """Well-formed lines with valid checks over arbitrary bytes: still only InvalidArgument."""
    from dedupstore._config import _line_check

    lines = [f"{n}: {p.hex()} - {_line_check(n, p.hex())}" for n, p in enumerate(parts, 1)]
    with contextlib.suppress(InvalidArgument):
        parse_paper("\n".join(lines))
