"""crypto.py against the known-answer vectors of docs/format.md (tests/vectors/format-v1.json).

The vectors were computed once by an independent script using ``cryptography``'s AESGCM,
``hmac`` and ``base64`` directly, so these tests pin the byte format: a change to
crypto.py that changes a single byte of output fails here.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from rotation_operator.crypto import codec as crypto
from rotation_operator.errors import InvalidToken, KekFormatError

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).resolve().parents[1] / "vectors" / "format-v1.json").read_text())
VALUES = VECTORS["values"]
WRAPS = VECTORS["wraps"]
PARSE = VECTORS["parse_kek"]


def h(text: str) -> bytes:
    return bytes.fromhex(text)


def flips(value: bytes) -> list[bytes]:
    """``value`` with one bit flipped, once at every byte position."""
    return [value[:i] + bytes([value[i] ^ (1 << (i % 8))]) + value[i + 1:]
            for i in range(len(value))]


def test_constants_match_the_document() -> None:
    assert crypto.HEADER == h(VECTORS["header"]) == b"RO\x01"
    assert crypto.NONCE_SIZE == 12 and crypto.TAG_SIZE == 16 and crypto.OVERHEAD == 31
    assert crypto.dek_aad(1) == h(VECTORS["dek_aad_label"]) + b"\x00\x00\x00\x01"


def test_vector_file_is_complete() -> None:
    assert len(VALUES) >= 8 and len(WRAPS) >= 5 and len(VECTORS["fingerprints"]) >= 4
    assert any("error" in p for p in PARSE) and any("kek" in p for p in PARSE)


@pytest.mark.parametrize("v", VALUES, ids=[v["name"] for v in VALUES])
def test_encrypt_with_given_nonce_gives_expected_bytes(v: dict[str, str]) -> None:
    value = crypto.encrypt(h(v["key"]), h(v["plaintext"]), aad=h(v["aad"]), nonce=h(v["nonce"]))
    assert value.hex() == v["value"]
    assert len(value) == len(h(v["plaintext"])) + crypto.OVERHEAD


@pytest.mark.parametrize("v", VALUES, ids=[v["name"] for v in VALUES])
def test_decrypt_expected_bytes_gives_plaintext(v: dict[str, str]) -> None:
    assert crypto.decrypt(h(v["key"]), h(v["value"]), aad=h(v["aad"])) == h(v["plaintext"])
    # bytearray and memoryview inputs are accepted too (psycopg may hand out either)
    for form in (bytearray(h(v["value"])), memoryview(h(v["value"]))):
        assert crypto.decrypt(h(v["key"]), form, aad=h(v["aad"])) == h(  # type: ignore[arg-type]
            v["plaintext"])


@pytest.mark.parametrize("v", VALUES, ids=[v["name"] for v in VALUES])
def test_any_flipped_byte_raises_invalid_token(v: dict[str, str]) -> None:
    for bad in flips(h(v["value"])):
        with pytest.raises(InvalidToken):
            crypto.decrypt(h(v["key"]), bad, aad=h(v["aad"]))


@pytest.mark.parametrize("v", VALUES, ids=[v["name"] for v in VALUES])
def test_wrong_aad_or_key_or_truncation_raises_invalid_token(v: dict[str, str]) -> None:
    value = h(v["value"])
    with pytest.raises(InvalidToken):
        crypto.decrypt(h(v["key"]), value, aad=h(v["aad"]) + b"x")
    with pytest.raises(InvalidToken):
        crypto.decrypt(bytes(32), value, aad=h(v["aad"]))
    for n in range(len(value)):
        with pytest.raises(InvalidToken):
            crypto.decrypt(h(v["key"]), value[:n], aad=h(v["aad"]))
    with pytest.raises(InvalidToken):
        crypto.decrypt(h(v["key"]), value + b"\x00", aad=h(v["aad"]))


@pytest.mark.parametrize("w", WRAPS, ids=[str(w["version"]) for w in WRAPS])
def test_wrap_vectors(w: dict[str, Any]) -> None:
    kek, dek, version = h(w["kek"]), h(w["dek"]), w["version"]
    assert crypto.HEADER + crypto.dek_aad(version) == h(w["aad"])
    assert crypto.wrap_dek(kek, dek, version, nonce=h(w["nonce"])).hex() == w["wrapped"]
    assert crypto.unwrap_dek(kek, h(w["wrapped"]), version) == dek
    for bad in flips(h(w["wrapped"])):
        with pytest.raises(InvalidToken):
            crypto.unwrap_dek(kek, bad, version)
    for other in (v for v in (version - 1, version + 1) if 0 < v < 2**31):
        with pytest.raises(InvalidToken):
            crypto.unwrap_dek(kek, h(w["wrapped"]), other)
    with pytest.raises(InvalidToken):  # a wrapped DEK is not a plain value under the KEK
        crypto.decrypt(kek, h(w["wrapped"]))


@pytest.mark.parametrize("f", VECTORS["fingerprints"], ids=lambda f: f["fingerprint"])
def test_fingerprint_vectors(f: dict[str, str]) -> None:
    fp = crypto.kek_fingerprint(h(f["kek"]))
    assert fp == f["fingerprint"] and len(fp) == 16
    assert f["kek"] not in fp


@pytest.mark.parametrize("p", PARSE, ids=[p["name"] for p in PARSE])
def test_parse_kek_vectors(p: dict[str, str]) -> None:
    raw = h(p["input"])
    source = "Secret ns/app-kek key kek"
    if "kek" in p:
        assert crypto.parse_kek(raw, source) == h(p["kek"])
        return
    with pytest.raises(KekFormatError) as info:
        crypto.parse_kek(raw, source)
    message = str(info.value)
    assert p["error"] in message and source in message
    if len(raw) >= 8:  # short inputs could collide with digits of the message by chance
        for form in (raw, raw.strip(), raw.hex().encode(), base64.b64encode(raw)):
            assert form.decode("latin-1") not in message


def test_url_safe_vectors_really_use_the_url_safe_alphabet() -> None:
    """The URL-safe inputs decode only with ``-`` and ``_``: a reader that ignores the
    second alphabet fails them (and the standard twin uses ``+`` and ``/``)."""
    by_name = {p["name"]: h(p["input"]) for p in VECTORS["parse_kek"]}
    for name in ("base64-urlsafe", "base64-urlsafe-unpadded"):
        assert b"-" in by_name[name] and b"_" in by_name[name]
        assert b"+" not in by_name[name] and b"/" not in by_name[name]
    standard = by_name["base64-standard-plus-slash"]
    assert b"+" in standard and b"/" in standard
