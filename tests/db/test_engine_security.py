"""Hostile names, the audit chain, and invariant 7 (no key material or plaintext in logs,
exceptions, reprs or CLI output), on a real PostgreSQL."""

from __future__ import annotations

import base64
import logging
import re
from typing import Any

import psycopg
import pytest

from rotation_operator.crypto import codec as crypto
from rotation_operator.errors import (
    AuditChainError,
    ConfigError,
    InvalidToken,
    KekMismatchError,
    RotationOperatorError,
    RowDecryptError,
)
from rotation_operator.library import Encryptor
from rotation_operator.policy.config import StoreConfig, Target
from rotation_operator.rotation import inspection
from rotation_operator.rotation.engine import Engine
from rotation_operator.store import audit
from rotation_operator.store.keystore import KeyStore
from tests.fixtures.fix_app import (
    ATOMIC,
    ONLINE,
    PLAINTEXT_PREFIX,
    App,
    audit_events,
    create_table,
    dump,
    grant_atomic,
    make_app,
    run_cli,
    verify_audit,
)
from tests.fixtures.keks import keks

# -- hostile identifiers -------------------------------------------------------------------
HOSTILE_SPECS: list[dict[str, Any]] = [
    {"table": "secrets; DROP TABLE canary"},
    {"table": "secrets", "idColumn": "id; DROP TABLE canary --"},
    {"table": "secrets", "valueColumn": 'value" FROM canary; DROP TABLE canary; --'},
    {"table": "secrets", "keyIdColumn": "key_id = 1; DROP TABLE canary"},
    {"table": "secrets", "schema": "public; DROP TABLE canary"},
    {"table": "secrëts"},
    {"table": "s" * 64},
]


def _canary(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TABLE canary (x int)")
        conn.execute("INSERT INTO canary VALUES (42)")


def _canary_alive(dsn: str) -> bool:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT x FROM canary").fetchall() == [(42,)]


@pytest.mark.parametrize("spec", HOSTILE_SPECS, ids=lambda s: repr(s)[:40])
def test_hostile_target_names_are_refused_before_any_sql(dsn: str, spec: dict[str, Any]
                                                          ) -> None:
    app = make_app(dsn, 50)
    _canary(dsn)
    before = dump(dsn)
    with pytest.raises(ConfigError) as info:
        Engine(dsn, StoreConfig([Target.from_spec(spec)]), keks(app.kek), actor="t").rotate(2)
    assert info.value.reason == "InvalidSpec"
    cli_target = spec["table"] if len(spec) == 1 else ":".join(
        [spec["table"], spec.get("idColumn", "id"), spec.get("valueColumn", "value"),
         spec.get("keyIdColumn", "key_id")])
    if "schema" in spec:
        cli_target = f"{spec['schema']}.{spec['table']}"
    proc = run_cli("rotate", "--target", cli_target, dsn=dsn, kek=app.kek)
    assert proc.returncode == 2 and "[InvalidSpec]" in proc.stderr, proc.stderr
    assert _canary_alive(dsn)
    assert dump(dsn) == before


@pytest.mark.parametrize("keys_table", ["keys; DROP TABLE canary", 'k"; DROP TABLE canary',
                                        "k" * 49])
def test_hostile_keys_table_is_refused(dsn: str, keys_table: str) -> None:
    create_table(dsn)
    _canary(dsn)
    with pytest.raises(ConfigError, match="keysTable"):
        StoreConfig([Target("secrets")], keys_table=keys_table)
    with pytest.raises(ConfigError, match="keys table"):
        Encryptor(dsn, crypto.new_key(), keys_table=keys_table)
    proc = run_cli("status", "--keys-table", keys_table, dsn=dsn, kek=None)
    assert proc.returncode == 2 and "keysTable" in proc.stderr
    assert _canary_alive(dsn)


def test_valid_names_that_need_quoting_cannot_inject(dsn: str) -> None:
    """Names that pass validation still only ever reach SQL quoted: a table literally
    called ``drop`` with a column ``table`` is just a table, the canary lives."""
    target = Target("drop", id_column="table", value_column="select", key_id_column="from")
    create_table(dsn, target)
    grant_atomic(dsn, target)
    _canary(dsn)
    cfg = StoreConfig([target], keys_table="DROP")
    kek = crypto.new_key()
    eng = Engine(dsn, cfg, keks(kek), actor="t")
    eng.initialise()
    from tests.fixtures.fix_app import decrypt_all, fill, load_ring

    expected = fill(dsn, target, kek, 300, ring=load_ring(dsn, cfg, kek))
    eng.rotate(2, ONLINE)
    eng.rotate(3, ATOMIC)
    assert decrypt_all(dsn, cfg, kek, target) == expected
    assert _canary_alive(dsn)
    assert inspection.verify(dsn, cfg, keks(kek)).ok


# -- audit chain ---------------------------------------------------------------------------
def _rotated_twice(dsn: str) -> App:
    app = make_app(dsn, 300, atomic=True)
    app.engine().rotate(2, ONLINE)
    app.engine().rotate(3, ATOMIC)
    return app


def test_audit_chain_records_every_event_and_verifies(dsn: str) -> None:
    app = _rotated_twice(dsn)
    events = audit_events(dsn, app.cfg)
    assert [(e, v) for e, v, _ in events] == [
        ("coverage_recorded", None), ("key_created", 1),
        ("key_created", 2), ("rotation_started", 2), ("key_retired", 1),
        ("rotation_finished", 2), ("legacy_migrated", None),
        ("key_created", 3), ("rotation_started", 3), ("key_retired", 2),
        ("rotation_finished", 3)]
    finished = [d for e, _, d in events if e == "rotation_finished"]
    assert finished == [
        {"policy_version": 2, "kind": "policy", "re_encrypted": 300, "legacy_migrated": 75,
         "retired": [1]},
        {"policy_version": 3, "kind": "policy", "re_encrypted": 300, "legacy_migrated": 0,
         "retired": [2]}]
    report = verify_audit(dsn, app.cfg)
    assert report.events == 11 and len(report.head) == 64

    proc = run_cli("verify", dsn=dsn, kek=app.kek)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rows: 300" in proc.stdout and "audit chain: 11 events, ok" in proc.stdout
    assert "verify: OK" in proc.stdout


@pytest.mark.parametrize("tamper, message", [
    ("UPDATE encryption_keys_audit SET detail = jsonb_set(detail, '{re_encrypted}', '1') "
     "WHERE event = 'rotation_finished' AND seq = 6", "audit row 6 (rotation_finished) was "
                                                       "altered"),
    ("UPDATE encryption_keys_audit SET actor = 'someone else' WHERE seq = 2",
     "audit row 2 (key_created) was altered"),
    ("UPDATE encryption_keys_audit SET at = at + interval '1 second' WHERE seq = 1",
     "audit row 1 (coverage_recorded) was altered"),
    ("DELETE FROM encryption_keys_audit WHERE seq = 4", "audit row 4 is missing"),
    ("DELETE FROM encryption_keys_audit WHERE seq = 1", "audit row 1 is missing"),
    ("UPDATE encryption_keys_audit SET seq = seq + 100 WHERE seq = 11",
     "audit row 11 is missing"),
], ids=["detail", "actor", "time", "delete-middle", "delete-first", "renumber-last"])
def test_tampered_audit_chain_fails_verify(dsn: str, tamper: str, message: str) -> None:
    app = _rotated_twice(dsn)
    with psycopg.connect(dsn) as conn:
        conn.execute(tamper)
    with pytest.raises(AuditChainError, match=re.escape(message)):
        verify_audit(dsn, app.cfg)
    report = inspection.verify(dsn, app.cfg, keks(app.kek))
    assert not report.ok and report.audit_error and message in report.audit_error
    assert report.rows == 300 and not report.failures  # the data itself is fine
    proc = run_cli("verify", dsn=dsn, kek=app.kek)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "BROKEN" in proc.stdout and "verify: FAILED" in proc.stdout
    proc = run_cli("verify", "-o", "json", dsn=dsn, kek=app.kek)
    assert proc.returncode == 1 and '"ok": false' in proc.stdout


def test_recomputed_forged_row_breaks_the_next_link(dsn: str) -> None:
    """A forger who rewrites one row *and* recomputes its hash still breaks the link to the
    next row (only rewriting the whole tail from there on hides an edit)."""
    app = _rotated_twice(dsn)
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT seq, at, event, key_version, actor, detail, prev_hash "
            "FROM encryption_keys_audit WHERE seq = 6").fetchone()
        assert row is not None
        seq, at, event, kv, actor, detail, prev = row
        detail["re_encrypted"] = 1
        forged = audit.record_hash(bytes(prev), seq, at, event, kv, actor, detail)
        conn.execute("UPDATE encryption_keys_audit SET detail = %s, hash = %s WHERE seq = 6",
                     (psycopg.types.json.Jsonb(detail), forged))
    with pytest.raises(AuditChainError, match="audit row 7 does not follow row 6"):
        verify_audit(dsn, app.cfg)


def test_verify_reports_rows_that_do_not_decrypt(dsn: str) -> None:
    app = make_app(dsn, 200)
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE secrets SET value = overlay(value placing '\\x00' from 40 for 1) "
                     "WHERE id IN (7, 8)")
    report = inspection.verify(dsn, app.cfg, keks(app.kek))
    assert not report.ok and sorted(f["id"] for f in report.failures) == ["7", "8"]
    proc = run_cli("verify", dsn=dsn, kek=app.kek)
    assert proc.returncode == 1 and "FAIL secrets id=7" in proc.stdout


# -- invariant 7: no key material or plaintext anywhere ------------------------------------
def _forms(secret: bytes) -> list[str]:
    b64 = base64.b64encode(secret).decode()
    url = base64.urlsafe_b64encode(secret).decode()
    return [secret.decode("latin-1"), secret.hex(), secret.hex().upper(), b64, url,
            b64.rstrip("="), url.rstrip("="), repr(secret)[2:-1]]


def _unwrapped_deks(app: App) -> list[bytes]:
    with psycopg.connect(app.dsn) as conn:
        keys = KeyStore(app.cfg).list_keys(conn)
    return [crypto.unwrap_dek(app.kek, k.wrapped_dek, k.version) for k in keys]


def test_no_key_or_plaintext_in_logs_errors_reprs_or_cli_output(
        dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    app = make_app(dsn, 400, atomic=True)
    wrong = crypto.new_key()
    eng = app.engine()
    texts += [repr(eng), str(eng)]

    def expect_error(fn: Any, kind: type[Exception]) -> None:
        with pytest.raises(kind) as info:
            fn()
        exc = info.value
        texts.extend([str(exc), repr(exc), repr(exc.args)])
        assert exc.__cause__ is None or not isinstance(exc, RotationOperatorError)

    # wrong KEK, everywhere it can be given
    expect_error(lambda: app.engine(wrong).initialise(), KekMismatchError)
    expect_error(lambda: app.engine(wrong).rotate(2, ONLINE), KekMismatchError)
    expect_error(lambda: inspection.verify(dsn, app.cfg, keks(wrong)), KekMismatchError)
    # a corrupted row (online and atomic), then the repaired rotation
    with psycopg.connect(dsn) as conn:
        original = conn.execute("SELECT value FROM secrets WHERE id = 150").fetchone()
        assert original is not None
        conn.execute("UPDATE secrets SET value = overlay(value placing '\\x00' from 35 for 1) "
                     "WHERE id = 150")
    expect_error(lambda: eng.rotate(2, ATOMIC), RowDecryptError)
    expect_error(lambda: eng.rotate(2, ONLINE), RowDecryptError)
    texts.append(repr(inspection.verify(dsn, app.cfg, keks(app.kek))))
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE secrets SET value = %s WHERE id = 150", (original[0],))
    texts.append(repr(eng.rotate(2, ONLINE)))
    texts.append(repr(eng.rotate(3, ATOMIC)))
    texts.append(repr(eng.initialise(policy_version=3)))
    # the library, the ring, the key store
    with Encryptor(dsn, app.kek, max_age=0) as enc:
        texts += [repr(enc), str(enc), repr(enc.ring), str(enc.ring)]
        value, kid = enc.encrypt(b"app-secret-library")
        assert enc.decrypt(value, kid) == b"app-secret-library"
        expect_error(lambda: enc.decrypt(value[:-1], kid), InvalidToken)
    with psycopg.connect(dsn) as conn:
        texts += [repr(KeyStore(app.cfg).list_keys(conn)),
                  repr(KeyStore(app.cfg).rotation_records(conn)),
                  repr(conn.execute("SELECT * FROM encryption_keys_audit").fetchall()),
                  repr(conn.execute("SELECT * FROM encryption_keys_rotations").fetchall())]
    texts.append(repr(inspection.snapshot(dsn, app.cfg)))
    # the CLI, verbose, failing and succeeding
    for args, kek, code in [
        (("rotate", "--policy-version", "4", "-v"), wrong, 2),
        (("init", "-v"), wrong, 2),
        (("verify", "-v"), wrong, 2),
        (("rotate", "--policy-version", "4", "-v", "-o", "json"), app.kek, 0),
        (("rotate", "--policy-version", "5", "--mode", "Atomic", "-v"), app.kek, 0),
        (("verify", "-v", "-o", "json"), app.kek, 0),
        (("verify", "-v"), app.kek, 0),
        (("status", "-v", "-o", "json"), None, 0),
        (("status", "-v"), None, 0),
    ]:
        proc = run_cli(*args, dsn=dsn, kek=kek)
        assert proc.returncode == code, (args, proc.stdout, proc.stderr)
        texts += [proc.stdout, proc.stderr]
    proc = run_cli("rotate", "--policy-version", "6", "-v", dsn=dsn, kek=app.kek,
                   kek_form="base64")
    assert proc.returncode == 0, proc.stderr
    texts += [proc.stdout, proc.stderr]
    texts += [r.getMessage() for r in caplog.records] + [caplog.text]

    haystack = "\n".join(texts)
    assert "KEKMismatch" in haystack and "row 150 of table secrets" in haystack  # sanity
    secrets_ = [app.kek, wrong, *_unwrapped_deks(app)]
    assert len(secrets_) == 2 + 6
    for secret in secrets_:
        for form in _forms(secret):
            assert form not in haystack, "key material leaked"
    plaintexts = [*app.expected[app.target].values(), b"app-secret-library"]
    for pt in plaintexts:
        assert pt.decode() not in haystack and pt.hex() not in haystack, "plaintext leaked"
    assert PLAINTEXT_PREFIX not in haystack


def test_truncating_the_tail_shows_only_in_the_head(dsn: str) -> None:
    """Documented limit of a hash chain: deleting the *last* rows leaves a valid, shorter
    chain.  It is caught only by comparing the head with one pinned elsewhere (status
    reports it), which is why verify prints it."""
    app = _rotated_twice(dsn)
    head = verify_audit(dsn, app.cfg).head
    with psycopg.connect(dsn) as conn:
        conn.execute("DELETE FROM encryption_keys_audit WHERE seq = 11")
    report = verify_audit(dsn, app.cfg)
    assert report.events == 10 and report.head != head
    proc = run_cli("verify", dsn=dsn, kek=app.kek)
    assert proc.returncode == 0 and f"head {head[:16]}" not in proc.stdout


def test_the_library_counts_values_it_cannot_decrypt(dsn: str) -> None:
    """What feeds RotationOperatorLibraryDecryptFailures: the application's own registry."""
    from prometheus_client import REGISTRY

    from rotation_operator.errors import InvalidToken as Opaque
    from rotation_operator.library import Encryptor

    app = make_app(dsn, 10)
    labels = {"keys_table": app.cfg.qualified_keys}

    def failures() -> float:
        return REGISTRY.get_sample_value(
            "rotation_operator_library_decrypt_failures_total", labels) or 0.0

    enc = Encryptor(dsn, app.kek)
    value, key_id = enc.encrypt(b"fine")
    before = failures()
    assert enc.decrypt(value, key_id) == b"fine"
    assert failures() == before
    tampered = value[:-1] + bytes([value[-1] ^ 1])
    with pytest.raises(Opaque):
        enc.decrypt(tampered, key_id)
    assert failures() == before + 1
    enc.close()
