"""What the PKCS#11 KEK trusts (issue #17): only a key that cannot leave its token, and only
an authentication failure as a bad value.

* A token key that is not ``CKA_SENSITIVE``, or is ``CKA_EXTRACTABLE``, is refused at open
  (``HSMKeyUnsuitable``): through the library, the engine and the CLI, nothing is written.
* ``CKA_ALWAYS_SENSITIVE`` / ``CKA_NEVER_EXTRACTABLE`` are reported as the token says.
* A token that fails (``CKR_GENERAL_ERROR``, a device error) is retried, then ``HSMError``:
  never ``InvalidToken``, never "the keys table was altered", at ring load or in a rekey.
  Faults are injected through the provider's ``fault`` hook (:data:`FaultHook`), which
  runs before each token call and raises what a failing token would.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from pkcs11 import exceptions as p11

from rotation_operator.crypto import codec as crypto
from rotation_operator.crypto import sources
from rotation_operator.crypto.pkcs11 import (
    ATTEMPTS,
    HSMError,
    HSMKeyUnsuitable,
    Pkcs11Kek,
)
from rotation_operator.errors import InvalidToken
from rotation_operator.library import Encryptor
from rotation_operator.policy.decisions import Request
from rotation_operator.rotation.engine import Engine
from rotation_operator.store.keystore import KeyStore
from tests.fixtures.fix_app import ONLINE, App, dump, make_app, read_rows, run_cli
from tests.fixtures.fix_hsm import SoftHSM
from tests.fixtures.keks import keks
from tests.fixtures.roles import app_dsn

REKEY = Request("rekey")

#: (attribute overrides, what the refusal names)
EXPOSED = [
    ({"SENSITIVE": False}, ["CKA_SENSITIVE=false"]),
    ({"EXTRACTABLE": True}, ["CKA_EXTRACTABLE=true"]),
    ({"SENSITIVE": False, "EXTRACTABLE": True}, ["CKA_SENSITIVE=false", "CKA_EXTRACTABLE=true"]),
]


class Faults:
    """A fault hook: fails the next ``times`` calls of an operation with ``error`` (every
    call while ``times`` is None), and records every call it sees."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._plan: dict[str, tuple[type[p11.PKCS11Error], int | None]] = {}

    def fail(self, op: str, error: type[p11.PKCS11Error], times: int | None = None) -> None:
        self._plan[op] = (error, times)
        self.calls.clear()

    def heal(self) -> None:
        self._plan.clear()

    def __call__(self, op: str) -> None:
        self.calls.append(op)
        planned = self._plan.get(op)
        if planned is None:
            return
        error, times = planned
        if times is not None:
            if times <= 0:
                return
            self._plan[op] = (error, times - 1)
        raise error()


OpenKek = Callable[..., Pkcs11Kek]


@pytest.fixture
def open_kek(softhsm: SoftHSM) -> Iterator[OpenKek]:
    opened: list[Pkcs11Kek] = []

    def _open(label: str, **kwargs: Any) -> Pkcs11Kek:
        kek = Pkcs11Kek(softhsm.module, softhsm.token_label, label, softhsm.pin, **kwargs)
        opened.append(kek)
        return kek

    yield _open
    for kek in opened:
        kek.close()


@pytest.fixture(scope="module")
def good(softhsm: SoftHSM) -> str:
    return softhsm.generate_key(softhsm.new_label("good"))


def _source(softhsm: SoftHSM, label: str) -> str:
    return (f"pkcs11:module={softhsm.module},token={softhsm.token_label},key={label},"
            "pin-env=RO_PIN")


def _keys(dsn: str, app: App) -> list[tuple[int, str, bytes]]:
    with psycopg.connect(dsn) as conn:
        return [(k.version, k.kek_fingerprint, k.wrapped_dek)
                for k in KeyStore(app.cfg).list_keys(conn)]


# --- a key whose bytes can leave the token is refused ----------------------------------


@pytest.mark.parametrize(("attrs", "named"), EXPOSED, ids=["readable", "extractable", "both"])
def test_an_exposed_key_is_refused_saying_which_attribute_and_how_to_fix_it(
        softhsm: SoftHSM, open_kek: OpenKek, attrs: dict[str, bool], named: list[str]) -> None:
    label = softhsm.generate_key(softhsm.new_label("exposed"), overrides=attrs)
    flags = softhsm.inspect_key(label)
    assert all(flags[name] is value for name, value in attrs.items())  # as the attack made it
    with pytest.raises(HSMKeyUnsuitable) as caught:
        open_kek(label)
    text = str(caught.value)
    assert caught.value.reason == "HSMKeyUnsuitable" and caught.value.retryable
    for attribute in named:
        assert attribute in text
    assert "CKA_SENSITIVE=true and CKA_EXTRACTABLE=false" in text and label in text
    assert softhsm.pin not in text + repr(caught.value)
    assert caught.value.__cause__ is None


def test_the_attack_writes_nothing_through_the_engine_the_library_or_the_cli(
        dsn: str, softhsm: SoftHSM) -> None:
    """Someone swaps the HSM key for one that can be read out, and asks for a rekey to it."""
    app = make_app(dsn, 40)
    label = softhsm.generate_key(softhsm.new_label("exposed"), SENSITIVE=False,
                                 EXTRACTABLE=True)
    before = dump(dsn)
    with pytest.raises(HSMKeyUnsuitable):  # what the operator's workflow builds, then prepares
        Engine(dsn, app.cfg, keks(sources.pkcs11_kek(softhsm.module, softhsm.token_label,
                                                     label, softhsm.pin), app.kek),
               actor="attack").prepare()
    with pytest.raises(HSMKeyUnsuitable):
        Encryptor(app_dsn(dsn), Pkcs11Kek(softhsm.module, softhsm.token_label, label,
                                          softhsm.pin))
    proc = run_cli("rekey", "--kek", _source(softhsm, label), "--previous-kek",
                   "env:RO_TEST_KEK", dsn=dsn, kek=app.kek, env={"RO_PIN": softhsm.pin})
    assert proc.returncode == 2 and "[HSMKeyUnsuitable]" in proc.stderr, proc.stderr
    assert "CKA_SENSITIVE=false" in proc.stderr and "Traceback" not in proc.stderr
    assert softhsm.pin not in proc.stderr + proc.stdout
    assert dump(dsn) == before  # no DEK minted, no rewrap, no audit row


# --- the key's history is reported -----------------------------------------------------


def test_a_generated_key_reports_always_sensitive_and_never_extractable(
        softhsm: SoftHSM, open_kek: OpenKek, good: str) -> None:
    kek = open_kek(good)
    assert kek.always_sensitive is True and kek.never_extractable is True


def test_an_imported_key_reports_what_the_token_says(softhsm: SoftHSM,
                                                     open_kek: OpenKek) -> None:
    label = softhsm.import_key(softhsm.new_label("imported"), crypto.new_key())
    flags = softhsm.inspect_key(label)
    kek = open_kek(label)  # sensitive and not extractable now: accepted
    assert (kek.always_sensitive, kek.never_extractable) == (
        flags["ALWAYS_SENSITIVE"], flags["NEVER_EXTRACTABLE"]) == (False, False)


def test_the_cli_shows_the_key_history_after_a_rekey(dsn: str, softhsm: SoftHSM,
                                                      good: str) -> None:
    app = make_app(dsn, 20)
    proc = run_cli("rekey", "--kek", _source(softhsm, good), "--previous-kek",
                   "env:RO_TEST_KEK", "-o", "json", dsn=dsn, kek=app.kek,
                   env={"RO_PIN": softhsm.pin})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["rewrapped"] == [1]
    assert (out["kekAlwaysSensitive"], out["kekNeverExtractable"]) == (True, True)
    proc = run_cli("rekey", "--kek", _source(softhsm, good), dsn=dsn, kek=None,
                   env={"RO_PIN": softhsm.pin})
    assert proc.returncode == 0, proc.stderr
    assert "always sensitive and never extractable" in proc.stdout
    back = run_cli("rekey", "--previous-kek", _source(softhsm, good), "-o", "json", dsn=dsn,
                   kek=crypto.new_key(), env={"RO_PIN": softhsm.pin})  # to a Secret KEK
    assert back.returncode == 0, back.stderr
    assert json.loads(back.stdout)["rewrapped"] == [1] and "kekAlwaysSensitive" not in back.stdout


# --- a failing token is not a bad value ------------------------------------------------


def test_a_transient_general_error_is_retried(open_kek: OpenKek, good: str) -> None:
    faults = Faults()
    kek = open_kek(good, fault=faults)
    dek = crypto.new_key()
    wrapped = kek.wrap(dek, 4)
    faults.fail("decrypt", p11.GeneralError, times=1)
    assert kek.unwrap(wrapped, 4) == dek
    assert faults.calls.count("decrypt") >= 2  # failed once, then asked again
    faults.fail("encrypt", p11.GeneralError, times=1)
    again = kek.wrap(dek, 4)
    assert faults.calls.count("encrypt") >= 2 and kek.unwrap(again, 4) == dek


@pytest.mark.parametrize("error", [p11.GeneralError, p11.FunctionFailed, p11.DeviceError,
                                   p11.DeviceRemoved, p11.SessionHandleInvalid])
def test_a_persistent_token_error_is_hsm_error_not_invalid_token(
        softhsm: SoftHSM, open_kek: OpenKek, good: str, error: type[p11.PKCS11Error]) -> None:
    faults = Faults()
    kek = open_kek(good, fault=faults)
    dek = crypto.new_key()
    wrapped = kek.wrap(dek, 4)
    faults.fail("decrypt", error)
    with pytest.raises(HSMError) as caught:
        kek.unwrap(wrapped, 4)
    assert error.__name__ in str(caught.value) and good in str(caught.value)
    assert caught.value.retryable and caught.value.__cause__ is None
    assert softhsm.pin not in str(caught.value)
    tries = faults.calls.count("decrypt")
    assert ATTEMPTS <= tries <= 3 * ATTEMPTS  # retried, and bounded
    faults.fail("encrypt", error)
    with pytest.raises(HSMError):
        kek.wrap(dek, 4)
    assert faults.calls.count("encrypt") == ATTEMPTS
    faults.heal()
    assert kek.unwrap(wrapped, 4) == dek  # the same value opens once the token is back


def test_a_forged_value_is_still_invalid_token_at_once(open_kek: OpenKek, good: str) -> None:
    faults = Faults()
    kek = open_kek(good, fault=faults)
    wrapped = kek.wrap(crypto.new_key(), 4)
    forged = wrapped[:-1] + bytes([wrapped[-1] ^ 1])
    faults.calls.clear()
    with pytest.raises(InvalidToken):  # SoftHSM2 says CKR_GENERAL_ERROR for it, too
        kek.unwrap(forged, 4)
    assert faults.calls.count("decrypt") <= 3  # the value, the health check, the value again
    faults.fail("decrypt", p11.EncryptedDataInvalid)  # a token that says what it means
    with pytest.raises(InvalidToken):
        kek.unwrap(wrapped, 4)
    assert faults.calls == ["decrypt"]  # not retried: the value is wrong, not the token


def test_a_failing_token_at_ring_load_is_hsm_error_not_an_altered_table(
        dsn: str, softhsm: SoftHSM, open_kek: OpenKek, good: str) -> None:
    app = make_app(dsn, 60, legacy_every=0)  # no legacy rows to move before the rewrap
    hsm = open_kek(good)
    assert Engine(dsn, app.cfg, keks(hsm, app.kek), actor="to-hsm").execute(
        REKEY, ONLINE).rekeyed == (1,)
    faults = Faults()
    faulty = open_kek(good, fault=faults)
    before, stored = dump(dsn), _keys(dsn, app)

    faults.fail("decrypt", p11.GeneralError)
    with pytest.raises(HSMError) as caught:
        Engine(dsn, app.cfg, keks(faulty), actor="hsm").prepare()
    assert "altered" not in str(caught.value) and caught.value.reason == "HSMError"
    with Encryptor(app_dsn(dsn), faulty) as enc, pytest.raises(HSMError) as in_library:
        enc.refresh()  # the application's ring load
    assert "altered" not in str(in_library.value)
    assert dump(dsn) == before and _keys(dsn, app) == stored

    faults.fail("decrypt", p11.GeneralError, times=1)  # a blip: the ring loads
    with Encryptor(app_dsn(dsn), faulty) as enc:
        got = {i: enc.decrypt(v, k) for i, (v, k) in read_rows(dsn, app.target).items()}
    assert got == app.expected[app.target]


def test_a_failing_token_during_a_rewrap_is_hsm_error_and_writes_nothing(
        dsn: str, softhsm: SoftHSM, open_kek: OpenKek, good: str) -> None:
    """The rekey to the HSM wraps each DEK in the token and opens it again before writing:
    the open fails (a device fault, not the value)."""
    app = make_app(dsn, 60, legacy_every=0)  # no legacy rows to move before the rewrap
    faults = Faults()
    faulty = open_kek(good, fault=faults)
    before, stored = dump(dsn), _keys(dsn, app)
    faults.fail("decrypt", p11.GeneralError)
    with pytest.raises(HSMError) as caught:
        Engine(dsn, app.cfg, keks(faulty, app.kek), actor="to-hsm").execute(REKEY, ONLINE)
    assert caught.value.retryable and "GeneralError" in str(caught.value)
    assert _keys(dsn, app) == stored and dump(dsn) == before

    faults.fail("decrypt", p11.GeneralError, times=1)
    res = Engine(dsn, app.cfg, keks(faulty, app.kek), actor="to-hsm").execute(REKEY, ONLINE)
    assert res.rekeyed == (1,)
    assert {fp for _, fp, _ in _keys(dsn, app)} == {faulty.fingerprint}
