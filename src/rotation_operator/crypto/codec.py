"""The value format, DEK wrapping and KEK handling: small, pure, I/O-free.

Everything that touches key bytes lives here so it can be read in one sitting and tested
with known-answer vectors (``tests/vectors/format-v1.json``, specified in
``docs/format.md``).  The only side effect is ``os.urandom`` and it is injectable (the
``nonce`` argument), as the clock is in Fernet's ``encrypt_at_time``.

Format v1 of a stored value (application secret, legacy row, or wrapped DEK)::

    b"RO" | 0x01 | nonce (12) | AES-256-GCM ciphertext (len(plaintext)) | tag (16)

The 3-byte header is also the start of the associated data, so a value cannot be
re-labelled.  Wrapped DEKs add the key version to the associated data, so a wrapped key
cannot be moved to another version's row.  Every way a value can be bad raises the one
opaque :class:`~rotation_operator.errors.InvalidToken`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from rotation_operator.errors import InvalidToken, KekFormatError

MAGIC = b"RO"
FORMAT_V1 = 0x01
HEADER = MAGIC + bytes([FORMAT_V1])
NONCE_SIZE = 12
TAG_SIZE = 16
KEY_SIZE = 32
OVERHEAD = len(HEADER) + NONCE_SIZE + TAG_SIZE
_DEK_AAD_LABEL = b"rotation-operator/dek"
_FINGERPRINT_LABEL = b"rotation-operator/kek-fingerprint/v1"


def new_key() -> bytes:
    """A fresh random 32-byte key (a DEK)."""
    return os.urandom(KEY_SIZE)


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes | bytearray):
        raise TypeError("key must be bytes")
    if len(key) != KEY_SIZE:
        raise ValueError(f"key must be {KEY_SIZE} bytes, got {len(key)}")


def encrypt(key: bytes | AESGCM, plaintext: bytes, *, aad: bytes = b"",
            nonce: bytes | None = None) -> bytes:
    """Encrypt ``plaintext`` into a format-v1 value.

    ``key`` is 32 bytes or a ready :class:`AESGCM` (callers encrypting millions of rows
    keep one per key).  ``nonce`` is for test vectors only; leave it ``None``.
    """
    if not isinstance(plaintext, bytes | bytearray | memoryview):
        raise TypeError("plaintext must be bytes")
    if nonce is None:
        nonce = os.urandom(NONCE_SIZE)
    elif len(nonce) != NONCE_SIZE:
        raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
    aead = key if isinstance(key, AESGCM) else _aead(key)
    return HEADER + nonce + aead.encrypt(nonce, bytes(plaintext), HEADER + aad)


def decrypt(key: bytes | AESGCM, value: bytes, *, aad: bytes = b"") -> bytes:
    """Decrypt a format-v1 value; raise :class:`InvalidToken` for any failure."""
    if not isinstance(value, bytes | bytearray | memoryview):
        raise InvalidToken()
    data = bytes(value)
    if len(data) < OVERHEAD or data[: len(HEADER)] != HEADER:
        raise InvalidToken()
    aead = key if isinstance(key, AESGCM) else _aead(key)
    nonce = data[len(HEADER) : len(HEADER) + NONCE_SIZE]
    try:
        return aead.decrypt(nonce, data[len(HEADER) + NONCE_SIZE :], HEADER + aad)
    except InvalidTag:
        raise InvalidToken() from None


def _aead(key: bytes) -> AESGCM:
    _check_key(key)
    return AESGCM(bytes(key))


def dek_aad(version: int) -> bytes:
    """Associated data binding a wrapped DEK to its key version."""
    if not 0 < version < 2**31:
        raise ValueError("key version must be a positive 32-bit integer")
    return _DEK_AAD_LABEL + struct.pack(">I", version)


def wrap_dek(kek: bytes, dek: bytes, version: int, *, nonce: bytes | None = None) -> bytes:
    """Wrap ``dek`` under ``kek`` for key ``version``."""
    _check_key(dek)
    return encrypt(kek, dek, aad=dek_aad(version), nonce=nonce)


def unwrap_dek(kek: bytes, wrapped: bytes, version: int) -> bytes:
    """Unwrap the DEK of ``version``; :class:`InvalidToken` if KEK or version is wrong."""
    dek = decrypt(kek, wrapped, aad=dek_aad(version))
    if len(dek) != KEY_SIZE:
        raise InvalidToken()
    return dek


def kek_fingerprint(kek: bytes) -> str:
    """A short public name for a KEK: 16 hex chars of HMAC-SHA256(kek, fixed label).

    Stored beside each wrapped DEK so a wrong KEK is reported as such.  It reveals nothing
    usable about the KEK (a 64-bit truncated MAC of a constant).
    """
    _check_key(kek)
    return hmac.new(bytes(kek), _FINGERPRINT_LABEL, hashlib.sha256).hexdigest()[:16]


def parse_kek(raw: bytes, source: str) -> bytes:
    """Turn the bytes of a Secret value or file into a 32-byte KEK.

    Accepted: exactly 32 raw bytes; 64 hex characters; base64 (standard or URL-safe) of 32
    bytes.  Surrounding whitespace is ignored for the text forms.  The error names
    ``source`` (e.g. ``Secret ns/app-kek key kek``) and the length found, never the value.
    """
    if len(raw) == KEY_SIZE:
        return bytes(raw)
    text = bytes(raw).strip()
    if len(text) == 2 * KEY_SIZE:
        try:
            return binascii.unhexlify(text)
        except (binascii.Error, ValueError):
            pass
    if len(text) in (43, 44):
        padded = text + b"=" * (-len(text) % 4)
        for altchars in (None, b"-_"):
            try:
                key = base64.b64decode(padded, altchars=altchars, validate=True)
            except (binascii.Error, ValueError):
                continue
            if len(key) == KEY_SIZE:
                return key
    raise KekFormatError(
        f"{source}: a KEK must be 32 raw bytes, 64 hex characters or base64 of 32 bytes; "
        f"found {len(raw)} bytes that are none of these"
    )


def kek_looks_like_text(raw: bytes) -> bool:
    """True for a Secret value taken as 32 raw bytes that are all printable ASCII: a
    passphrase-like key with far less than 256 bits of entropy (``openssl rand -hex 16``
    gives 32 such characters).  Worth a warning, not a refusal: it may be in use."""
    return len(raw) == KEY_SIZE and all(0x20 <= b < 0x7F for b in raw)
