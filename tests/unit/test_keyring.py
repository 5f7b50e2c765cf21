"""KeyRing: decrypt with whichever key a row names, encrypt under the active one."""

from __future__ import annotations

import base64
import os
import pickle
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rotation_operator.crypto import codec as crypto
from rotation_operator.crypto.kek import SecretKek
from rotation_operator.crypto.keyring import BadRow, KeyRing, legacy_cipher
from rotation_operator.errors import InvalidToken, LegacyReadsClosed, UnknownKeyError

KEK = os.urandom(32)
DEKS = {1: os.urandom(32), 2: os.urandom(32), 5: os.urandom(32)}


def ring(active: int = 5) -> KeyRing:
    return KeyRing(active, dict(DEKS), KEK)


@settings(max_examples=100, deadline=None)
@given(plaintext=st.binary(max_size=1024), key_id=st.sampled_from([None, 1, 2, 5]))
def test_rotate_round_trip_from_any_key(plaintext: bytes, key_id: int | None) -> None:
    r = ring()
    old = crypto.encrypt(KEK if key_id is None else DEKS[key_id], plaintext)
    assert r.decrypt(old, key_id) == plaintext
    new = r.rotate(old, key_id)
    assert r.decrypt(new, 5) == plaintext
    assert crypto.decrypt(DEKS[5], new) == plaintext


@settings(max_examples=100, deadline=None)
@given(plaintext=st.binary(max_size=512))
def test_encrypt_uses_the_active_key(plaintext: bytes) -> None:
    value, key_id = ring(2).encrypt(plaintext)
    assert key_id == 2
    assert crypto.decrypt(DEKS[2], value) == plaintext
    with pytest.raises(InvalidToken):
        ring().decrypt(value, 1)
    with pytest.raises(InvalidToken):
        ring().decrypt(value, None)


def test_wrong_key_id_or_unknown_key() -> None:
    r = ring()
    value = crypto.encrypt(DEKS[1], b"x")
    with pytest.raises(InvalidToken):
        r.decrypt(value, 2)
    with pytest.raises(InvalidToken):
        r.rotate(value, None)
    with pytest.raises(UnknownKeyError, match="key version 7"):
        r.decrypt(value, 7)
    assert r.can_decrypt(value, 1)
    assert not r.can_decrypt(value, 2) and not r.can_decrypt(value, 7)


def test_active_key_must_be_in_the_ring() -> None:
    with pytest.raises(ValueError, match="v3"):
        KeyRing(3, dict(DEKS), KEK)


def test_versions_sorted() -> None:
    assert ring().versions == (1, 2, 5)


def test_repr_and_str_show_no_key_material() -> None:
    r = ring()
    text = repr(r) + str(r)
    assert "active_version=5" in text
    for key in [KEK, *DEKS.values()]:
        for form in (key.hex(), key.hex().upper(), base64.b64encode(key).decode(),
                     base64.urlsafe_b64encode(key).decode(), repr(key), repr(key)[2:-1]):
            assert form not in text


def test_a_ring_pickles_to_its_material_and_reads_the_same_rows() -> None:
    """How a ring reaches a rotation worker: the copy reads and rotates what the original
    does, legacy rows included, and knows the same unavailable keys."""
    original = KeyRing(5, dict(DEKS), KEK, {3: "disabled"})
    copy = pickle.loads(pickle.dumps(original))
    assert copy == original and copy.versions == original.versions
    values = [crypto.encrypt(KEK, b"legacy"), crypto.encrypt(DEKS[1], b"old")]
    rotated = copy.rotate_many(values, [None, 1])
    assert [original.decrypt(v, 5) for v in rotated] == [b"legacy", b"old"]
    with pytest.raises(UnknownKeyError, match="disabled"):
        copy.decrypt(values[1], 3)


def test_a_ring_of_keks_reads_legacy_rows_only_with_bytes_it_may_hold() -> None:
    kek, other = SecretKek(KEK), SecretKek(os.urandom(32))
    with_legacy = KeyRing.of(5, dict(DEKS), kek)
    assert with_legacy.reads_legacy and with_legacy.decrypt(
        crypto.encrypt(KEK, b"legacy"), None) == b"legacy"
    assert with_legacy.reads_legacy_as(kek) and not with_legacy.reads_legacy_as(other)
    without = KeyRing.of(5, dict(DEKS), None)
    assert not without.reads_legacy and not without.reads_legacy_as(kek)
    with pytest.raises(UnknownKeyError, match="legacy row"):
        without.decrypt(crypto.encrypt(KEK, b"legacy"), None)
    cipher = legacy_cipher(kek)
    assert cipher is not None and crypto.decrypt(cipher, crypto.encrypt(KEK, b"x")) == b"x"


def test_a_kek_that_keeps_its_bytes_gives_no_legacy_cipher() -> None:
    class Sealed:
        fingerprint, extractable = "cmac:0000000000000000", False

        def legacy_key(self) -> None:
            return None

    hsm: Any = Sealed()
    assert legacy_cipher(hsm) is None
    assert KeyRing.of(5, dict(DEKS), None).reads_legacy_as(hsm)
    assert not KeyRing.of(5, dict(DEKS), SecretKek(KEK)).reads_legacy_as(hsm)


def test_a_closed_ring_refuses_legacy_rows_though_it_holds_the_kek() -> None:
    """Legacy reads closed (every legacy row migrated): key id NULL is refused with its own
    error, in decrypt and in a rotation batch alike, and a worker's copy stays closed."""
    closed = KeyRing.of(5, dict(DEKS), SecretKek(KEK), legacy_closed=True)
    legacy = crypto.encrypt(KEK, b"legacy")
    assert not closed.reads_legacy and closed.reads_legacy_as(SecretKek(KEK))
    with pytest.raises(LegacyReadsClosed):
        closed.decrypt(legacy, None)
    with pytest.raises(BadRow):
        closed.rotate_many([legacy], [None])
    copy = pickle.loads(pickle.dumps(closed))
    assert copy.legacy_closed and not copy.can_decrypt(legacy, None)
    assert KeyRing.of(5, dict(DEKS), SecretKek(KEK)).decrypt(legacy, None) == b"legacy"
