"""Repository configuration file (config.json), passphrase-wrapped key slots, key hand-off.

Owns the repository's immutable settings (block size, hash, codec, `immutable`) and the key
envelope: the 64-byte master secret is encrypted with AES-256-GCM under a key derived from a
passphrase with scrypt. A repository has one or more such wrapped copies ("key slots", restic's
`key add`): `key` holds the first one (where format v1 always kept it, so a slot written by an
older version still opens), `extra_keys` the others. Changing a passphrase re-wraps the secret;
no data is rewritten. A wrong passphrase fails every slot's GCM tag: a clear WrongPassphrase.

It also owns how unwrapped keys reach a child process (`KeyHandoff` / `inherited_keys`): over an
inherited pipe, never in the environment, where /proc/<pid>/environ would show a passphrase for
the life of the process.

config.json is replaced atomically (temporary file, fsync, rename, fsync of the directory) and
is readable by its owner only (0600).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from ._codec import Keys
from ._lockfile import take_flock
from .errors import FormatError, InvalidArgument, NotFound, WrongPassphrase
from .formats import FORMAT_VERSION

CONFIG_NAME = "config.json"
KEY_AAD = b"dr-appliance key v1"
SCRYPT_N = 2**15
MIN_BLOCK = 4096
MAX_BLOCK = 4 * 1024 * 1024
SECRET_BYTES = 64  # enc_key (32) + id_key (32)
FILE_MODE = 0o600
DIR_MODE = 0o700

EXPORT_FORMAT = "dr-appliance key export v1"
PAPER_HEADER = "DR Appliance repository key (paper copy)"
PAPER_BYTES_PER_LINE = 16

KEY_FD_ENV = "APPLIANCE_KEY_FD"
"""Names the inherited pipe a child reads its repository keys from (see KeyHandoff)."""
_HANDOFF_MAGIC = b"DRKEY1"
_HANDOFF_MIN_FD = 10


@dataclass(frozen=True, slots=True)
class RepoConfig:
    repo_id: str
    version: int
    block_size: int
    hash: str
    compression: str  # "zstd,3" etc.
    encryption: str  # "none" or "aes-256-gcm"
    pack_target_bytes: int
    key: dict[str, str] | None  # first key slot: kdf parameters, salt, wrapped secret (base64)
    extra_keys: tuple[dict[str, str], ...] = ()  # more key slots (`appliance key add`)
    key_check: str | None = None  # HMAC of the id key: tells a foreign key from ours
    immutable: bool = False  # locks only extend; locked points are never deleted (init only)


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What `key list` shows of one key slot (no secret in it)."""

    id: str
    name: str
    created: str

    def as_dict(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name, "created": self.created}


def parse_size(text: str) -> int:
    """'64K', '1M', '65536' -> bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    if t and t[-1] in "KMG":
        mult = 1024 ** ("KMG".index(t[-1]) + 1)
        t = t[:-1]
    try:
        value = int(t) * mult
    except ValueError:
        raise InvalidArgument(f"bad size {text!r}") from None
    return value


def _kdf(passphrase: str, salt: bytes, n: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=8, p=1).derive(passphrase.encode())


def _now_text() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _wrap(secret: bytes, passphrase: str, *, id_: str, name: str, created: str) -> dict[str, str]:
    """One key slot: `secret` sealed under scrypt(passphrase, fresh salt)."""
    if not passphrase:
        raise InvalidArgument("a key needs a non-empty passphrase")
    salt = os.urandom(16)
    nonce = os.urandom(12)
    kek = _kdf(passphrase, salt, SCRYPT_N)
    wrapped = AESGCM(kek).encrypt(nonce, secret, KEY_AAD)
    return {
        "kdf": "scrypt",
        "n": str(SCRYPT_N),
        "salt": base64.b64encode(salt).decode(),
        "nonce": base64.b64encode(nonce).decode(),
        "wrapped": base64.b64encode(wrapped).decode(),
        "id": id_,
        "name": name,
        "created": created,
    }


def _try_slot(slot: dict[str, str], passphrase: str) -> bytes | None:
    """The secret if `passphrase` opens this slot, None if it does not."""
    try:
        kek = _kdf(passphrase, base64.b64decode(slot["salt"]), int(slot["n"]))
        secret = AESGCM(kek).decrypt(
            base64.b64decode(slot["nonce"]), base64.b64decode(slot["wrapped"]), KEY_AAD
        )
    except InvalidTag:
        return None
    except (KeyError, ValueError, TypeError) as exc:
        raise FormatError(f"damaged key in repository config: {exc}") from exc
    if len(secret) != SECRET_BYTES:
        raise FormatError("damaged key in repository config: wrong secret length")
    return secret


def slot_id(slot: dict[str, str]) -> str:
    """A slot's id; slots written before ids existed get one derived from their salt."""
    return slot.get("id") or hashlib.sha256(slot.get("salt", "").encode()).hexdigest()[:8]


def key_slots(cfg: RepoConfig) -> list[dict[str, str]]:
    return ([] if cfg.key is None else [cfg.key]) + list(cfg.extra_keys)


def _with_slots(cfg: RepoConfig, slots: list[dict[str, str]]) -> RepoConfig:
    if not slots:
        raise InvalidArgument("an encrypted repository must keep at least one key")
    return replace(cfg, key=slots[0], extra_keys=tuple(slots[1:]))


def _key_check(repo_id: str, keys: Keys) -> str:
    return hmac.digest(keys.id_key, b"dr-appliance key check " + repo_id.encode(), "sha256")[
        :16
    ].hex()


def _keys_of(cfg: RepoConfig, secret: bytes) -> Keys:
    keys = Keys(enc_key=secret[:32], id_key=secret[32:], repo_id=cfg.repo_id)
    check_keys(cfg, keys)
    return keys


def check_keys(cfg: RepoConfig, keys: Keys) -> None:
    """Raise WrongPassphrase unless `keys` belong to the repository of `cfg`."""
    if keys.repo_id and keys.repo_id != cfg.repo_id:
        raise WrongPassphrase("the keys handed over belong to another repository")
    if cfg.key_check is not None and not hmac.compare_digest(
        cfg.key_check, _key_check(cfg.repo_id, keys)
    ):
        raise WrongPassphrase("the key does not belong to this repository")


def new_config(
    *,
    block_size: int,
    hash_name: str,
    compression: str,
    encryption: str,
    passphrase: str | None,
    immutable: bool = False,
) -> tuple[RepoConfig, Keys | None]:
    if block_size < MIN_BLOCK or block_size > MAX_BLOCK or block_size & (block_size - 1):
        raise InvalidArgument("block size must be a power of two between 4K and 4M")
    if hash_name not in ("sha256", "blake3"):
        raise InvalidArgument(f"unknown hash {hash_name!r} (sha256, blake3)")
    repo_id = uuid.uuid4().hex
    key_doc: dict[str, str] | None = None
    keys: Keys | None = None
    check: str | None = None
    if encryption == "aes-256-gcm":
        if not passphrase:
            raise InvalidArgument("an encrypted repository needs a passphrase")
        secret = os.urandom(SECRET_BYTES)
        key_doc = _wrap(secret, passphrase, id_=os.urandom(4).hex(), name="default",
                        created=_now_text())  # fmt: skip
        keys = Keys(enc_key=secret[:32], id_key=secret[32:], repo_id=repo_id)
        check = _key_check(repo_id, keys)
    elif encryption != "none":
        raise InvalidArgument(f"unknown encryption {encryption!r} (none, aes-256-gcm)")
    cfg = RepoConfig(
        repo_id=repo_id,
        version=FORMAT_VERSION,
        block_size=block_size,
        hash=hash_name,
        compression=compression,
        encryption=encryption,
        pack_target_bytes=32 * 1024 * 1024,
        key=key_doc,
        key_check=check,
        immutable=immutable,
    )
    return cfg, keys


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_config(root: Path, cfg: RepoConfig) -> None:
    """Replace config.json atomically and durably (temp file, fsync, rename, fsync dir).

    Fields at their defaults (no extra keys, not immutable, no key check) are left out, so a
    repository that uses none of them stays readable by the version that introduced v1.
    """
    doc: dict[str, Any] = asdict(cfg)
    doc["extra_keys"] = list(cfg.extra_keys)
    for name in ("extra_keys", "key_check", "immutable"):
        if not doc[name]:
            del doc[name]
    tmp = root / (CONFIG_NAME + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    os.fchmod(fd, FILE_MODE)  # whatever the umask, and whoever left a temp file behind
    with os.fdopen(fd, "w") as fh:
        json.dump(doc, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, root / CONFIG_NAME)
    _fsync_dir(root)


def read_config(root: Path) -> RepoConfig:
    path = root / CONFIG_NAME
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(f"no repository at {root} (run 'appliance init' first)") from None
    except (OSError, ValueError) as exc:
        raise FormatError(f"unreadable repository config {path}: {exc}") from exc
    try:
        if "extra_keys" in doc:
            doc["extra_keys"] = tuple(doc["extra_keys"])
        cfg = RepoConfig(**doc)
    except TypeError as exc:
        raise FormatError(f"bad repository config {path}: {exc}") from exc
    if cfg.version != FORMAT_VERSION:
        raise FormatError(f"repository format v{cfg.version} is not supported by this version")
    return cfg


def _unlock(cfg: RepoConfig, passphrase: str | None) -> tuple[Keys, str]:
    """The keys and the id of the first slot `passphrase` opens. Raises WrongPassphrase."""
    if not passphrase:
        raise WrongPassphrase("repository is encrypted: set APPLIANCE_PASSPHRASE")
    for slot in key_slots(cfg):
        secret = _try_slot(slot, passphrase)
        if secret is not None:
            return _keys_of(cfg, secret), slot_id(slot)
    raise WrongPassphrase("wrong passphrase for this repository")


def unwrap_keys(cfg: RepoConfig, passphrase: str | None) -> Keys | None:
    if cfg.key is None:
        return None
    return _unlock(cfg, passphrase)[0]


def unlock_keys(root: Path, passphrase: str | None) -> Keys | None:
    """Read the config of the repository at `root` and unwrap its keys (None: unencrypted)."""
    return unwrap_keys(read_config(Path(root)), passphrase)


# -- key slots: passwd, add, list, remove, export, import --------------------------------------
@contextlib.contextmanager
def _config_change(root: Path) -> Iterator[RepoConfig]:
    """Hold the repository writer lock while config.json is read, changed and replaced."""
    fd = take_flock(root / "lock", purpose="key change",
                    busy=f"repository {root} is busy: a writer is running")  # fmt: skip
    try:
        yield read_config(root)
    finally:
        os.close(fd)


def _encrypted(cfg: RepoConfig) -> None:
    if cfg.key is None:
        raise InvalidArgument("the repository is not encrypted: it has no keys")


def list_keys(root: Path) -> list[KeyInfo]:
    """The key slots of a repository (needs no passphrase: nothing secret is shown)."""
    cfg = read_config(Path(root))
    _encrypted(cfg)
    return [
        KeyInfo(slot_id(s), s.get("name", "default"), s.get("created", "")) for s in key_slots(cfg)
    ]


def change_passphrase(root: Path, passphrase: str | None, new_passphrase: str) -> str:
    """Re-wrap the slot `passphrase` opens under `new_passphrase`; returns its id.

    The master secret is unchanged, so no chunk is rewritten. The old passphrase no longer
    opens that slot once this returns. Takes the repository writer lock (Locked if busy).
    """
    root = Path(root)
    with _config_change(root) as cfg:
        _encrypted(cfg)
        keys, used = _unlock(cfg, passphrase)
        slots = []
        for s in key_slots(cfg):
            if slot_id(s) == used:
                s = _wrap(keys.secret, new_passphrase, id_=used, name=s.get("name", "default"),
                          created=s.get("created", _now_text()))  # fmt: skip
            slots.append(s)
        write_config(
            root, replace(_with_slots(cfg, slots), key_check=_key_check(cfg.repo_id, keys))
        )
        return used


def add_key(root: Path, passphrase: str | None, new_passphrase: str, name: str) -> str:
    """Add a slot that `new_passphrase` opens (authorised by any existing passphrase)."""
    root = Path(root)
    with _config_change(root) as cfg:
        _encrypted(cfg)
        keys, _used = _unlock(cfg, passphrase)
        taken = {slot_id(s) for s in key_slots(cfg)}
        new_id = os.urandom(4).hex()
        while new_id in taken:
            new_id = os.urandom(4).hex()
        slot = _wrap(keys.secret, new_passphrase, id_=new_id, name=name or new_id,
                     created=_now_text())  # fmt: skip
        cfg = _with_slots(cfg, [*key_slots(cfg), slot])
        write_config(root, replace(cfg, key_check=_key_check(cfg.repo_id, keys)))
        return new_id


def remove_key(root: Path, passphrase: str | None, key_id: str) -> None:
    """Remove slot `key_id`. Authorised by another slot's passphrase (as restic does: the
    caller then provably still holds a working key); the last slot is never removed."""
    root = Path(root)
    with _config_change(root) as cfg:
        _encrypted(cfg)
        slots = key_slots(cfg)
        if key_id not in {slot_id(s) for s in slots}:
            raise NotFound(f"no key {key_id!r} (see `appliance key list`)")
        if len(slots) == 1:
            raise InvalidArgument(
                f"key {key_id} is the repository's last key: it cannot be removed"
            )
        keys, used = _unlock(cfg, passphrase)
        if used == key_id:
            raise InvalidArgument(
                f"key {key_id} is the one this passphrase opens: remove it with another key's "
                "passphrase"
            )
        cfg = _with_slots(cfg, [s for s in slots if slot_id(s) != key_id])
        write_config(root, replace(cfg, key_check=_key_check(cfg.repo_id, keys)))


def export_keys(root: Path) -> dict[str, Any]:
    """The wrapped key slots and the repository id (borg `key export`): still sealed by their
    passphrases, so the export is as safe to keep as the passphrases are strong."""
    cfg = read_config(Path(root))
    _encrypted(cfg)
    return {
        "format": EXPORT_FORMAT,
        "repo_id": cfg.repo_id,
        "encryption": cfg.encryption,
        "key_check": cfg.key_check,
        "exported": _now_text(),
        "keys": key_slots(cfg),
    }


def paper_text(doc: dict[str, Any]) -> str:
    """A printable copy of an export: hex lines, each with a check of its own to type back."""
    blob = zlib.compress(json.dumps(doc, separators=(",", ":"), sort_keys=True).encode(), 9)
    lines = [PAPER_HEADER, f"repository: {doc['repo_id']}",
             "type it back with: appliance key import --paper FILE", ""]  # fmt: skip
    for n in range(0, len(blob), PAPER_BYTES_PER_LINE):
        chunk = blob[n : n + PAPER_BYTES_PER_LINE].hex()
        groups = " ".join(chunk[i : i + 4] for i in range(0, len(chunk), 4))
        no = n // PAPER_BYTES_PER_LINE + 1
        lines.append(f"{no:3d}: {groups} - {_line_check(no, chunk)}")
    return "\n".join(lines) + "\n"


def _line_check(no: int, hex_text: str) -> str:
    return hashlib.sha256(f"{no}:{hex_text}".encode()).hexdigest()[:4]


def parse_paper(text: str) -> dict[str, Any]:
    """Inverse of `paper_text`; a mistyped line is named."""
    parts: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        head, sep, rest = line.partition(":")
        if not sep or not (head.strip().isascii() and head.strip().isdigit()):
            continue  # the header lines
        no = int(head)
        data, sep2, check = rest.rpartition("-")
        hex_text = "".join(data.split()).lower()
        if not sep2 or _line_check(no, hex_text) != check.strip().lower():
            raise InvalidArgument(f"paper key line {no} does not match its check: retype it")
        if no != len(parts) + 1:
            raise InvalidArgument(f"paper key: line {len(parts) + 1} is missing")
        parts.append(hex_text)
    if not parts:
        raise InvalidArgument("no key lines found in the paper key")
    try:
        doc = json.loads(zlib.decompress(bytes.fromhex("".join(parts))))
    except (ValueError, zlib.error) as exc:
        raise InvalidArgument(f"paper key is incomplete or damaged: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidArgument("paper key does not hold a key export")
    return doc


def import_keys(root: Path, doc: dict[str, Any], passphrase: str | None) -> list[str]:
    """Put exported slots back (borg `key import`): a slot with an id the config has replaces
    it, others are added. `passphrase` must open one of the imported slots and the key must
    be this repository's. Returns the imported ids."""
    root = Path(root)
    with _config_change(root) as cfg:
        if doc.get("format") != EXPORT_FORMAT or not isinstance(doc.get("keys"), list):
            raise InvalidArgument("not a key export of this program")
        if doc.get("repo_id") != cfg.repo_id:
            raise InvalidArgument(
                f"the export is of repository {doc.get('repo_id')}, this is {cfg.repo_id}"
            )
        if cfg.encryption != doc.get("encryption"):
            raise InvalidArgument("the export's encryption does not match the repository")
        imported: list[dict[str, str]] = [
            {str(k): str(v) for k, v in s.items()} for s in doc["keys"] if isinstance(s, dict)
        ]
        if not imported:
            raise InvalidArgument("the export holds no keys")
        probe = replace(cfg, key=imported[0], extra_keys=tuple(imported[1:]),
                        key_check=cfg.key_check or doc.get("key_check"))  # fmt: skip
        keys, _used = _unlock(probe, passphrase)
        new_ids = [slot_id(s) for s in imported]
        kept = [s for s in key_slots(cfg) if slot_id(s) not in new_ids]
        cfg = _with_slots(cfg, [*kept, *imported])
        write_config(root, replace(cfg, key_check=_key_check(cfg.repo_id, keys)))
        return new_ids


# -- handing keys to a child process -----------------------------------------------------------
@dataclass
class KeyHandoff:
    """Gives one child process the unwrapped keys over an inherited pipe.

    ``with KeyHandoff(keys) as h: Popen(..., env={**env, **h.env}, pass_fds=h.fds)``. The key
    bytes sit in the pipe (a few dozen bytes, far below the pipe buffer, so nothing blocks);
    the child reads them once with `inherited_keys()`, which closes its end. Nothing secret is
    in the child's environment or on its command line. `keys=None` (an unencrypted repository)
    hands over nothing.
    """

    keys: Keys | None
    env: dict[str, str] = field(default_factory=dict)
    fds: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.keys is None:
            return
        r, w = os.pipe()
        try:
            os.write(w, _HANDOFF_MAGIC + self.keys.repo_id.encode().ljust(32, b"\0")
                     + self.keys.secret)  # fmt: skip
        finally:
            os.close(w)
        # Above the low numbers a child may claim (nbdkit takes fd 3 for its socket).
        high = fcntl.fcntl(r, fcntl.F_DUPFD_CLOEXEC, _HANDOFF_MIN_FD)
        os.close(r)
        self.fds = (high,)
        self.env = {KEY_FD_ENV: str(high)}

    def close(self) -> None:
        """Close the parent's copy of the pipe (after the child started)."""
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = ()

    def __enter__(self) -> KeyHandoff:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def inherited_keys() -> Keys | None:
    """The keys a parent handed over with KeyHandoff, or None if it handed none.

    Reads and closes the pipe named by APPLIANCE_KEY_FD and drops that variable, so
    grandchildren do not inherit a dangling fd number. Call once, early.
    """
    fd_text = os.environ.pop(KEY_FD_ENV, None)
    if not fd_text:
        return None
    try:
        fd = int(fd_text)
    except ValueError:
        raise InvalidArgument(f"{KEY_FD_ENV}={fd_text!r} is not a file descriptor") from None
    chunks = []
    try:
        while True:
            b = os.read(fd, 4096)
            if not b:
                break
            chunks.append(b)
    except OSError as exc:
        raise InvalidArgument(f"cannot read the keys handed over on fd {fd}: {exc}") from exc
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    blob = b"".join(chunks)
    n = len(_HANDOFF_MAGIC)
    if len(blob) != n + 32 + SECRET_BYTES or not blob.startswith(_HANDOFF_MAGIC):
        raise InvalidArgument("the keys handed over are incomplete")
    secret = blob[n + 32 :]
    return Keys(enc_key=secret[:32], id_key=secret[32:],
                repo_id=blob[n : n + 32].rstrip(b"\0").decode())  # fmt: skip
