"""An API key's secret: made here, shown once, stored only as its SHA-256.

Why a plain SHA-256 and not bcrypt/scrypt: those slow hashes protect *low-entropy* secrets
(passwords) against guessing. A key here is 32 random bytes (256 bits): no dictionary or
brute force reaches it, so a fast hash loses nothing, and it lets every request be checked
with one dictionary lookup instead of a deliberately slow (~100 ms) comparison per call.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

KEY_PREFIX = "lego-"  # recognisable in a config file or a leak scanner; never the whole key in a log


def new_key() -> str:
    """A fresh key: `lego-` and 32 random bytes, URL-safe base64 (43 characters)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The hex SHA-256 of `key`: what the store keeps and looks keys up by."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key_id() -> str:
    """A key's public handle (in /v1/keys, in request records): never derived from the secret."""
    return "key_" + secrets.token_hex(8)


def read_key_file(path: Path) -> str:
    """The key in `path` (first line, stripped); ValueError if it holds none."""
    key = path.read_text().strip()
    if not key:
        raise ValueError(f"{path} is empty: delete it to have a new admin key made at the next start")
    return key


def ensure_key_file(path: Path) -> tuple[str, bool]:
    """The key in `path`, made (0600, its directory 0700) when the file does not exist yet;
    returns (key, made_now). Safe when two processes race: the file is created exclusively."""
    try:
        return read_key_file(path), False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = new_key()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return read_key_file(path), False
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key, True
