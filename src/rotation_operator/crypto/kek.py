"""Key-encryption keys behind one small interface: a Secret's bytes, or a key in an HSM.

Why an interface: the engine needs only five things of a KEK: a public name (its
fingerprint), ``wrap`` and ``unwrap`` of a DEK bound to its version, whether its bytes
exist (legacy rows were encrypted with them directly), and a description for messages.
The bytes themselves leave a KEK through one method only, :meth:`Kek.legacy_key`, and only
:mod:`.keyring` calls it: legacy rows are format-v1 values under the KEK itself, so the
ring that reads them needs the key as a cipher key.  A
key held in memory (:class:`SecretKek`) does them in software (:mod:`.crypto`); a PKCS#11
token does them itself (:mod:`.pkcs11kek`), so the KEK never leaves it.  A cloud KMS fits
the same shape: ``wrap``/``unwrap`` become remote ``Encrypt``/``Decrypt`` calls with the
version as encryption context, ``extractable`` is False, and a rekey between two keys of
one KMS could use its ``ReEncrypt``/``rewrap`` (``docs/architecture.md``).

Nothing here ever holds a KEK in a message, a ``repr`` or a log line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from rotation_operator.crypto import codec


@runtime_checkable
class Kek(Protocol):
    """What the engine, the CLI and the library need of a key-encryption key."""

    @property
    def fingerprint(self) -> str:
        """A public name of the key, stored beside every DEK it wraps."""
        ...

    @property
    def extractable(self) -> bool:
        """Whether :meth:`legacy_key` gives the key's bytes (needed for legacy rows)."""
        ...

    def describe(self) -> str:
        """Where the key comes from, for messages (never the key or a PIN)."""
        ...

    def wrap(self, dek: bytes, version: int) -> bytes:
        """``dek`` wrapped for key ``version`` (format v1, ``docs/format.md`` §2)."""
        ...

    def unwrap(self, wrapped: bytes, version: int) -> bytes:
        """The DEK of ``version``; :class:`~rotation_operator.errors.InvalidToken` if this
        key did not wrap it."""
        ...

    def legacy_key(self) -> bytes | None:
        """The key's bytes as the cipher key of legacy rows (``docs/format.md`` §2), or
        None if they never leave their store.  Called by :mod:`.keyring` only."""
        ...


class SecretKek:
    """A KEK whose 32 bytes this process holds (a Kubernetes Secret, a file, a variable)."""

    __slots__ = ("_fingerprint", "_key", "_source")

    def __init__(self, key: bytes, source: str = "a KEK") -> None:
        if len(key) != codec.KEY_SIZE:
            raise ValueError(f"a KEK is {codec.KEY_SIZE} bytes")
        self._key = bytes(key)
        self._source = source
        self._fingerprint = codec.kek_fingerprint(self._key)

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def extractable(self) -> bool:
        return True

    def describe(self) -> str:
        return self._source

    def wrap(self, dek: bytes, version: int) -> bytes:
        return codec.wrap_dek(self._key, dek, version)

    def unwrap(self, wrapped: bytes, version: int) -> bytes:
        return codec.unwrap_dek(self._key, wrapped, version)

    def legacy_key(self) -> bytes:
        return self._key

    def __repr__(self) -> str:
        return f"SecretKek({self._source!r}, fingerprint={self._fingerprint})"


def as_kek(value: bytes | Kek, source: str = "a KEK") -> Kek:
    """A :class:`Kek` from raw bytes or as given: for edges that accept either (the
    application library's constructor); the engine and the store take :class:`Kek` only."""
    if isinstance(value, bytes | bytearray):
        return SecretKek(bytes(value), source)
    return value


def find(keks: Sequence[Kek], fingerprint: str) -> Kek | None:
    """The presented KEK with this fingerprint, if any."""
    return next((k for k in keks if k.fingerprint == fingerprint), None)


def fingerprints(keks: Sequence[Kek]) -> str:
    """The presented KEKs' fingerprints, for messages (only presented ones are named)."""
    return ", ".join(k.fingerprint for k in keks) or "none"
