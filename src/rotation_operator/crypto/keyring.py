"""A key ring: the unwrapped DEKs of one keys table, plus the KEK for legacy rows.

Pure (no I/O).  It is the shape of ``MultiFernet``: decrypt with whichever key a row names,
encrypt with the active one, and :meth:`KeyRing.rotate` a value from the first to the
second.  The engine and the application library both build one from the keys table.

This module is the only caller of :meth:`Kek.legacy_key`: legacy rows are format-v1
values under the KEK's own bytes.  A ring crosses to a rotation worker process by pickling
(:meth:`KeyRing.__reduce__`), so the layers above never hold key bytes themselves.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from rotation_operator.crypto import codec
from rotation_operator.crypto.kek import Kek
from rotation_operator.errors import InvalidToken, LegacyReadsClosed, UnknownKeyError

# The hot paths below slice with the codec's named layout, bound once here.
_V1 = codec.V1
_HEADER, _NONCE, _BODY, _OVERHEAD = _V1.header, _V1.nonce, _V1.body, _V1.overhead


class BadRow(Exception):
    """Row ``index`` of a batch did not decrypt (or names an unknown key)."""

    def __init__(self, index: int):
        super().__init__(index)
        self.index = index


@dataclass(frozen=True)
class KeyRing:
    """Unwrapped DEKs by version, the active version, and the KEK (for legacy rows).

    Instances never print key bytes: ``repr`` shows versions only.  Build one from
    :class:`Kek` objects with :meth:`of`.
    """

    active_version: int
    deks: Mapping[int, bytes] = field(repr=False)
    #: The KEK's bytes, the key of legacy rows; None when they cannot be read (an HSM).
    legacy_key: bytes | None = field(repr=False)
    #: Keys that exist but cannot decrypt: version -> state (disabled, destroyed).
    unavailable: Mapping[int, str] = field(default_factory=dict)
    #: Every legacy row was migrated and legacy reads are closed: key id NULL is refused
    #: (:class:`LegacyReadsClosed`) whatever KEK the ring holds.
    legacy_closed: bool = False
    _aeads: dict[int | None, AESGCM] = field(default_factory=dict, init=False, repr=False,
                                              compare=False)
    _active: AESGCM = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.active_version not in self.deks:
            raise ValueError(f"active DEK v{self.active_version} is not in the ring")
        if self.legacy_key is not None and not self.legacy_closed:
            self._aeads[None] = AESGCM(self.legacy_key)
        for version, dek in self.deks.items():
            self._aeads[version] = AESGCM(dek)
        object.__setattr__(self, "_active", self._aeads[self.active_version])

    @classmethod
    def of(cls, active_version: int, deks: Mapping[int, bytes], legacy: Kek | None,
           unavailable: Mapping[int, str] | None = None, *,
           legacy_closed: bool = False) -> KeyRing:
        """A ring of unwrapped ``deks`` that reads legacy rows with ``legacy``'s bytes,
        when it has a KEK that wraps the keys and lets them out, and legacy reads are not
        ``legacy_closed``."""
        return cls(active_version, deks, None if legacy is None else legacy.legacy_key(),
                   dict(unavailable or {}), legacy_closed)

    def __reduce__(self) -> tuple[type[KeyRing], tuple[object, ...]]:
        """Pickle as the material only (the ciphers are rebuilt): how a ring reaches a
        rotation worker, over the spawn pipe and nowhere else."""
        return (KeyRing, (self.active_version, dict(self.deks), self.legacy_key,
                          dict(self.unavailable), self.legacy_closed))

    @property
    def versions(self) -> tuple[int, ...]:
        return tuple(sorted(self.deks))

    @property
    def reads_legacy(self) -> bool:
        """Whether this ring decrypts legacy rows: it holds the bytes of the KEK they are
        under, and legacy reads are not closed."""
        return self.legacy_key is not None and not self.legacy_closed

    def reads_legacy_as(self, kek: Kek) -> bool:
        """Whether legacy rows are read with ``kek``'s bytes, or, for a KEK whose bytes
        never leave their store, whether this ring holds none: then a KEK change leaves
        no legacy row behind under the old KEK (closed reads aside)."""
        key = kek.legacy_key()
        if key is None or self.legacy_key is None:
            return key is None and self.legacy_key is None
        return hmac.compare_digest(key, self.legacy_key)

    def aead(self, key_id: int | None) -> AESGCM:
        """The cipher for ``key_id`` (``None`` = the KEK, for legacy rows)."""
        try:
            return self._aeads[key_id]
        except KeyError:
            if key_id is None and self.legacy_closed:
                raise LegacyReadsClosed(
                    "a legacy row (key id NULL) after every legacy row was migrated onto a "
                    "DEK: refused (a rollback, or an application writing without DEKs; "
                    "docs/format.md section 8)") from None
            if key_id is None:
                raise UnknownKeyError("a legacy row (encrypted with the KEK itself) needs the "
                                      "KEK's own bytes, which this key ring does not hold (a "
                                      "PKCS#11 key never gives them)") from None
            state = self.unavailable.get(key_id)
            if state == "disabled":
                raise UnknownKeyError(f"DEK v{key_id} is disabled: enable it to read this row "
                                      f"(rotation-operator keys enable {key_id})") from None
            if state == "destroyed":
                raise UnknownKeyError(f"DEK v{key_id} was destroyed: this row cannot be read "
                                      "any more") from None
            raise UnknownKeyError(f"key version {key_id} is not in the key ring") from None

    def encrypt(self, plaintext: bytes) -> tuple[bytes, int]:
        """Encrypt under the active DEK; returns ``(value, key_id)`` to store together."""
        if not isinstance(plaintext, bytes):
            raise TypeError("plaintext must be bytes")
        nonce = os.urandom(_V1.nonce_size)
        value = _HEADER + nonce + self._active.encrypt(nonce, plaintext, _HEADER)
        return value, self.active_version

    def decrypt(self, value: bytes, key_id: int | None) -> bytes:
        """Decrypt a stored value; ``key_id`` ``None`` means a legacy (KEK) row.

        The same checks as :func:`codec.decrypt`, inlined: this is the application's hot
        path.  Any failure is the opaque :class:`InvalidToken`.
        """
        aead = self.aead(key_id)
        if not isinstance(value, bytes):
            return codec.decrypt(aead, value)  # memoryview etc.: the general path
        if len(value) < _OVERHEAD or not value.startswith(_HEADER):
            raise InvalidToken()
        try:
            return aead.decrypt(value[_NONCE], value[_BODY], _HEADER)
        except InvalidTag:
            raise InvalidToken() from None

    def rotate(self, value: bytes, key_id: int | None) -> bytes:
        """Decrypt under ``key_id`` and re-encrypt under the active DEK.

        Raises :class:`InvalidToken` if the old value does not authenticate.
        """
        plaintext = codec.decrypt(self.aead(key_id), value)
        return codec.encrypt(self._aeads[self.active_version], plaintext)

    def rotate_many(self, values: Sequence[bytes], key_ids: Sequence[int | None]
                    ) -> list[bytes]:
        """:meth:`rotate` for a batch (``values[i]`` under ``key_ids[i]``): the hot loop
        of a rotation, kept lean.

        Nonces come from one ``os.urandom`` call per batch (the same CSPRNG, fewer
        syscalls).  Raises :class:`BadRow` with the index of the first row that does not
        decrypt; nothing is returned for a batch with a bad row.
        """
        header, nonce_at, body_at, overhead = _HEADER, _NONCE, _BODY, _OVERHEAD
        size = _V1.nonce_size
        encrypt, aeads = self._active.encrypt, self._aeads
        nonces = os.urandom(size * len(values))
        out: list[bytes] = []
        append = out.append
        last: object = self  # never a key id
        decrypt = None
        try:
            for value, key_id in zip(values, key_ids, strict=True):
                if key_id != last:
                    aead = aeads.get(key_id)
                    if aead is None:
                        raise BadRow(len(out))
                    decrypt, last = aead.decrypt, key_id
                if len(value) < overhead or not value.startswith(header):
                    raise BadRow(len(out))
                plaintext = decrypt(value[nonce_at], value[body_at], header)  # type: ignore[misc]
                at = len(out) * size
                nonce = nonces[at:at + size]
                append(header + nonce + encrypt(nonce, plaintext, header))
        except InvalidTag:
            raise BadRow(len(out)) from None
        return out

    def can_decrypt(self, value: bytes, key_id: int | None) -> bool:
        try:
            self.decrypt(value, key_id)
        except (InvalidToken, UnknownKeyError):
            return False
        return True


def legacy_cipher(kek: Kek) -> AESGCM | None:
    """The cipher of legacy rows under ``kek`` (format v1 directly under its bytes), or
    None when its bytes never leave their store."""
    key = kek.legacy_key()
    return None if key is None else AESGCM(key)
