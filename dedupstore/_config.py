"""Repository configuration file (config.json) and passphrase-wrapped keys.

Owns the repository's immutable settings (block size, hash, codec) and the key envelope:
the 64-byte master secret is encrypted with AES-256-GCM under a key derived from the
passphrase with scrypt. A wrong passphrase fails the GCM tag: a clear WrongPassphrase.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from ._codec import Keys
from .errors import FormatError, InvalidArgument, NotFound, WrongPassphrase
from .formats import FORMAT_VERSION

CONFIG_NAME = "config.json"
KEY_AAD = b"dr-appliance key v1"
SCRYPT_N = 2**15
MIN_BLOCK = 4096
MAX_BLOCK = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class RepoConfig:
    repo_id: str
    version: int
    block_size: int
    hash: str
    compression: str  # "zstd,3" etc.
    encryption: str  # "none" or "aes-256-gcm"
    pack_target_bytes: int
    key: dict[str, str] | None  # kdf parameters, salt, wrapped secret (base64)


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


def new_config(
    *,
    block_size: int,
    hash_name: str,
    compression: str,
    encryption: str,
    passphrase: str | None,
) -> tuple[RepoConfig, Keys | None]:
    if block_size < MIN_BLOCK or block_size > MAX_BLOCK or block_size & (block_size - 1):
        raise InvalidArgument("block size must be a power of two between 4K and 4M")
    if hash_name not in ("sha256", "blake3"):
        raise InvalidArgument(f"unknown hash {hash_name!r} (sha256, blake3)")
    key_doc: dict[str, str] | None = None
    keys: Keys | None = None
    if encryption == "aes-256-gcm":
        if not passphrase:
            raise InvalidArgument("an encrypted repository needs a passphrase")
        secret = os.urandom(64)
        salt = os.urandom(16)
        nonce = os.urandom(12)
        kek = _kdf(passphrase, salt, SCRYPT_N)
        wrapped = AESGCM(kek).encrypt(nonce, secret, KEY_AAD)
        key_doc = {
            "kdf": "scrypt",
            "n": str(SCRYPT_N),
            "salt": base64.b64encode(salt).decode(),
            "nonce": base64.b64encode(nonce).decode(),
            "wrapped": base64.b64encode(wrapped).decode(),
        }
        keys = Keys(enc_key=secret[:32], id_key=secret[32:])
    elif encryption != "none":
        raise InvalidArgument(f"unknown encryption {encryption!r} (none, aes-256-gcm)")
    cfg = RepoConfig(
        repo_id=uuid.uuid4().hex,
        version=FORMAT_VERSION,
        block_size=block_size,
        hash=hash_name,
        compression=compression,
        encryption=encryption,
        pack_target_bytes=32 * 1024 * 1024,
        key=key_doc,
    )
    return cfg, keys


def write_config(root: Path, cfg: RepoConfig) -> None:
    tmp = root / (CONFIG_NAME + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(asdict(cfg), fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, root / CONFIG_NAME)


def read_config(root: Path) -> RepoConfig:
    path = root / CONFIG_NAME
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(f"no repository at {root} (run 'appliance init' first)") from None
    except (OSError, ValueError) as exc:
        raise FormatError(f"unreadable repository config {path}: {exc}") from exc
    try:
        cfg = RepoConfig(**doc)
    except TypeError as exc:
        raise FormatError(f"bad repository config {path}: {exc}") from exc
    if cfg.version != FORMAT_VERSION:
        raise FormatError(f"repository format v{cfg.version} is not supported by this version")
    return cfg


def unwrap_keys(cfg: RepoConfig, passphrase: str | None) -> Keys | None:
    if cfg.key is None:
        return None
    if not passphrase:
        raise WrongPassphrase("repository is encrypted: set APPLIANCE_PASSPHRASE")
    k = cfg.key
    try:
        kek = _kdf(passphrase, base64.b64decode(k["salt"]), int(k["n"]))
        secret = AESGCM(kek).decrypt(
            base64.b64decode(k["nonce"]), base64.b64decode(k["wrapped"]), KEY_AAD
        )
    except InvalidTag:
        raise WrongPassphrase("wrong passphrase for this repository") from None
    except (KeyError, ValueError) as exc:
        raise FormatError(f"damaged key in repository config: {exc}") from exc
    return Keys(enc_key=secret[:32], id_key=secret[32:])
