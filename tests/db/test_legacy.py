"""The legacy path closes (issue #17, finding 4), on a real PostgreSQL with the documented
roles: once the first rotation has migrated every legacy row and recorded it, key rings (the
engine's, the CLI's and the application library's) refuse ``key_id NULL``, a sweep does
not move such a row, ``verify`` fails naming it, and the row keeps its bytes; unless the
policy keeps legacy reads open, with a warning.

The attacker is a database writer (the superuser's connection, or the application role
writing its own table) who kept an old KEK-direct ciphertext from before the migration and
puts it back with ``key_id NULL``: a rollback to be laundered into a fresh-looking row."""

from __future__ import annotations

import psycopg
import pytest

from rotation_operator.errors import LegacyReadsClosed, UnknownKeyError
from rotation_operator.library import Encryptor
from rotation_operator.operator import status
from rotation_operator.operator.conditions import DEGRADED, LEGACY_OPEN
from rotation_operator.policy.reasons import Reason
from rotation_operator.rotation import inspection
from rotation_operator.rotation.engine import Engine
from rotation_operator.store.keystore import KeyStore
from rotation_operator.store.legacy import Reads
from tests.fixtures.fix_app import (
    ONLINE,
    App,
    audit_events,
    create_table,
    fill,
    make_app,
    read_rows,
    run_cli,
)
from tests.fixtures.keks import keks
from tests.fixtures.roles import admin_dsn, app_dsn

VICTIM = 8  # a legacy row of make_app (every 4th row is one)


def _rotated_with_a_kept_ciphertext(dsn: str, legacy_reads: Reads | None = None
                                    ) -> tuple[App, bytes, bytes]:
    """100 rows, a quarter legacy; the attacker copies legacy row VICTIM's ciphertext;
    the first rotation migrates every legacy row.  Returns (app, kept ciphertext, what the
    row holds after the rotation)."""
    app = make_app(dsn, 100)
    kept, kid = read_rows(dsn, app.target)[VICTIM]
    assert kid is None
    Engine(dsn, app.cfg, keks(app.kek), actor="t", legacy_reads=legacy_reads).rotate(2, ONLINE)
    current, kid = read_rows(dsn, app.target)[VICTIM]
    assert kid == 2 and current != kept
    return app, kept, current


def _put_back(dsn: str, writer: str, value: bytes) -> None:
    """The rollback: the old KEK-direct ciphertext back, with key_id NULL."""
    target_dsn = admin_dsn(dsn) if writer == "superuser" else app_dsn(dsn)
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        conn.execute("UPDATE secrets SET value = %s, key_id = NULL WHERE id = %s",
                     (value, VICTIM))


@pytest.mark.parametrize("writer", ["superuser", "application"])
def test_a_legacy_replay_after_the_migration_is_refused_and_never_laundered(
        dsn: str, writer: str) -> None:
    app, kept, _ = _rotated_with_a_kept_ciphertext(dsn)
    with psycopg.connect(dsn) as conn:
        legacy = KeyStore(app.cfg).legacy_state(conn)
    assert legacy.migrated and legacy.closed
    assert [e for e, _, _ in audit_events(dsn, app.cfg)].count("legacy_migrated") == 1
    _put_back(dsn, writer, kept)

    # The library refuses it, with its specific error (an UnknownKeyError, as before).
    with Encryptor(app_dsn(dsn), app.kek) as enc:
        with pytest.raises(LegacyReadsClosed) as info:
            enc.decrypt(kept, None)
        assert isinstance(info.value, UnknownKeyError)
        assert info.value.reason == "LegacyReadsClosed"
        assert not enc.ring.reads_legacy

    # Neither a sweep nor a rotation moves it: the row keeps the attacker's bytes, NULL.
    sweep = app.engine().sweep(ONLINE)
    assert sweep.re_encrypted == 0
    assert read_rows(dsn, app.target)[VICTIM] == (kept, None)
    rotated = app.engine().rotate(3, ONLINE)
    assert rotated.performed and rotated.legacy_migrated == 0
    assert read_rows(dsn, app.target)[VICTIM] == (kept, None)
    assert all(k == 3 for i, (_, k) in read_rows(dsn, app.target).items() if i != VICTIM)

    # Reported by name: the snapshot (status), and verify fails naming it.
    snap = inspection.snapshot(dsn, app.cfg)
    assert snap.late_legacy == [("secrets", str(VICTIM))] and snap.retired_count == 0
    assert snap.summary()["legacy"]["lateRowIds"] == [{"table": "secrets", "id": str(VICTIM)}]
    changes = status.degraded(snap, [], clear_other=False)
    assert [(c.type, c.status, c.reason) for c in changes] == [
        (DEGRADED, True, Reason.LATE_LEGACY_ROWS)]
    assert f"secrets id {VICTIM}" in changes[0].message
    report = inspection.verify(dsn, app.cfg, keks(app.kek))
    assert not report.ok and report.late_legacy_count == 1
    assert report.late_legacy == [{"table": "secrets", "id": str(VICTIM),
                                   "readableWith": keks(app.kek)[0].fingerprint}]
    proc = run_cli("verify", dsn=dsn, kek=app.kek)
    assert proc.returncode == 1 and f"LATE LEGACY secrets id={VICTIM}" in proc.stdout, \
        proc.stdout + proc.stderr
    assert "verify: FAILED" in proc.stdout
    # What the attacker achieved: nothing reads the replay, and the row is still theirs
    # (no fresh-looking row under a DEK holds the old plaintext).
    assert read_rows(dsn, app.target)[VICTIM] == (kept, None)


def test_the_library_learns_that_legacy_reads_closed_without_a_new_key(dsn: str) -> None:
    """A ring loaded while legacy reads were open reads a legacy row; once they close it
    refuses the next one, though the active key did not change (no ring reload)."""
    app, kept, _ = _rotated_with_a_kept_ciphertext(dsn, legacy_reads="open")
    with Encryptor(app_dsn(dsn), app.kek, max_age=0.0) as enc:
        assert enc.decrypt(kept, None) == app.expected[app.target][VICTIM]
        Engine(dsn, app.cfg, keks(app.kek), actor="t", legacy_reads="closed").initialise()
        with pytest.raises(LegacyReadsClosed):
            enc.decrypt(kept, None)
        assert enc.ring.active_version == 2


def test_with_legacy_reads_open_the_old_behaviour_holds_with_a_warning(dsn: str) -> None:
    app, kept, _ = _rotated_with_a_kept_ciphertext(dsn, legacy_reads="open")
    _put_back(dsn, "superuser", kept)
    with Encryptor(app_dsn(dsn), app.kek) as enc:
        assert enc.decrypt(kept, None) == app.expected[app.target][VICTIM]
    snap = inspection.snapshot(dsn, app.cfg)
    assert snap.legacy.open_after_migration and snap.retired_count == 1
    warning = status.legacy_reads(snap, [])
    assert [(c.type, c.status, c.reason) for c in warning] == [
        (LEGACY_OPEN, True, Reason.LEGACY_KEPT_OPEN)]
    assert not inspection.verify(dsn, app.cfg, keks(app.kek)).ok
    res = app.engine().sweep(ONLINE)  # the recorded setting holds for every engine
    assert res.re_encrypted == 1 and res.legacy_migrated == 1
    assert read_rows(dsn, app.target)[VICTIM][1] == 2
    assert inspection.verify(dsn, app.cfg, keks(app.kek)).ok
    # Closing it again: the warning clears, and the next replay is refused.
    app2 = Engine(dsn, app.cfg, keks(app.kek), actor="t", legacy_reads="closed")
    app2.initialise()
    snap = inspection.snapshot(dsn, app.cfg)
    assert [(c.status, c.reason) for c in status.legacy_reads(snap, [])] == [
        (False, Reason.LEGACY_CLOSED)]
    _put_back(dsn, "superuser", kept)
    with Encryptor(app_dsn(dsn), app.kek) as enc, pytest.raises(LegacyReadsClosed):
        enc.decrypt(kept, None)
    events = [d for e, _, d in audit_events(dsn, app.cfg) if e == "legacy_reads_set"]
    assert [d["reads"] for d in events] == ["open", "closed"]


def test_the_cli_records_the_legacy_setting_and_status_shows_it(dsn: str) -> None:
    app = make_app(dsn, 20)
    proc = run_cli("rotate", "--legacy-reads", "open", dsn=dsn, kek=app.kek)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("status", dsn=dsn, kek=None)
    assert "reads kept OPEN" in proc.stdout, proc.stdout
    proc = run_cli("sweep", "--legacy-reads", "closed", dsn=dsn, kek=app.kek)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("status", dsn=dsn, kek=None)
    assert "reads CLOSED" in proc.stdout, proc.stdout


def test_a_keys_table_of_an_older_release_closes_legacy_reads_on_upgrade(dsn: str) -> None:
    """Tables from before the legacy record, whose first rotation finished then: the
    migration records the legacy rows as migrated (from the rotation records)."""
    app = make_app(dsn, 40)
    app.engine().rotate(2, ONLINE)
    with psycopg.connect(admin_dsn(dsn), autocommit=True) as conn:  # back to schema 3
        conn.execute("ALTER TABLE encryption_keys_meta DROP COLUMN legacy_migrated_at, "
                     "DROP COLUMN legacy_reads")
        conn.execute("UPDATE encryption_keys_meta SET schema_version = 3")
    with psycopg.connect(dsn) as conn:
        assert not KeyStore(app.cfg).legacy_state(conn).closed  # unrecorded: open
    app.engine().initialise()
    with psycopg.connect(dsn) as conn:
        state = KeyStore(app.cfg).legacy_state(conn)
    assert state.migrated and state.closed


def test_a_meta_table_that_outlived_its_keys_table_closes_nothing_for_a_new_one(
        dsn: str) -> None:
    """The keys, rotations and audit tables dropped by hand, the meta table left (found by
    the bench): initialising again migrates that meta table in place, and the legacy record
    is this keys table's own, not the old one's."""
    app = make_app(dsn, 40)
    app.engine().rotate(2, ONLINE)  # legacy rows migrated: the old meta says so
    with psycopg.connect(dsn) as conn:
        assert KeyStore(app.cfg).legacy_state(conn).migrated
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE encryption_keys, encryption_keys_rotations, "
                     "encryption_keys_audit")
    with psycopg.connect(app_dsn(dsn), autocommit=True) as conn:  # a fresh, all-legacy table
        conn.execute("DROP TABLE secrets")
    create_table(dsn, app.target)
    fill(dsn, app.target, app.kek, 10)
    app.engine().initialise()
    with psycopg.connect(dsn) as conn:
        assert not KeyStore(app.cfg).legacy_state(conn).migrated
    with Encryptor(app_dsn(dsn), app.kek, schema="public") as enc:
        value, key_id = read_rows(dsn, app.target)[3]
        assert key_id is None
        enc.decrypt(value, None)  # a legacy row reads: nothing closed it
