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
from dataclasses import dataclass
from typing import NamedTuple

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


@dataclass(frozen=True)
class ValueLayout:
    """Where each field of a format-v1 value sits (``docs/format.md`` §1)::

        header | nonce | body (AES-GCM ciphertext, then the tag)

    The one place those offsets are written down: everything else slices with
    :attr:`nonce` and :attr:`body` (ready ``slice`` objects, as fast as literal slices in
    a hot loop) or calls :func:`parse` and :func:`build`.
    """

    header: bytes
    nonce_size: int
    tag_size: int

    @property
    def nonce(self) -> slice:
        """The nonce's bytes: ``value[layout.nonce]``."""
        return slice(len(self.header), len(self.header) + self.nonce_size)

    @property
    def body(self) -> slice:
        """Ciphertext and tag, as AES-GCM libraries take and return them together."""
        return slice(len(self.header) + self.nonce_size, None)

    @property
    def overhead(self) -> int:
        """Bytes a value has beyond its plaintext: the shortest valid value."""
        return len(self.header) + self.nonce_size + self.tag_size

    def sealed_size(self, plaintext_size: int) -> int:
        """The length of the value of a ``plaintext_size``-byte plaintext."""
        return plaintext_size + self.overhead


#: Format v1: ``b"RO" 0x01 | nonce (12) | ciphertext | tag (16)``.
V1 = ValueLayout(HEADER, NONCE_SIZE, TAG_SIZE)
#: A wrapped DEK: a format-v1 value of exactly one key (``docs/format.md`` §2).
WRAPPED_SIZE = V1.sealed_size(KEY_SIZE)
#: The body of a wrapped DEK: the encrypted key and its tag.
WRAPPED_BODY_SIZE = KEY_SIZE + TAG_SIZE


class Sealed(NamedTuple):
    """A format-v1 value taken apart: what AES-GCM's open takes besides key and AAD."""

    nonce: bytes
    body: bytes


def parse(value: object, *, size: int | None = None) -> Sealed:
    """Split a format-v1 value into nonce and body; :class:`InvalidToken` if it cannot be
    one (not bytes, too short, another header, or not ``size`` bytes when given)."""
    if not isinstance(value, bytes | bytearray | memoryview):
        raise InvalidToken()
    data = bytes(value)
    if len(data) < V1.overhead or not data.startswith(V1.header) or \
            (size is not None and len(data) != size):
        raise InvalidToken()
    return Sealed(data[V1.nonce], data[V1.body])


def build(nonce: bytes, body: bytes) -> bytes:
    """The format-v1 value of ``nonce`` and an AES-GCM ``body`` (ciphertext + tag)."""
    if len(nonce) != V1.nonce_size:
        raise ValueError(f"nonce must be {V1.nonce_size} bytes")
    if len(body) < V1.tag_size:
        raise ValueError(f"body must hold at least the {V1.tag_size}-byte tag")
    return V1.header + bytes(nonce) + bytes(body)


def associated_data(aad: bytes = b"") -> bytes:
    """The AES-GCM associated data of a value: its header, then ``aad``."""
    return V1.header + aad


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
    return build(nonce, aead.encrypt(nonce, bytes(plaintext), associated_data(aad)))


def decrypt(key: bytes | AESGCM, value: bytes, *, aad: bytes = b"") -> bytes:
    """Decrypt a format-v1 value; raise :class:`InvalidToken` for any failure."""
    sealed = parse(value)
    aead = key if isinstance(key, AESGCM) else _aead(key)
    try:
        return aead.decrypt(sealed.nonce, sealed.body, associated_data(aad))
    except InvalidTag:
        raise InvalidToken() from None


def _aead(key: bytes) -> AESGCM:
    _check_key(key)
    return AESGCM(bytes(key))


def dek_aad(version: int) -> bytes:
    """Extra associated data binding a wrapped DEK to its key version (after the header:
    see :func:`wrap_aad`)."""
    if not 0 < version < 2**31:
        raise ValueError("key version must be a positive 32-bit integer")
    return _DEK_AAD_LABEL + struct.pack(">I", version)


def wrap_aad(version: int) -> bytes:
    """The full AES-GCM associated data of the wrapped DEK of ``version``."""
    return associated_data(dek_aad(version))


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
