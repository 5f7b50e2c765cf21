"""KEK rotation through the EncryptionPolicy (issue #9), on the real apiserver, with the
operator as its service-account identity and as a non-superuser database role; and a KEK
that never leaves a PKCS#11 token (SoftHSM2)."""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import psycopg

from rotation_operator.crypto import codec as crypto
from rotation_operator.crypto.pkcs11 import Pkcs11Kek
from rotation_operator.errors import InvalidToken
from rotation_operator.library import Encryptor
from rotation_operator.store.keystore import KeyStore
from tests.fixtures import roles
from tests.fixtures.fix_hsm import SoftHSM
from tests.fixtures.fix_operator import KEK_SECRET, App, MakeApp, OperatorProcess, StartOperator


def _independent_read(app: App, kek: bytes) -> dict[int, bytes]:
    """A reader holding only ``kek`` (``crypto`` alone, no project code beyond it)."""
    with psycopg.connect(app.dsn) as conn:
        keys = KeyStore(app.store_config).list_keys(conn)
    deks = {k.version: crypto.unwrap_dek(kek, k.wrapped_dek, k.version) for k in keys}
    return {i: crypto.decrypt(kek if kid is None else deks[kid], v)
            for i, (kid, v) in app.rows().items()}


def _opens_nothing(app: App, kek: bytes) -> bool:
    for k in app.key_rows():
        try:
            crypto.unwrap_dek(kek, k["wrapped_dek"], k["version"])
            return False
        except InvalidToken:
            pass
    return all(kid is not None for kid, _ in app.rows().values())


def _forms(secret: bytes) -> list[str]:
    return [secret.hex(), base64.b64encode(secret).decode(), base64.b64encode(secret).decode()[:20]]


def _assert_no_leak(app: App, op: OperatorProcess, *secrets_: bytes | str) -> None:
    events = json.dumps(app.events())
    status = json.dumps(app.get())
    log = op.log()
    for secret in secrets_:
        forms = [secret] if isinstance(secret, str) else _forms(secret)
        for form in forms:
            assert form not in log and form not in events and form not in status, "leak"


def _rekey_to(app: App, secret: str, *, previous: list[dict[str, Any]] | None) -> None:
    spec: dict[str, Any] = {"kek": {"secretRef": {"name": secret, "key": "kek"}}}
    spec["previousKeks"] = previous
    app.patch_spec(spec)


def test_rekey_through_the_policy(namespace: str, dsn: str, make_app: MakeApp,
                                  start_operator: StartOperator) -> None:
    app = make_app(namespace, dsn, rows=300, legacy=60)
    op = start_operator([namespace])
    app.wait_condition("Ready", "True")
    # legacy reads kept open: a legacy row written late is read and moved (docs/format.md §8)
    app.patch_spec({"version": 2, "legacy": {"reads": "Open"}})
    app.wait_condition("Ready", "True", "RotationSucceeded")
    app.wait_condition("LegacyReadsOpen", "True", "LegacyKeptOpen")
    app.plaintexts[9001] = b"legacy-after-rotation"  # a legacy row written late, under A
    with psycopg.connect(roles.app_dsn(dsn), autocommit=True) as conn:
        conn.execute("INSERT INTO secrets VALUES (9001, %s, NULL)",
                     (crypto.encrypt(app.kek, b"legacy-after-rotation"),))
    old, new = app.kek, os.urandom(32)
    app.set_secret("app-kek-2", "kek", base64.b64encode(new).decode())
    _rekey_to(app, "app-kek-2", previous=[{"secretRef": {"name": KEK_SECRET, "key": "kek"}}])

    obj = app.wait_condition("Ready", "True", "KEKRotated", timeout=60)
    kek = obj["status"]["kek"]
    assert kek == {"fingerprint": crypto.kek_fingerprint(new),
                   "source": f"Secret {namespace}/app-kek-2 key kek",
                   "previousKeksNeeded": False}
    assert {k["kek"] for k in obj["status"]["keys"]} == {crypto.kek_fingerprint(new)}
    app.wait_event("KEKRotated", "Normal")
    assert _independent_read(app, new) == app.plaintexts  # the new KEK alone reads it all
    assert _opens_nothing(app, old)  # the old one unwraps nothing, no legacy row is left
    assert obj["status"]["legacyCount"] == 0
    # the previous KEK can go; rotations go on under the new one
    app.patch_spec({"previousKeks": None, "version": 3})
    app.wait_condition("Ready", "True", "RotationSucceeded")
    assert _independent_read(app, new) == app.plaintexts
    _assert_no_leak(app, op, old, new, *app.plaintexts.values())


def test_a_previous_kek_removed_too_early_or_wrong_fails_closed(
        namespace: str, dsn: str, make_app: MakeApp, start_operator: StartOperator) -> None:
    app = make_app(namespace, dsn, rows=80, legacy=10)
    op = start_operator([namespace])
    app.wait_condition("Ready", "True")
    before = app.db_state()
    new, wrong = os.urandom(32), os.urandom(32)
    app.set_secret("app-kek-2", "kek", new.hex())
    app.set_secret("app-kek-wrong", "kek", wrong.hex())

    _rekey_to(app, "app-kek-2", previous=None)  # removed too early
    obj = app.wait_condition("Ready", "False", "KEKMismatch")
    message = app.cond("Ready", obj)["message"]
    assert crypto.kek_fingerprint(new) in message
    assert crypto.kek_fingerprint(app.kek) not in message  # never the one that is needed
    assert app.db_state() == before

    _rekey_to(app, "app-kek-2", previous=[{"secretRef": {"name": "app-kek-wrong"}}])  # wrong
    obj = app.wait_condition("Ready", "False", "KEKMismatch")
    message = app.cond("Ready", obj)["message"]
    assert "none of the KEKs presented" in message
    assert crypto.kek_fingerprint(wrong) in message and crypto.kek_fingerprint(new) in message
    assert crypto.kek_fingerprint(app.kek) not in message
    assert app.db_state() == before

    _rekey_to(app, "app-kek-2", previous=[{"secretRef": {"name": KEK_SECRET}}])  # restored
    app.wait_condition("Ready", "True", "KEKRotated", timeout=60)
    assert _independent_read(app, new) == app.plaintexts
    _assert_no_leak(app, op, app.kek, new, wrong)


def test_secret_to_pkcs11_and_back_through_the_policy(
        namespace: str, dsn: str, make_app: MakeApp, start_operator: StartOperator,
        softhsm: SoftHSM) -> None:
    app = make_app(namespace, dsn, rows=120, legacy=30)
    op = start_operator([namespace])  # inherits SOFTHSM2_CONF: the session's token
    app.wait_condition("Ready", "True")
    label = softhsm.generate_key(softhsm.new_label())
    app.set_secret("hsm-pin", "pin", "0000-not-the-pin")
    hsm_spec = {"pkcs11": {"module": softhsm.module, "tokenLabel": softhsm.token_label,
                           "keyLabel": label, "pinSecretRef": {"name": "hsm-pin"}}}
    # A merge patch must drop the other source explicitly (CEL: exactly one source).
    app.patch_spec({"kek": {"secretRef": None, **hsm_spec},
                    "previousKeks": [{"secretRef": {"name": KEK_SECRET}}]})
    obj = app.wait_condition("Ready", "False", "HSMLoginFailed")  # a wrong PIN first
    assert "0000-not-the-pin" not in json.dumps(obj)

    app.set_secret("hsm-pin", "pin", softhsm.pin)
    app.patch_spec({"version": 2})  # the compromise response: rekey and rotate together
    obj = app.wait_condition("Ready", "True", "RotationSucceeded", timeout=90)
    with Pkcs11Kek(softhsm.module, softhsm.token_label, label, softhsm.pin) as hsm:
        assert obj["status"]["kek"]["fingerprint"] == hsm.fingerprint
        assert (obj["status"]["kek"]["alwaysSensitive"],
                obj["status"]["kek"]["neverExtractable"]) == (True, True)  # a generated key
        assert {k["kek"] for k in obj["status"]["keys"]} == {hsm.fingerprint}
        assert _opens_nothing(app, app.kek)
        with Encryptor(roles.app_dsn(dsn), hsm) as enc:  # the library through the HSM
            got = {i: enc.decrypt(v, kid) for i, (kid, v) in app.rows().items()}
    assert got == app.plaintexts
    assert [k["version"] for k in app.key_rows() if k["state"] == "active"] == [2]

    back = os.urandom(32)
    app.set_secret("app-kek-3", "kek", back.hex())
    app.patch_spec({"kek": {"secretRef": {"name": "app-kek-3"}, "pkcs11": None},
                    "previousKeks": [hsm_spec]})
    obj = app.wait_condition("Ready", "True", "KEKRotated", timeout=60)
    assert not {"alwaysSensitive", "neverExtractable"} & set(obj["status"]["kek"])
    assert _independent_read(app, back) == app.plaintexts
    _assert_no_leak(app, op, app.kek, back, softhsm.pin)
