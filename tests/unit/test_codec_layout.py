"""codec's named layout of a format-v1 value: every field where docs/format.md puts it."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from rotation_operator.crypto import codec
from rotation_operator.errors import InvalidToken

KEY = bytes(range(32))
NONCE = bytes(range(100, 112))


def test_the_layout_is_the_one_docs_format_md_specifies() -> None:
    v1 = codec.V1
    assert v1.header == b"RO\x01" == codec.HEADER
    assert (v1.nonce.start, v1.nonce.stop) == (3, 15)
    assert (v1.body.start, v1.body.stop) == (15, None)
    assert v1.overhead == 31 == codec.OVERHEAD
    assert codec.WRAPPED_SIZE == 63 and codec.WRAPPED_BODY_SIZE == 48
    assert v1.sealed_size(0) == 31 and v1.sealed_size(32) == codec.WRAPPED_SIZE


@settings(max_examples=100, deadline=None)
@given(plaintext=st.binary(max_size=512), aad=st.binary(max_size=40))
def test_parse_and_build_round_trip_at_every_field_boundary(plaintext: bytes,
                                                            aad: bytes) -> None:
    value = codec.encrypt(KEY, plaintext, aad=aad, nonce=NONCE)
    sealed = codec.parse(value)
    # header | nonce | body: nothing lost, nothing shared between fields
    assert value[:3] == codec.V1.header
    assert sealed.nonce == NONCE == value[3:15]
    assert sealed.body == value[15:] and len(sealed.body) == len(plaintext) + 16
    assert codec.build(sealed.nonce, sealed.body) == value
    opened = AESGCM(KEY).decrypt(sealed.nonce, sealed.body, codec.associated_data(aad))
    assert opened == plaintext


def test_the_shortest_value_parses_and_one_byte_less_does_not() -> None:
    value = codec.encrypt(KEY, b"", nonce=NONCE)
    assert len(value) == codec.V1.overhead
    assert codec.parse(value) == (NONCE, value[15:])
    with pytest.raises(InvalidToken):
        codec.parse(value[:-1])


@pytest.mark.parametrize("at", range(3))
def test_every_header_byte_is_checked(at: int) -> None:
    value = bytearray(codec.encrypt(KEY, b"secret", nonce=NONCE))
    value[at] ^= 0x01
    with pytest.raises(InvalidToken):
        codec.parse(bytes(value))


@pytest.mark.parametrize("value", [None, "RO\x01" + "x" * 40, 42])
def test_parse_refuses_what_is_not_bytes(value: object) -> None:
    with pytest.raises(InvalidToken):
        codec.parse(value)


def test_parse_accepts_any_bytes_like_value() -> None:
    value = codec.encrypt(KEY, b"secret", nonce=NONCE)
    expected = codec.parse(value)
    assert codec.parse(bytearray(value)) == expected
    assert codec.parse(memoryview(value)) == expected


def test_parse_with_a_size_is_exact() -> None:
    wrapped = codec.wrap_dek(KEY, os.urandom(32), 3, nonce=NONCE)
    assert len(wrapped) == codec.WRAPPED_SIZE
    sealed = codec.parse(wrapped, size=codec.WRAPPED_SIZE)
    assert len(sealed.body) == codec.WRAPPED_BODY_SIZE
    for other in (wrapped[:-1], wrapped + b"\x00"):
        with pytest.raises(InvalidToken):
            codec.parse(other, size=codec.WRAPPED_SIZE)


def test_build_refuses_a_wrong_nonce_or_a_body_without_a_tag() -> None:
    with pytest.raises(ValueError, match="nonce"):
        codec.build(NONCE[:-1], bytes(16))
    with pytest.raises(ValueError, match="tag"):
        codec.build(NONCE, bytes(15))
    assert codec.build(NONCE, bytes(16)) == codec.HEADER + NONCE + bytes(16)


def test_the_wrap_aad_is_header_then_label_then_version() -> None:
    aad = codec.wrap_aad(3)
    assert aad == b"RO\x01" + b"rotation-operator/dek" + b"\x00\x00\x00\x03"
    assert aad == codec.associated_data(codec.dek_aad(3))
    dek = os.urandom(32)
    sealed = codec.parse(codec.wrap_dek(KEY, dek, 3))
    assert AESGCM(KEY).decrypt(sealed.nonce, sealed.body, aad) == dek
