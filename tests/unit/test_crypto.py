"""Property tests of crypto.py: round trips and every way a value can be wrong."""

from __future__ import annotations

import base64
import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from rotation_operator.crypto import codec as crypto
from rotation_operator.errors import InvalidToken, KekFormatError

keys = st.binary(min_size=32, max_size=32)
plaintexts = st.binary(max_size=2048)
versions = st.integers(min_value=1, max_value=2**31 - 1)
SETTINGS = settings(max_examples=150, deadline=None)


@SETTINGS
@given(key=keys, plaintext=plaintexts, aad=st.binary(max_size=64))
def test_round_trip_any_plaintext(key: bytes, plaintext: bytes, aad: bytes) -> None:
    value = crypto.encrypt(key, plaintext, aad=aad)
    assert value[:3] == b"RO\x01"
    assert len(value) == len(plaintext) + crypto.OVERHEAD
    assert crypto.decrypt(key, value, aad=aad) == plaintext
    assert crypto.decrypt(AESGCM(key), value, aad=aad) == plaintext  # ready cipher too


@SETTINGS
@given(key=keys, other=keys, plaintext=plaintexts)
def test_wrong_key_raises_invalid_token(key: bytes, other: bytes, plaintext: bytes) -> None:
    if key == other:
        return
    with pytest.raises(InvalidToken):
        crypto.decrypt(other, crypto.encrypt(key, plaintext))


@SETTINGS
@given(key=keys, plaintext=plaintexts, aad=st.binary(max_size=32),
       other=st.binary(max_size=32))
def test_wrong_aad_raises_invalid_token(key: bytes, plaintext: bytes, aad: bytes,
                                        other: bytes) -> None:
    if aad == other:
        return
    with pytest.raises(InvalidToken):
        crypto.decrypt(key, crypto.encrypt(key, plaintext, aad=aad), aad=other)


@SETTINGS
@given(key=keys, plaintext=plaintexts, data=st.data())
def test_truncated_or_extended_value_raises_invalid_token(key: bytes, plaintext: bytes,
                                                          data: st.DataObject) -> None:
    value = crypto.encrypt(key, plaintext)
    cut = data.draw(st.integers(min_value=0, max_value=len(value) - 1))
    with pytest.raises(InvalidToken):
        crypto.decrypt(key, value[:cut])
    with pytest.raises(InvalidToken):
        crypto.decrypt(key, value + data.draw(st.binary(min_size=1, max_size=16)))


@SETTINGS
@given(key=keys, plaintext=plaintexts, data=st.data())
def test_any_modified_byte_raises_invalid_token(key: bytes, plaintext: bytes,
                                                data: st.DataObject) -> None:
    value = bytearray(crypto.encrypt(key, plaintext))
    i = data.draw(st.integers(min_value=0, max_value=len(value) - 1))
    value[i] ^= data.draw(st.integers(min_value=1, max_value=255))
    with pytest.raises(InvalidToken):
        crypto.decrypt(key, bytes(value))


@SETTINGS
@given(key=keys, junk=st.binary(max_size=100))
def test_junk_raises_invalid_token(key: bytes, junk: bytes) -> None:
    with pytest.raises(InvalidToken):
        crypto.decrypt(key, junk)


def test_non_bytes_value_raises_invalid_token() -> None:
    with pytest.raises(InvalidToken):
        crypto.decrypt(bytes(32), "RO\x01" + "x" * 40)  # type: ignore[arg-type]
    with pytest.raises(InvalidToken):
        crypto.decrypt(bytes(32), None)  # type: ignore[arg-type]


def test_other_format_version_raises_invalid_token() -> None:
    key = os.urandom(32)
    value = crypto.encrypt(key, b"hello")
    with pytest.raises(InvalidToken):
        crypto.decrypt(key, b"RO\x02" + value[3:])


def test_nonces_are_random() -> None:
    key = os.urandom(32)
    values = {crypto.encrypt(key, b"same plaintext") for _ in range(200)}
    assert len(values) == 200
    assert len({v[3:15] for v in values}) == 200


def test_encrypt_argument_checks() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        crypto.encrypt(bytes(16), b"x")
    with pytest.raises(ValueError, match="nonce"):
        crypto.encrypt(bytes(32), b"x", nonce=bytes(11))
    with pytest.raises(TypeError):
        crypto.encrypt(bytes(32), "text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        crypto.encrypt("k" * 32, b"x")  # type: ignore[arg-type]


@SETTINGS
@given(kek=keys, dek=keys, version=versions)
def test_wrap_round_trip_any_version(kek: bytes, dek: bytes, version: int) -> None:
    wrapped = crypto.wrap_dek(kek, dek, version)
    assert len(wrapped) == 32 + crypto.OVERHEAD
    assert crypto.unwrap_dek(kek, wrapped, version) == dek


@SETTINGS
@given(kek=keys, dek=keys, version=versions, other=versions)
def test_unwrap_with_another_version_fails(kek: bytes, dek: bytes, version: int,
                                           other: int) -> None:
    if version == other:
        return
    with pytest.raises(InvalidToken):
        crypto.unwrap_dek(kek, crypto.wrap_dek(kek, dek, version), other)


@SETTINGS
@given(kek=keys, other=keys, dek=keys, version=versions)
def test_unwrap_with_another_kek_fails(kek: bytes, other: bytes, dek: bytes,
                                       version: int) -> None:
    if kek == other:
        return
    with pytest.raises(InvalidToken):
        crypto.unwrap_dek(other, crypto.wrap_dek(kek, dek, version), version)


def test_unwrap_refuses_a_value_that_is_not_32_bytes() -> None:
    kek = os.urandom(32)
    short = crypto.encrypt(kek, bytes(31), aad=crypto.dek_aad(3))
    with pytest.raises(InvalidToken):
        crypto.unwrap_dek(kek, short, 3)


@pytest.mark.parametrize("version", [0, -1, 2**31, 2**32])
def test_dek_version_bounds(version: int) -> None:
    with pytest.raises(ValueError, match="positive 32-bit"):
        crypto.dek_aad(version)
    with pytest.raises(ValueError):
        crypto.wrap_dek(bytes(32), bytes(32), version)


def test_wrap_refuses_a_dek_of_the_wrong_size() -> None:
    with pytest.raises(ValueError):
        crypto.wrap_dek(bytes(32), bytes(31), 1)


def test_new_key_is_32_random_bytes() -> None:
    a, b = crypto.new_key(), crypto.new_key()
    assert len(a) == len(b) == 32 and a != b


@SETTINGS
@given(kek=keys, other=keys)
def test_fingerprint_is_short_stable_and_distinct(kek: bytes, other: bytes) -> None:
    fp = crypto.kek_fingerprint(kek)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fp == crypto.kek_fingerprint(bytearray(kek))  # type: ignore[arg-type]
    assert kek.hex()[:16] != fp or kek.hex() == fp  # it is not a prefix of the key
    if kek != other:
        assert fp != crypto.kek_fingerprint(other)


@SETTINGS
@given(kek=keys)
def test_parse_kek_accepts_every_documented_form(kek: bytes) -> None:
    forms = [kek, kek.hex().encode(), kek.hex().upper().encode() + b"\n",
             base64.b64encode(kek), base64.b64encode(kek).rstrip(b"=") + b"\n",
             base64.urlsafe_b64encode(kek), base64.urlsafe_b64encode(kek).rstrip(b"=")]
    for form in forms:
        assert crypto.parse_kek(form, "test") == kek


def _forms(raw: bytes) -> list[str]:
    return [raw.decode("latin-1"), raw.strip().decode("latin-1"), raw.hex(), raw.hex().upper(),
            base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()]


@SETTINGS
@given(raw=st.binary(min_size=8, max_size=200).filter(lambda b: len(b) != 32))
def test_parse_kek_error_never_contains_the_value(raw: bytes) -> None:
    try:
        crypto.parse_kek(raw, "Secret ns/app-kek key kek")
    except KekFormatError as exc:
        message = str(exc) + repr(exc)
        assert f"found {len(raw)} bytes" in message
        assert "Secret ns/app-kek key kek" in message
        for form in _forms(raw):
            assert form not in message
        assert exc.__cause__ is None


@SETTINGS
@given(kek=keys, cut=st.integers(min_value=8, max_value=63))
def test_parse_kek_error_for_near_miss_text_never_contains_it(kek: bytes, cut: int) -> None:
    for text in (kek.hex()[:cut].encode(), base64.b64encode(kek)[:cut] + b"!"):
        if len(text) == 32 or (len(text) in (43, 44) and b"!" not in text):
            continue  # 32 bytes of anything are a raw key; hex digits are base64 too
        with pytest.raises(KekFormatError) as info:
            crypto.parse_kek(text, "--kek-file /x")
        for form in _forms(text):
            assert form not in str(info.value)


def test_43_hex_digits_are_read_as_unpadded_base64() -> None:
    """Documented ambiguity (docs/format.md): 43 or 44 characters are tried as base64."""
    text = b"0" * 43
    assert crypto.parse_kek(text, "x") == base64.b64decode(text + b"=")
