"""Pkcs11Kek against SoftHSM2: the token does the GCM, the bytes are crypto.py's format.

Keys are created by the ``softhsm`` fixture's helpers (in a child process, so their
logins do not disturb ours); each test opens and closes its own :class:`Pkcs11Kek`, so a
test starts with no session on the token.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rotation_operator.crypto import codec as crypto
from rotation_operator.crypto.kek import SecretKek
from rotation_operator.crypto.keyring import KeyRing
from rotation_operator.crypto.pkcs11 import (
    HSMError,
    HSMKeyMissing,
    HSMKeyUnsuitable,
    HSMLoginFailed,
    HSMModuleMissing,
    HSMTokenMissing,
    Pkcs11Kek,
    cmac_fingerprint,
)
from rotation_operator.errors import InvalidToken, KekError, LegacyNeedsRawKek, UnknownKeyError
from rotation_operator.store.keystore import raise_legacy_needs_raw
from tests.fixtures.fix_hsm import SoftHSM

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).resolve().parents[1] / "vectors" / "format-v1.json").read_text())
VECTOR_KEK = bytes.fromhex(VECTORS["wraps"][0]["kek"])
assert all(bytes.fromhex(w["kek"]) == VECTOR_KEK for w in VECTORS["wraps"])

#: cmac_fingerprint(bytes(range(32))), pinned so a change of label or truncation is seen.
FINGERPRINT_OF_0_TO_31 = "cmac:5f384f6725d5b7ab"

OpenKek = Callable[..., Pkcs11Kek]


@pytest.fixture(scope="module")
def generated(softhsm: SoftHSM) -> str:
    """A key generated in the token: nobody ever knew its bytes."""
    return softhsm.generate_key(softhsm.new_label("generated"))


@pytest.fixture(scope="module")
def known_bytes() -> bytes:
    return os.urandom(32)


@pytest.fixture(scope="module")
def imported(softhsm: SoftHSM, known_bytes: bytes) -> str:
    """A non-extractable key whose bytes the test knows (``known_bytes``)."""
    return softhsm.import_key(softhsm.new_label("imported"), known_bytes)


@pytest.fixture(scope="module")
def vector_key(softhsm: SoftHSM) -> str:
    """The KEK of the format-v1 known-answer vectors, imported."""
    return softhsm.import_key(softhsm.new_label("vector"), VECTOR_KEK)


@pytest.fixture
def open_kek(softhsm: SoftHSM) -> Iterator[OpenKek]:
    """Open a Pkcs11Kek on the session token (defaults from ``softhsm``); closed after."""
    opened: list[Pkcs11Kek] = []

    def _open(key_label: str, **overrides: Any) -> Pkcs11Kek:
        args: dict[str, Any] = {"module": softhsm.module, "token_label": softhsm.token_label,
                                "key_label": key_label, "pin": softhsm.pin} | overrides
        kek = Pkcs11Kek(**args)
        opened.append(kek)
        return kek

    yield _open
    for kek in opened:
        kek.close()


def flips(value: bytes) -> list[bytes]:
    """``value`` with one bit flipped, once at every byte position."""
    return [value[:i] + bytes([value[i] ^ (1 << (i % 8))]) + value[i + 1:]
            for i in range(len(value))]


# --- round trip and format -----------------------------------------------------------


def test_round_trip(open_kek: OpenKek, generated: str) -> None:
    kek = open_kek(generated)
    dek = crypto.new_key()
    wrapped = kek.wrap(dek, 7)
    assert len(wrapped) == 63 and wrapped[:3] == b"RO\x01"
    assert kek.unwrap(wrapped, 7) == dek


def test_every_wrap_uses_a_fresh_nonce(open_kek: OpenKek, generated: str) -> None:
    kek = open_kek(generated)
    dek = crypto.new_key()
    nonces = {kek.wrap(dek, 1)[3:15] for _ in range(50)}
    assert len(nonces) == 50


def test_software_wrap_unwraps_in_the_hsm(open_kek: OpenKek, imported: str,
                                          known_bytes: bytes) -> None:
    kek = open_kek(imported)
    dek = crypto.new_key()
    assert kek.unwrap(crypto.wrap_dek(known_bytes, dek, 42), 42) == dek


def test_hsm_wrap_unwraps_in_software(open_kek: OpenKek, imported: str,
                                      known_bytes: bytes) -> None:
    kek = open_kek(imported)
    dek = crypto.new_key()
    assert crypto.unwrap_dek(known_bytes, kek.wrap(dek, 42), 42) == dek


@pytest.mark.parametrize("vector", VECTORS["wraps"], ids=lambda w: f"v{w['version']}")
def test_known_answer_vectors_unwrap_in_the_hsm(open_kek: OpenKek, vector_key: str,
                                                vector: dict[str, Any]) -> None:
    kek = open_kek(vector_key)
    assert kek.unwrap(bytes.fromhex(vector["wrapped"]), vector["version"]) == \
        bytes.fromhex(vector["dek"])


def test_unwrap_accepts_bytes_like(open_kek: OpenKek, generated: str) -> None:
    kek = open_kek(generated)
    dek = crypto.new_key()
    wrapped = kek.wrap(bytearray(dek), 3)  # type: ignore[arg-type]
    assert kek.unwrap(memoryview(wrapped), 3) == dek  # type: ignore[arg-type]
    assert kek.unwrap(bytearray(wrapped), 3) == dek  # type: ignore[arg-type]


# --- the key stays in the token --------------------------------------------------------


def test_generated_key_is_not_extractable(softhsm: SoftHSM, open_kek: OpenKek,
                                          generated: str) -> None:
    flags = softhsm.inspect_key(generated)
    assert flags["VALUE"] == "refused: AttributeSensitive"
    assert flags["SENSITIVE"] and flags["ALWAYS_SENSITIVE"]
    assert not flags["EXTRACTABLE"] and flags["NEVER_EXTRACTABLE"]
    kek = open_kek(generated)
    assert kek.legacy_key() is None
    assert kek.extractable is False


def test_imported_key_is_not_readable_either(softhsm: SoftHSM, imported: str) -> None:
    flags = softhsm.inspect_key(imported)
    assert flags["VALUE"] == "refused: AttributeSensitive"
    assert not flags["EXTRACTABLE"]


# --- fingerprint -----------------------------------------------------------------------


def test_software_fingerprint_is_pinned() -> None:
    assert cmac_fingerprint(bytes(range(32))) == FINGERPRINT_OF_0_TO_31
    with pytest.raises(ValueError):
        cmac_fingerprint(bytes(16))


def test_fingerprint_of_imported_key_equals_software(open_kek: OpenKek, imported: str,
                                                     known_bytes: bytes) -> None:
    kek = open_kek(imported)
    assert kek.fingerprint == cmac_fingerprint(known_bytes)


def test_fingerprint_of_pinned_key_in_the_hsm(softhsm: SoftHSM, open_kek: OpenKek) -> None:
    label = softhsm.import_key(softhsm.new_label("pinned"), bytes(range(32)))
    assert open_kek(label).fingerprint == FINGERPRINT_OF_0_TO_31


def test_fingerprint_is_stable_and_distinct(softhsm: SoftHSM, open_kek: OpenKek,
                                            generated: str, imported: str) -> None:
    first = open_kek(generated).fingerprint
    assert first.startswith("cmac:") and len(first) == len("cmac:") + 16
    int(first[5:], 16)
    assert open_kek(generated).fingerprint == first
    assert open_kek(imported).fingerprint != first


# --- unwrap failures are one opaque error ----------------------------------------------


def test_wrong_version_is_invalid_token(open_kek: OpenKek, generated: str) -> None:
    kek = open_kek(generated)
    wrapped = kek.wrap(crypto.new_key(), 5)
    for version in (4, 6, 2**31 - 1):
        with pytest.raises(InvalidToken):
            kek.unwrap(wrapped, version)


def test_tampering_anywhere_is_invalid_token(open_kek: OpenKek, generated: str) -> None:
    kek = open_kek(generated)
    wrapped = kek.wrap(crypto.new_key(), 5)
    for bad in flips(wrapped):
        with pytest.raises(InvalidToken):
            kek.unwrap(bad, 5)
    assert kek.unwrap(wrapped, 5)  # the session survives failed opens


@pytest.mark.parametrize("cut", [0, 1, 31, 62])
def test_wrong_length_is_invalid_token(open_kek: OpenKek, generated: str, cut: int) -> None:
    kek = open_kek(generated)
    wrapped = kek.wrap(crypto.new_key(), 5)
    with pytest.raises(InvalidToken):
        kek.unwrap(wrapped[:cut], 5)
    with pytest.raises(InvalidToken):
        kek.unwrap(wrapped + b"\x00", 5)


def test_value_of_other_length_is_invalid_token(open_kek: OpenKek, imported: str,
                                                known_bytes: bytes) -> None:
    """A well-formed value under the right key and AAD but with a 31-byte plaintext."""
    kek = open_kek(imported)
    short = crypto.encrypt(known_bytes, bytes(31), aad=crypto.dek_aad(5))
    with pytest.raises(InvalidToken):
        kek.unwrap(short, 5)


def test_other_key_is_invalid_token(open_kek: OpenKek, generated: str, imported: str) -> None:
    wrapped = open_kek(generated).wrap(crypto.new_key(), 5)
    with pytest.raises(InvalidToken):
        open_kek(imported).unwrap(wrapped, 5)


def test_invalid_token_says_nothing(open_kek: OpenKek, generated: str) -> None:
    kek = open_kek(generated)
    wrapped = kek.wrap(crypto.new_key(), 5)
    with pytest.raises(InvalidToken) as wrong_version:
        kek.unwrap(wrapped, 6)
    with pytest.raises(InvalidToken) as tampered:
        kek.unwrap(flips(wrapped)[40], 5)
    assert str(wrong_version.value) == str(tampered.value) == str(InvalidToken())
    for caught in (wrong_version, tampered):
        assert caught.value.__cause__ is None and caught.value.__context__ is None


def test_bad_arguments_are_refused_like_software(open_kek: OpenKek, generated: str) -> None:
    kek = open_kek(generated)
    with pytest.raises(ValueError):
        kek.wrap(bytes(31), 1)
    with pytest.raises(ValueError):
        kek.wrap(bytes(33), 1)
    with pytest.raises(TypeError):
        kek.wrap("x" * 32, 1)  # type: ignore[arg-type]
    wrapped = kek.wrap(crypto.new_key(), 1)
    for version in (0, -1, 2**31):
        with pytest.raises(ValueError):
            kek.wrap(crypto.new_key(), version)
        with pytest.raises(ValueError):
            kek.unwrap(wrapped, version)
    with pytest.raises(InvalidToken):
        kek.unwrap("not bytes", 1)  # type: ignore[arg-type]


# --- opening: each misconfiguration has its own reason ---------------------------------


def test_wrong_pin_is_login_failed_without_the_pin(open_kek: OpenKek, generated: str) -> None:
    wrong_pin = "wrong-" + "7" * 10
    with pytest.raises(HSMLoginFailed) as caught:
        open_kek(generated, pin=wrong_pin)
    # The token itself said no, or (when this process is already logged in to the token,
    # as in a full test session) the provider refused a PIN that is not the one in use.
    assert "PinIncorrect" in str(caught.value) or "PIN differs" in str(caught.value)
    for text in (str(caught.value), repr(caught.value)):
        assert wrong_pin not in text
    assert caught.value.reason == "HSMLoginFailed" and caught.value.retryable
    assert open_kek(generated).unwrap(open_kek(generated).wrap(crypto.new_key(), 1), 1)


def test_wrong_pin_is_refused_while_logged_in(softhsm: SoftHSM, open_kek: OpenKek,
                                              generated: str) -> None:
    """PKCS#11 would answer CKR_USER_ALREADY_LOGGED_IN, not check the PIN: we check it."""
    open_kek(generated)
    with pytest.raises(HSMLoginFailed) as caught:
        open_kek(generated, pin=softhsm.pin + "0")
    assert softhsm.pin not in str(caught.value) and softhsm.pin not in repr(caught.value)
    with pytest.raises(HSMLoginFailed):
        open_kek(generated, pin=b"\xff\xfe")


def test_pin_as_bytes(softhsm: SoftHSM, open_kek: OpenKek, generated: str) -> None:
    assert open_kek(generated, pin=softhsm.pin.encode()).fingerprint


def test_missing_token(open_kek: OpenKek, generated: str) -> None:
    with pytest.raises(HSMTokenMissing, match="no-such-token"):
        open_kek(generated, token_label="no-such-token")


def test_slot_description_selects(softhsm: SoftHSM, open_kek: OpenKek, generated: str) -> None:
    with pytest.raises(HSMTokenMissing, match="no such slot"):
        open_kek(generated, slot_description="no such slot")


def test_missing_key(open_kek: OpenKek) -> None:
    with pytest.raises(HSMKeyMissing, match="no-such-key"):
        open_kek("no-such-key")


def test_duplicate_key_label(softhsm: SoftHSM, open_kek: OpenKek) -> None:
    label = softhsm.new_label("twice")
    softhsm.generate_key(label)
    softhsm.generate_key(label)
    with pytest.raises(HSMKeyMissing, match="2 secret keys"):
        open_kek(label)


@pytest.mark.parametrize("module", ["/nonexistent/libnothing.so", "text-file"])
def test_missing_module(open_kek: OpenKek, generated: str, tmp_path: Path, module: str) -> None:
    if module == "text-file":
        module = str(tmp_path / "not-a-library.so")
        Path(module).write_text("not an ELF file\n")
    with pytest.raises(HSMModuleMissing) as caught:
        open_kek(generated, module=module)
    assert module in str(caught.value)


@pytest.mark.parametrize(("key_type", "length", "attrs", "why"), [
    ("AES", 16, {}, "128-bit AES"),
    ("AES", 24, {}, "192-bit AES"),
    ("GENERIC_SECRET", 32, {"ENCRYPT": False, "DECRYPT": False}, "not an AES key"),
    ("AES", 32, {"SIGN": False}, "CKA_SIGN"),
    ("AES", 32, {"ENCRYPT": False, "DECRYPT": False}, "CKA_ENCRYPT, CKA_DECRYPT"),
])
def test_unsuitable_key(softhsm: SoftHSM, open_kek: OpenKek, key_type: str, length: int,
                        attrs: dict[str, bool], why: str) -> None:
    label = softhsm.generate_key(softhsm.new_label("unsuitable"), key_type=key_type,
                                 length=length, overrides=attrs)
    with pytest.raises(HSMKeyUnsuitable, match=why):
        open_kek(label)


def test_error_classes() -> None:
    expected = {HSMModuleMissing: "HSMModuleMissing", HSMTokenMissing: "HSMTokenMissing",
                HSMLoginFailed: "HSMLoginFailed", HSMKeyMissing: "HSMKeyMissing",
                HSMKeyUnsuitable: "HSMKeyUnsuitable", HSMError: "HSMError"}
    for cls, reason in expected.items():
        assert issubclass(cls, KekError)
        assert cls.reason == reason and cls.retryable is True


def test_messages_name_the_configuration_not_the_pin(softhsm: SoftHSM, open_kek: OpenKek,
                                                     tmp_path: Path) -> None:
    with pytest.raises(HSMKeyMissing) as caught:
        open_kek("kek-absent")
    text = str(caught.value)
    assert softhsm.module in text and softhsm.token_label in text and "kek-absent" in text
    assert softhsm.pin not in text


# --- identity, sharing, lifetime --------------------------------------------------------


def test_describe_and_repr_hide_the_pin(softhsm: SoftHSM, open_kek: OpenKek,
                                        generated: str) -> None:
    kek = open_kek(generated)
    assert kek.describe() == f"pkcs11 token {softhsm.token_label!r} key {generated!r}"
    for text in (kek.describe(), repr(kek), str(kek), repr(vars(kek))):
        assert softhsm.pin not in text


def test_closing_one_handle_keeps_the_others_logged_in(open_kek: OpenKek, generated: str,
                                                       imported: str) -> None:
    """One C_Logout logs out every session of the process: the session is shared."""
    first, second = open_kek(generated), open_kek(imported)
    wrapped = second.wrap(crypto.new_key(), 1)
    first.close()
    first.close()  # idempotent
    assert second.unwrap(wrapped, 1)
    with pytest.raises(ValueError, match="closed"):
        first.wrap(crypto.new_key(), 1)
    assert "closed" in repr(first)


def test_reopen_after_close(open_kek: OpenKek, generated: str) -> None:
    kek = open_kek(generated)
    wrapped = kek.wrap(crypto.new_key(), 1)
    kek.close()
    assert open_kek(generated).unwrap(wrapped, 1)


def test_context_manager(softhsm: SoftHSM, generated: str) -> None:
    with Pkcs11Kek(softhsm.module, softhsm.token_label, generated, softhsm.pin) as kek:
        assert kek.unwrap(kek.wrap(crypto.new_key(), 1), 1)
    with pytest.raises(ValueError):
        kek.unwrap(b"", 1)


def test_threads_share_one_handle(open_kek: OpenKek, generated: str) -> None:
    kek = open_kek(generated)
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(version: int) -> None:
        try:
            start.wait()
            for _ in range(200):
                dek = crypto.new_key()
                if kek.unwrap(kek.wrap(dek, version), version) != dek:
                    raise AssertionError("round trip changed the DEK")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(v,)) for v in range(1, 9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []


# --- legacy rows: only a PKCS#11 key keeps its bytes ------------------------------------


def test_only_a_pkcs11_key_is_said_to_keep_its_bytes(open_kek: OpenKek, generated: str) -> None:
    """The message that refuses legacy rows names the key that cannot give its bytes, and
    says so only of a PKCS#11 key: a Secret, a file or a variable does let them out."""
    hsm = open_kek(generated)
    with pytest.raises(LegacyNeedsRawKek) as info:
        raise_legacy_needs_raw(hsm)
    assert hsm.describe() in str(info.value) and "PKCS#11" in str(info.value)
    raw = SecretKek(os.urandom(32), "file:raw")
    assert raw.extractable and raw.legacy_key() is not None
    with pytest.raises(LegacyNeedsRawKek) as info:
        raise_legacy_needs_raw(raw)
    assert "file:raw" in str(info.value)
    for false in ("does not let its bytes out", "keeps its bytes", "never lets"):
        assert false not in str(info.value)
    # A token key cannot be the legacy KEK of `sweep --legacy-kek`: refused up front.
    from rotation_operator.errors import ConfigError
    from rotation_operator.policy.config import StoreConfig, Target
    from rotation_operator.rotation.engine import Engine

    with pytest.raises(ConfigError, match="PKCS#11 key never lets its bytes out"):
        Engine("postgresql://unused", StoreConfig([Target("secrets")]), [raw], actor="t",
               legacy_kek=hsm)
    # A ring whose KEK is the token's reads no legacy row, and says why.
    ring = KeyRing.of(1, {1: crypto.new_key()}, hsm)
    assert not ring.reads_legacy
    with pytest.raises(UnknownKeyError, match="PKCS#11"):
        ring.decrypt(crypto.encrypt(os.urandom(32), b"legacy"), None)
