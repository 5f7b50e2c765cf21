"""KEK rotation (issue #9) on a real PostgreSQL, as the operator's role: rewrap every DEK
under a new KEK, legacy rows first, fail closed without the previous KEK, survive kill -9;
and the same across sources: a Secret KEK to a PKCS#11 key in SoftHSM2, and back."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from rotation_operator.crypto import codec as crypto
from rotation_operator.crypto.kek import SecretKek
from rotation_operator.crypto.pkcs11 import Pkcs11Kek
from rotation_operator.errors import InvalidToken, KekMismatchError, LegacyNeedsRawKek
from rotation_operator.library import Encryptor
from rotation_operator.policy.config import StoreConfig, Target
from rotation_operator.policy.decisions import Request
from rotation_operator.rotation import inspection
from rotation_operator.rotation.engine import Engine
from rotation_operator.store.keystore import KeyStore
from tests.fixtures.fix_app import (
    ONLINE,
    App,
    audit_events,
    create_table,
    dump,
    fill,
    make_app,
    plaintext_for,
    read_rows,
    run_cli,
)
from tests.fixtures.fix_hsm import SoftHSM
from tests.fixtures.keks import keks
from tests.fixtures.roles import app_dsn

REKEY = Request("rekey")


def _independent_read(app: App, kek: bytes) -> dict[object, bytes]:
    """What a reader holding only ``kek`` gets: every DEK unwrapped with ``crypto`` alone,
    every row decrypted with the DEK it names (legacy rows with the KEK itself)."""
    with psycopg.connect(app.dsn) as conn:
        keys = KeyStore(app.cfg).list_keys(conn)
    deks = {k.version: crypto.unwrap_dek(kek, k.wrapped_dek, k.version) for k in keys}
    return {i: crypto.decrypt(kek if kid is None else deks[kid], v)
            for i, (v, kid) in read_rows(app.dsn, app.target).items()}


def _assert_opens_nothing(app: App, kek: bytes) -> None:
    with psycopg.connect(app.dsn) as conn:
        keys = KeyStore(app.cfg).list_keys(conn)
    for k in keys:
        with pytest.raises(InvalidToken):
            crypto.unwrap_dek(kek, k.wrapped_dek, k.version)
    assert all(kid is not None for _, kid in read_rows(app.dsn, app.target).values())


def test_rekey_rewraps_every_key_moves_legacy_rows_first_and_the_old_kek_opens_nothing(
        dsn: str) -> None:
    """With legacy reads kept open (spec.legacy.reads: Open), late legacy rows move onto a
    DEK before the KEK changes, as every legacy row did before legacy reads closed."""
    app = make_app(dsn, 400, legacy_every=4)  # 100 legacy rows under the old KEK itself
    Engine(dsn, app.cfg, keks(app.kek), actor="t", legacy_reads="open").rotate(2, ONLINE)
    app.expected[app.target].update(_write_legacy(app, range(5001, 5011)))  # legacy again
    old, new = app.kek, crypto.new_key()

    res = Engine(dsn, app.cfg, keks(new, old), actor="rekey").execute(REKEY, ONLINE)
    assert res.rekeyed == (1, 2) and res.to_version == 2
    assert _independent_read(app, new) == app.expected[app.target]
    _assert_opens_nothing(app, old)
    events = [e for e, _, _ in audit_events(dsn, app.cfg)]
    assert events[-4:] == ["rows_swept", "key_rewrapped", "key_rewrapped", "kek_rotated"]
    # idempotent; the new KEK alone is enough from now on, for the engine and the library
    again = Engine(dsn, app.cfg, keks(new, old), actor="rekey").execute(REKEY, ONLINE)
    assert again.rekeyed == () and not again.performed
    assert inspection.verify(dsn, app.cfg, keks(new)).ok
    with Encryptor(app_dsn(dsn), new) as enc:
        value, kid = enc.encrypt(b"app-secret-after-rekey")
        assert kid == 2 and enc.decrypt(value, kid) == b"app-secret-after-rekey"
    assert Engine(dsn, app.cfg, keks(new), actor="t").rotate(3, ONLINE).performed


def _write_legacy(app: App, ids: range) -> dict[object, bytes]:
    out: dict[object, bytes] = {}
    with psycopg.connect(app_dsn(app.dsn), autocommit=True) as conn:
        for i in ids:
            out[i] = pt = plaintext_for(i)
            conn.execute("INSERT INTO secrets VALUES (%s, %s, NULL)",
                         (i, crypto.encrypt(app.kek, pt)))
    return out


@pytest.mark.parametrize("previous", ["missing", "wrong"])
def test_a_missing_or_wrong_previous_kek_fails_closed(dsn: str, previous: str) -> None:
    app = make_app(dsn, 100)
    new, wrong = crypto.new_key(), crypto.new_key()
    before = dump(dsn)
    given = [] if previous == "missing" else [wrong]
    with pytest.raises(KekMismatchError, match=r"(none of the KEKs|the KEK) presented") as info:
        Engine(dsn, app.cfg, keks(new, *given), actor="rekey").execute(REKEY, ONLINE)
    message = str(info.value)
    assert crypto.kek_fingerprint(new) in message
    assert crypto.kek_fingerprint(app.kek) not in message  # never the stored one
    assert dump(dsn) == before
    # the previous KEK restored: it goes on
    res = Engine(dsn, app.cfg, keks(new, wrong, app.kek), actor="rekey").execute(
        REKEY, ONLINE)
    assert res.rekeyed == (1,)
    assert _independent_read(app, new) == app.expected[app.target]


@pytest.mark.parametrize("fault", ["rekey-after-legacy", "rekey-before-commit"])
def test_kill_9_during_a_rekey_then_rerun(dsn: str, tmp_path: object, fault: str) -> None:
    app = make_app(dsn, 600, legacy_every=3)
    new = crypto.new_key()
    files = {}
    for name, key in (("new", new), ("old", app.kek)):
        path = __import__("pathlib").Path(str(tmp_path)) / name
        path.write_text(key.hex())
        files[name] = path
    args = ("rekey", "--kek", f"file:{files['new']}", "--previous-kek", f"file:{files['old']}")
    proc = run_cli(*args, dsn=dsn, kek=None, fault=fault)
    assert proc.returncode == -9, proc.stderr
    # in between: one consistent state, every row readable with the KEKs presented
    assert inspection.verify(dsn, app.cfg, [SecretKek(new), SecretKek(app.kek)]).ok
    proc = run_cli(*args, dsn=dsn, kek=None)
    assert proc.returncode == 0 and "rewrapped DEK v1 under the KEK" in proc.stdout, proc.stderr
    assert _independent_read(app, new) == app.expected[app.target]
    _assert_opens_nothing(app, app.kek)
    proc = run_cli("verify", "--kek", f"file:{files['new']}", dsn=dsn, kek=None)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_kek_that_looks_like_text_is_warned_about(dsn: str, tmp_path: object) -> None:
    app = make_app(dsn, 10)
    weak = __import__("pathlib").Path(str(tmp_path)) / "weak"
    weak.write_bytes(b"correct-horse-battery-staple-123")  # 32 printable bytes
    proc = run_cli("rekey", "--kek", f"file:{weak}", "--previous-kek", "env:RO_TEST_KEK",
                   dsn=dsn, kek=app.kek)
    assert proc.returncode == 0, proc.stderr
    assert "passphrase-like key is weak" in proc.stderr and "openssl rand" in proc.stderr
    assert "correct-horse" not in proc.stderr + proc.stdout


# -- PKCS#11 (SoftHSM2) -------------------------------------------------------------------------
def _hsm_kek(softhsm: SoftHSM) -> tuple[Pkcs11Kek, str]:
    label = softhsm.generate_key(softhsm.new_label())
    return Pkcs11Kek(softhsm.module, softhsm.token_label, label, softhsm.pin), label


def test_secret_to_pkcs11_and_back(dsn: str, softhsm: SoftHSM) -> None:
    app = make_app(dsn, 300, legacy_every=5)
    hsm, label = _hsm_kek(softhsm)
    assert hsm.legacy_key() is None
    assert softhsm.inspect_key(label)["VALUE"].startswith("refused")  # never leaves the token

    res = Engine(dsn, app.cfg, keks(hsm, app.kek), actor="to-hsm").execute(REKEY, ONLINE)
    assert res.rekeyed == (1,)
    with psycopg.connect(dsn) as conn:
        assert {k.kek_fingerprint for k in KeyStore(app.cfg).list_keys(conn)} == {
            hsm.fingerprint}
    assert inspection.snapshot(dsn, app.cfg).legacy_count == 0  # moved before the switch
    _assert_opens_nothing(app, app.kek)
    # the HSM key alone now rotates, and reads and writes through the library
    assert Engine(dsn, app.cfg, keks(hsm), actor="hsm").rotate(2, ONLINE).performed
    assert inspection.verify(dsn, app.cfg, keks(hsm)).ok
    with Encryptor(app_dsn(dsn), hsm) as enc:
        ring = enc.ring
        got = {i: ring.decrypt(v, k) for i, (v, k) in read_rows(dsn, app.target).items()}
    assert got == app.expected[app.target]

    back = crypto.new_key()
    res = Engine(dsn, app.cfg, keks(back, hsm), actor="from-hsm").execute(REKEY, ONLINE)
    assert res.rekeyed == (1, 2)
    assert _independent_read(app, back) == app.expected[app.target]


def test_a_pkcs11_kek_refuses_to_start_while_legacy_rows_need_the_raw_kek(
        dsn: str, softhsm: SoftHSM) -> None:
    """A database of legacy rows (encrypted with a KEK from a Secret, before envelopes) and
    a policy that names only an HSM key: nothing can read those rows, so nothing starts."""
    create_table(dsn)
    kek = crypto.new_key()
    expected = fill(dsn, Target("secrets"), kek, 50, ring=None)
    cfg = StoreConfig([Target("secrets")])
    hsm, _ = _hsm_kek(softhsm)
    before = dump(dsn)
    for call in (lambda: Engine(dsn, cfg, keks(hsm), actor="hsm").initialise(1),
                 lambda: Engine(dsn, cfg, keks(hsm), actor="hsm").rotate(2, ONLINE)):
        with pytest.raises(LegacyNeedsRawKek) as info:
            call()
        assert info.value.reason == "LegacyRowsNeedRawKEK"
        assert "previousKeks" in str(info.value)
        assert hsm.describe() in str(info.value) and "PKCS#11" in str(info.value)
    assert dump(dsn) == before
    # With the Secret KEK as a previous one, the first rotation moves them and the HSM
    # key takes over.
    eng = Engine(dsn, cfg, keks(hsm, kek), actor="hsm")
    assert eng.rotate(2, ONLINE).performed
    with Encryptor(app_dsn(dsn), hsm) as enc:
        got = {i: enc.decrypt(v, k) for i, (v, k) in read_rows(dsn, Target("secrets")).items()}
    assert got == expected


def _after_the_switch_to_pkcs11_a_late_legacy_row(dsn: str, softhsm: SoftHSM
                                                 ) -> tuple[App, Pkcs11Kek, str, int]:
    """Rekeyed from a Secret KEK to a PKCS#11 key (legacy rows moved first, so legacy reads
    closed); then an application still on the old KEK writes a legacy row.  Returns (app,
    the HSM KEK, its CLI source, the late row's id)."""
    app = make_app(dsn, 100, legacy_every=5)
    hsm, label = _hsm_kek(softhsm)
    assert Engine(dsn, app.cfg, keks(hsm, app.kek), actor="to-hsm").execute(
        REKEY, ONLINE).rekeyed == (1,)
    app.expected[app.target].update(_write_legacy(app, range(7001, 7002)))
    source = (f"pkcs11:module={softhsm.module},token={softhsm.token_label},key={label},"
              "pin-env=RO_PIN")
    return app, hsm, source, 7001


def test_a_late_legacy_row_after_a_switch_to_pkcs11_moves_with_sweep_legacy_kek(
        dsn: str, softhsm: SoftHSM, tmp_path: object) -> None:
    """Finding 6: after a rekey to PKCS#11, a legacy row written late under the old KEK
    could be moved by no command, and verify with that KEK as a previous one called it
    FAIL.  Now verify names it as a late legacy row readable with that KEK, and
    ``sweep --legacy-kek file:...`` (docs/hsm.md) moves it onto the active key."""
    app, hsm, source, late = _after_the_switch_to_pkcs11_a_late_legacy_row(dsn, softhsm)
    raw = __import__("pathlib").Path(str(tmp_path)) / "raw"
    raw.write_text(app.kek.hex())
    env = {"RO_PIN": softhsm.pin}
    old = crypto.kek_fingerprint(app.kek)

    report = inspection.verify(dsn, app.cfg, keks(hsm, app.kek))
    assert report.failures == [] and report.legacy_readable == {old: 1}
    assert report.late_legacy == [{"table": "secrets", "id": str(late), "readableWith": old}]
    proc = run_cli("verify", "--kek", source, "--previous-kek", f"file:{raw}", dsn=dsn,
                   kek=None, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL " not in proc.stdout
    assert f"LATE LEGACY secrets id={late} (readable with the KEK {old})" in proc.stdout
    # Neither the HSM's sweep nor its library touches it.
    assert Engine(dsn, app.cfg, keks(hsm), actor="hsm").sweep(ONLINE).re_encrypted == 0
    assert read_rows(dsn, app.target)[late][1] is None

    proc = run_cli("sweep", "--kek", source, "--legacy-kek", f"file:{raw}", dsn=dsn,
                   kek=None, env=env)
    assert proc.returncode == 0 and "(1 legacy)" in proc.stdout, proc.stdout + proc.stderr
    assert read_rows(dsn, app.target)[late][1] == 1
    assert inspection.verify(dsn, app.cfg, keks(hsm)).ok
    with Encryptor(app_dsn(dsn), hsm) as enc:
        got = {i: enc.decrypt(v, k) for i, (v, k) in read_rows(dsn, app.target).items()}
    assert got == app.expected[app.target]
    swept = [d for e, _, d in audit_events(dsn, app.cfg) if e == "rows_swept"]
    assert swept[-1]["legacy_kek"] == old and swept[-1]["legacy_migrated"] == 1


def test_rekeying_back_from_pkcs11_is_not_refused_with_a_false_message(
        dsn: str, softhsm: SoftHSM, tmp_path: object) -> None:
    """Finding 6: rekeying back from the HSM to a file KEK while a late legacy row exists
    said the file KEK "does not let its bytes out".  It rekeys; the late row stays as it is
    (legacy reads are closed), and the file KEK then moves it as the legacy KEK."""
    app, _, source, late = _after_the_switch_to_pkcs11_a_late_legacy_row(dsn, softhsm)
    kept = read_rows(dsn, app.target)[late]
    files = {}
    for name, key in (("old", app.kek), ("back", crypto.new_key())):
        files[name] = path = __import__("pathlib").Path(str(tmp_path)) / name
        path.write_text(key.hex())
    env = {"RO_PIN": softhsm.pin}
    proc = run_cli("rekey", "--kek", f"file:{files['back']}", "--previous-kek", source,
                   dsn=dsn, kek=None, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "bytes out" not in proc.stderr + proc.stdout
    assert read_rows(dsn, app.target)[late] == kept
    proc = run_cli("sweep", "--kek", f"file:{files['back']}", "--legacy-kek",
                   f"file:{files['old']}", dsn=dsn, kek=None)
    assert proc.returncode == 0 and "(1 legacy)" in proc.stdout, proc.stdout + proc.stderr
    assert _independent_read(app, bytes.fromhex(files["back"].read_text())) == \
        app.expected[app.target]


def test_the_library_reads_and_writes_through_a_pkcs11_kek_during_a_rekey(
        dsn: str, softhsm: SoftHSM) -> None:
    """An application that was given both KEKs (the HSM key and the Secret it replaces)
    keeps reading and writing while the operator rewraps, and after."""
    app = make_app(dsn, 2000, legacy_every=0)
    hsm, _ = _hsm_kek(softhsm)
    errors: list[BaseException] = []
    written: dict[int, bytes] = {}
    stop = threading.Event()

    def application() -> None:
        try:
            with Encryptor(app_dsn(dsn), hsm, previous=[app.kek]) as enc, \
                    psycopg.connect(app_dsn(dsn), autocommit=True) as conn:
                i = 100_000
                while not stop.is_set():
                    pt = plaintext_for(i)
                    value, kid = enc.encrypt(pt)
                    conn.execute("INSERT INTO secrets VALUES (%s, %s, %s)", (i, value, kid))
                    written[i] = pt
                    row = conn.execute("SELECT value, key_id FROM secrets WHERE id = %s",
                                       (i - 50 if i > 100_050 else 1,)).fetchone()
                    assert row is not None
                    enc.decrypt(bytes(row[0]), row[1])
                    i += 1
        except BaseException as exc:
            errors.append(exc)

    writer = threading.Thread(target=application, daemon=True)
    writer.start()
    time.sleep(0.5)
    res = Engine(dsn, app.cfg, keks(hsm, app.kek), actor="to-hsm").execute(REKEY, ONLINE)
    time.sleep(0.5)
    Engine(dsn, app.cfg, keks(hsm), actor="hsm").rotate(2, ONLINE)  # and a rotation after it
    time.sleep(0.5)
    stop.set()
    writer.join(30)
    assert not errors, errors
    assert res.rekeyed == (1,) and len(written) > 20
    app.expected[app.target].update(written)
    with Encryptor(app_dsn(dsn), hsm) as enc:
        got = {i: enc.decrypt(v, k) for i, (v, k) in read_rows(dsn, app.target).items()}
    assert got == app.expected[app.target]


def test_hsm_problems_have_specific_reasons_and_leak_no_pin(dsn: str, softhsm: SoftHSM) -> None:
    app = make_app(dsn, 10)
    label = softhsm.generate_key(softhsm.new_label())
    env = {"RO_PIN": "not-the-pin-1234", "RO_GOOD_PIN": softhsm.pin}
    cases = [
        (f"pkcs11:module={softhsm.module},token={softhsm.token_label},key={label},"
         "pin-env=RO_PIN", "HSMLoginFailed"),
        (f"pkcs11:module={softhsm.module},token=no-such-token,key={label},pin-env=RO_GOOD_PIN",
         "HSMTokenMissing"),
        (f"pkcs11:module={softhsm.module},token={softhsm.token_label},key=no-such-key,"
         "pin-env=RO_GOOD_PIN", "HSMKeyMissing"),
        ("pkcs11:module=/nonexistent/lib.so,token=t,key=k,pin-env=RO_GOOD_PIN",
         "HSMModuleMissing"),
    ]
    for source, reason in cases:
        proc = run_cli("rekey", "--kek", source, dsn=dsn, kek=app.kek, env=env)
        assert proc.returncode == 2 and f"[{reason}]" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        for secret in (softhsm.pin, "not-the-pin-1234"):
            assert secret not in proc.stderr + proc.stdout
