"""The guarantees as production databases need them (issue #8), on a real PostgreSQL, with
the operator and the application as non-superuser roles (``tests/fixtures/roles.py``):
partitioned and inherited tables, the library at its defaults with transactions that stay
open, the Atomic lock, a lost lock session, a keys table shared by two policies, triggers
and row-level security, pause, large values.  The superuser appears only where a test says
why."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import psycopg
import pytest
from psycopg import sql

from rotation_operator.crypto import codec as crypto
from rotation_operator.errors import (
    DatabaseRejected,
    KeysTableShared,
    LockLost,
    LockTimeout,
    RotationOperatorError,
    RotationPaused,
    RotationStuck,
    RowSecurityError,
    StatementTimeout,
    Superseded,
    TriggerInterference,
)
from rotation_operator.library import Encryptor
from rotation_operator.policy.config import RotationOptions, StoreConfig, Target
from rotation_operator.rotation import inspection
from rotation_operator.rotation.engine import Engine
from tests.fixtures.fix_app import (
    ATOMIC,
    DSN_ENV,
    KEK_ENV,
    Gate,
    assert_rotated,
    create_table,
    dump,
    fill,
    in_thread,
    keys,
    load_ring,
    make_app,
    plaintext_for,
    read_rows,
    run_cli,
)
from tests.fixtures.fix_faults import FaultHook
from tests.fixtures.keks import keks
from tests.fixtures.roles import OPERATOR_ROLE, admin_dsn, app_dsn, grant_target

#: The library's and the engine's defaults: what an application gets out of the box.
DEFAULTS = RotationOptions(batch_size=100, vacuum=False)


def _as_app(dsn: str, *statements: str) -> None:
    with psycopg.connect(app_dsn(dsn), autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def _grant(dsn: str, *tables: str, atomic: bool = False) -> None:
    with psycopg.connect(app_dsn(dsn), autocommit=True) as conn:
        for table in tables:
            grant_target(conn, sql.Identifier(table))
            if atomic:
                conn.execute(sql.SQL("GRANT UPDATE ON {} TO {}").format(
                    sql.Identifier(table), sql.Identifier(OPERATOR_ROLE)))


def _write_through_library(dsn: str, kek: bytes, ids: range, table: str = "secrets",
                           legacy_every: int = 5) -> dict[int, bytes]:
    """Rows written as the application writes them (the library, its defaults); every
    ``legacy_every``-th one a legacy row under the KEK."""
    expected = {}
    with Encryptor(app_dsn(dsn), kek) as enc, psycopg.connect(app_dsn(dsn)) as conn:
        for i in ids:
            expected[i] = pt = plaintext_for(i)
            if legacy_every and i % legacy_every == 0:
                value, kid = crypto.encrypt(kek, pt), None
            else:
                value, kid = enc.encrypt(pt)
            conn.execute(sql.SQL("INSERT INTO {} (id, value, key_id) VALUES (%s, %s, %s)"
                                 ).format(sql.Identifier(table)), (i, value, kid))
        conn.commit()
    return expected


def _read_plain(dsn: str, kek: bytes, table: str = "secrets") -> dict[int, bytes]:
    cfg = StoreConfig([Target(table)])
    ring = load_ring(dsn, cfg, kek)
    return {i: ring.decrypt(v, k) for i, (v, k) in read_rows(dsn, Target(table)).items()}


def _verify_cli(dsn: str, kek: bytes) -> subprocess.CompletedProcess[str]:
    return run_cli("verify", dsn=dsn, kek=kek)


# -- every kind of table (finding 1) ---------------------------------------------------------
@pytest.mark.parametrize("options", [DEFAULTS, ATOMIC], ids=["online", "atomic"])
def test_partitioned_table_is_rotated_partition_by_partition(dsn: str,
                                                             options: RotationOptions) -> None:
    _as_app(dsn, "CREATE TABLE secrets (id bigint PRIMARY KEY, value bytea NOT NULL, key_id int)"
                 " PARTITION BY RANGE (id)",
            "CREATE TABLE secrets_low PARTITION OF secrets FOR VALUES FROM (MINVALUE) TO (800)",
            "CREATE TABLE secrets_high PARTITION OF secrets FOR VALUES FROM (800) TO (MAXVALUE)")
    _grant(dsn, "secrets", "secrets_low", "secrets_high", atomic=options.mode == "Atomic")
    kek = crypto.new_key()
    cfg = StoreConfig([Target("secrets")])
    Engine(dsn, cfg, keks(kek), actor="test").initialise()
    _write_through_library(dsn, kek, range(1, 1501))
    expected = _read_plain(dsn, kek)
    assert len(expected) == 1500

    res = Engine(dsn, cfg, keks(kek), actor="test").rotate(2, options)
    assert res.performed and res.re_encrypted == 1500 and res.legacy_migrated == 300
    assert_rotated(dsn, cfg, kek, {Target("secrets"): expected})
    assert {k for _, k in read_rows(dsn, Target("secrets")).values()} == {2}
    assert keys(dsn, cfg) == [(1, "retired", None), (2, "active", 2)]
    snap = inspection.snapshot(dsn, cfg)
    assert snap.targets[0].kind == "partitioned" and snap.stale_count == 0
    proc = _verify_cli(dsn, kek)
    assert proc.returncode == 0 and "verify: OK" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("options", [DEFAULTS, ATOMIC], ids=["online", "atomic"])
def test_inheritance_children_are_rotated_and_no_row_takes_another_value(
        dsn: str, options: RotationOptions) -> None:
    """Parent and children each have a row at ctid (0,1), (0,2)...: without ONLY, an UPDATE
    of the parent matches the children's rows with the same ctid and xmin."""
    _as_app(dsn, "CREATE TABLE secrets (id bigint PRIMARY KEY, value bytea NOT NULL, key_id int)",
            "CREATE TABLE secrets_archive () INHERITS (secrets)",
            "CREATE TABLE secrets_extra (note text) INHERITS (secrets)")
    _grant(dsn, "secrets", "secrets_archive", "secrets_extra", atomic=options.mode == "Atomic")
    kek = crypto.new_key()
    cfg = StoreConfig([Target("secrets")])
    Engine(dsn, cfg, keks(kek), actor="test").initialise()
    for table, ids in (("secrets", range(1, 301)), ("secrets_archive", range(1001, 1301)),
                       ("secrets_extra", range(2001, 2301))):
        _write_through_library(dsn, kek, ids, table=table)
    expected = _read_plain(dsn, kek)  # through the parent: all 900 rows
    assert len(expected) == 900

    res = Engine(dsn, cfg, keks(kek), actor="test").rotate(2, options)
    assert res.performed and res.re_encrypted == 900
    got = _read_plain(dsn, kek)
    assert got == expected  # every row holds its own plaintext: none took another's
    assert inspection.snapshot(dsn, cfg).targets[0].kind == "inherited"
    assert_rotated(dsn, cfg, kek, {Target("secrets"): expected})
    assert _verify_cli(dsn, kek).returncode == 0


def test_a_foreign_or_unsupported_member_is_refused_by_name(dsn: str) -> None:
    _as_app(dsn, "CREATE TABLE secrets (id bigint, value bytea NOT NULL, key_id int) "
                 "PARTITION BY LIST (id)",
            "CREATE TABLE secrets_p1 PARTITION OF secrets FOR VALUES IN (1)",
            "CREATE RULE no_update AS ON UPDATE TO secrets_p1 DO INSTEAD NOTHING")
    _grant(dsn, "secrets", "secrets_p1")
    before = dump(dsn)
    with pytest.raises(Exception, match="has an UPDATE rule") as info:
        Engine(dsn, StoreConfig([Target("secrets")]), keks(crypto.new_key()),
               actor="t").initialise()
    assert getattr(info.value, "reason", "") == "TargetUnsupported"
    assert dump(dsn) == before


def test_missing_partition_grant_is_named_before_anything_is_written(dsn: str) -> None:
    _as_app(dsn, "CREATE TABLE secrets (id bigint, value bytea NOT NULL, key_id int) "
                 "PARTITION BY LIST (id)",
            "CREATE TABLE secrets_p1 PARTITION OF secrets FOR VALUES IN (1)")
    _grant(dsn, "secrets")  # the partition itself is not granted
    before = dump(dsn)
    proc = run_cli("init", dsn=dsn, kek=crypto.new_key())
    assert proc.returncode == 2, proc.stderr
    assert "lacks SELECT on public.secrets_p1" in proc.stderr
    assert "GRANT SELECT (id, value, key_id, ctid, xmin), UPDATE (value, key_id) ON " \
           "public.secrets_p1 TO ro_operator" in proc.stderr
    assert "Traceback" not in proc.stderr and dump(dsn) == before


# -- the handover (finding 2) ------------------------------------------------------------------
def test_a_transaction_that_starts_after_minting_and_commits_late_ends_under_the_active_key(
        dsn: str) -> None:
    """An Encryptor at its default max_age encrypts right after the new key appears (its
    ring has not looked yet), inserts, and commits 6 s later, after the rotation's first
    pass: the handover waits for that transaction and the next pass moves its row."""
    app = make_app(dsn, 300)
    gate = Gate(at=1)  # parks the rotation right after the new key is announced
    with Encryptor(app_dsn(dsn), app.kek) as enc, psycopg.connect(app_dsn(dsn)) as writer:
        enc.encrypt(b"warm the ring")  # checked the active key just now: v1
        rotation, out = in_thread(lambda: app.engine().rotate(2, DEFAULTS, progress=gate))
        assert gate.entered.wait(30)
        value, kid = enc.encrypt(b"app-secret-late-writer")
        assert kid == 1, "setup: the ring already saw the new key"
        writer.execute("INSERT INTO secrets VALUES (9001, %s, %s)", (value, kid))
        gate.release.set()
        time.sleep(6)  # the rotation's first pass ends; the handover waits for us
        assert rotation.is_alive(), "the rotation finished while our transaction was open"
        writer.commit()
        rotation.join(60)
    assert "error" not in out, out
    res = out["result"]
    assert res.handover["transactions"] >= 1 and not res.handover["timedOut"]
    assert res.caught_in_handover >= 1  # it says which: the handover caught the row
    assert read_rows(dsn, app.target)[9001][1] == 2
    app.expected[app.target][9001] = b"app-secret-late-writer"
    app.assert_rotated(keys_for_policy=[(2, 1)])
    with psycopg.connect(dsn) as conn:
        record = app.engine().store.rotation_records(conn)[-1]
    assert record.report["handover"]["transactions"] >= 1


def test_a_ciphertext_held_across_the_rotation_is_reported_and_swept(dsn: str) -> None:
    """An application that encrypts under the old key and writes only after the rotation
    finished lands under a retired key: nothing can prevent that, but it is never silently
    accepted: status counts it, verify fails, and a sweep moves it."""
    app = make_app(dsn, 200)
    with Encryptor(app_dsn(dsn), app.kek) as enc:
        held, kid = enc.encrypt(b"app-secret-held")
    assert kid == 1
    app.engine().rotate(2, DEFAULTS.replace(grace=0.0))
    with psycopg.connect(app_dsn(dsn), autocommit=True) as conn:
        conn.execute("INSERT INTO secrets VALUES (9002, %s, 1)", (held,))
    app.expected[app.target][9002] = b"app-secret-held"
    snap = inspection.snapshot(dsn, app.cfg)
    assert snap.retired_count == 1 and snap.stale_count == 1
    report = inspection.verify(dsn, app.cfg, keks(app.kek))
    assert not report.ok and report.retired == {"v1": 1} and not report.failures
    proc = _verify_cli(dsn, app.kek)
    assert proc.returncode == 1 and "rows under retired keys: v1: 1" in proc.stdout
    proc = run_cli("status", dsn=dsn, kek=None)
    assert "under retired keys: 1" in proc.stdout and "run `sweep`" in proc.stdout

    res = app.engine().sweep(DEFAULTS)
    assert res.performed and res.kind == "sweep" and res.re_encrypted == 1
    assert keys(dsn, app.cfg) == [(1, "retired", None), (2, "active", 2)]  # no new key
    app.assert_rotated()
    assert inspection.verify(dsn, app.cfg, keks(app.kek)).ok
    assert not app.engine().sweep(DEFAULTS).performed  # nothing left


def test_atomic_with_a_writer_blocked_by_its_lock(dsn: str, fault_hook: FaultHook) -> None:
    """Atomic mints and announces the key before it locks: a writer blocked by the lock has
    already seen the new key, so its row is under the active key when it gets through."""
    app = make_app(dsn, 400, atomic=True)
    parked, go = Gate(), Gate()

    def park() -> None:
        if not parked.entered.is_set():  # first batch, inside the locked transaction
            parked.entered.set()
            assert go.release.wait(60)

    fault_hook("batch-read", park)
    rotation, out = in_thread(lambda: app.engine().rotate(2, ATOMIC.replace(grace=2.0)))
    assert parked.entered.wait(60)
    with Encryptor(app_dsn(dsn), app.kek) as enc, psycopg.connect(app_dsn(dsn),
                                                                  autocommit=True) as conn:
        value, kid = enc.encrypt(b"app-secret-blocked-writer")
        assert kid == 2  # the key was announced before the lock, and the grace passed
        writer, wout = in_thread(lambda: conn.execute(
            "INSERT INTO secrets VALUES (9003, %s, %s)", (value, kid)))
        time.sleep(1.0)
        assert writer.is_alive(), "the INSERT was not blocked by the Atomic lock"
        go.release.set()
        rotation.join(60)
        writer.join(30)
    assert "error" not in out and "error" not in wout, (out, wout)
    app.expected[app.target][9003] = b"app-secret-blocked-writer"
    app.assert_rotated(keys_for_policy=[(2, 1)])
    assert inspection.snapshot(dsn, app.cfg).retired_count == 0


def test_atomic_gives_up_on_its_lock_after_lock_timeout(dsn: str) -> None:
    """Behind a long application transaction holding a lock on the table, Atomic's LOCK
    TABLE waits lock_timeout and stops (retryable, nothing of the rows written) instead of
    queueing every writer behind it.  (A transaction that has written is waited for by the
    handover first, up to handover_timeout; this one only holds a lock.)"""
    app = make_app(dsn, 200, atomic=True)
    before = read_rows(dsn, app.target)
    with psycopg.connect(app_dsn(dsn)) as long_tx:
        long_tx.execute("LOCK TABLE secrets IN ROW SHARE MODE")
        started = time.monotonic()
        with pytest.raises(LockTimeout) as info:
            app.engine().rotate(2, ATOMIC.replace(lock_timeout=1.0, handover_timeout=5.0))
        assert time.monotonic() - started < 20
        assert info.value.retryable and "lock_timeout" in str(info.value)
        long_tx.rollback()
    assert read_rows(dsn, app.target) == before
    res = app.engine().rotate(2, ATOMIC)
    assert res.performed and res.resumed
    app.assert_rotated(keys_for_policy=[(2, 1)])


# -- fencing (finding 3) ---------------------------------------------------------------------
@pytest.mark.parametrize(("heartbeat", "stopped_by"), [(1.0, LockLost), (60.0, Superseded)],
                         ids=["heartbeat-notices", "fence-stops-it"])
@pytest.mark.parametrize("second", [3, 2], ids=["newer-version", "same-version"])
def test_lock_session_killed_then_a_second_rotator(dsn: str, heartbeat: float,
                                                   stopped_by: type[RotationOperatorError],
                                                   second: int) -> None:
    """``pg_terminate_backend`` on the lock session of a running rotation (superuser:
    only it, or pg_signal_backend, may end another role's session), then a second rotator.
    Exactly one rotation wins; the first stops with a specific reason and no healthy row is
    ever called corrupt."""
    app = make_app(dsn, 1200)
    gate = Gate(at=3)
    first, out = in_thread(lambda: app.engine(actor="first").rotate(
        2, DEFAULTS.replace(workers=1, grace=0.0, heartbeat=heartbeat), progress=gate))
    assert gate.entered.wait(60)
    with psycopg.connect(admin_dsn(dsn), autocommit=True) as admin:
        killed = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = "
            "current_database() AND application_name = 'rotation-operator-lock'").fetchall()
    assert killed == [(True,)]
    time.sleep(2.5)  # the heartbeat (if quick) has noticed; the fence has not been tested
    second_rotator, out2 = in_thread(lambda: app.engine(actor="second").rotate(
        second, DEFAULTS.replace(grace=0.0), lock_wait=30))
    time.sleep(1.0)  # the second has the lock and has claimed the rotation
    gate.release.set()
    first.join(60)
    second_rotator.join(60)
    assert "error" not in out2, out2
    assert isinstance(out.get("error"), stopped_by), out
    assert out["error"].reason == stopped_by.reason  # the database stayed up: not a restart
    assert out["error"].retryable
    res = out2["result"]
    assert res.performed
    with psycopg.connect(dsn) as conn:
        phases = [(r.requested_version, r.phase)
                  for r in app.engine().store.rotation_records(conn)]
    if second == 3:
        assert phases == [(2, "superseded"), (3, "done")]
        assert keys(dsn, app.cfg) == [(1, "retired", None), (2, "retired", 2),
                                      (3, "active", 3)]
    else:
        assert phases == [(2, "done")] and res.resumed
    app.assert_rotated()
    assert _verify_cli(dsn, app.kek).returncode == 0


# -- one owner per keys table (finding 4) -----------------------------------------------------
def test_two_policies_with_different_targets_cannot_share_a_keys_table(dsn: str) -> None:
    create_table(dsn, Target("orders"))
    app = make_app(dsn, 100)  # targets [secrets], recorded at its first initialise
    owner_a, owner_b = "EncryptionPolicy ns/a", "EncryptionPolicy ns/b"
    Engine(dsn, app.cfg, keks(app.kek), actor="a", owner=owner_a).initialise(1)
    before = dump(dsn)
    other = StoreConfig([Target("orders")])
    for call in (lambda: Engine(dsn, other, keks(app.kek), actor="b", owner=owner_b).initialise(1),
                 lambda: Engine(dsn, other, keks(app.kek), actor="b", owner=owner_b).rotate(2)):
        with pytest.raises(KeysTableShared, match=r"covers public\.secrets") as info:
            call()
        assert "give each application its own keysTable" in str(info.value)
    proc = run_cli("rotate", "--policy-version", "2", "--target", "orders", dsn=dsn,
                   kek=app.kek)
    assert proc.returncode == 2 and "[KeysTableShared]" in proc.stderr
    assert dump(dsn) == before  # refused before any write
    # the same targets are fine for anyone (the CLI, the same policy re-created)
    assert Engine(dsn, app.cfg, keks(app.kek), actor="cli").rotate(2, DEFAULTS).performed


def test_the_owner_may_add_targets_but_not_drop_one_that_still_has_rows(dsn: str) -> None:
    app = make_app(dsn, 50)
    owner = "EncryptionPolicy ns/a"
    Engine(dsn, app.cfg, keks(app.kek), actor="a", owner=owner).initialise(1)
    create_table(dsn, Target("orders"))
    both = StoreConfig([Target("secrets"), Target("orders")])
    Engine(dsn, both, keks(app.kek), actor="a", owner=owner).initialise(1)
    with pytest.raises(KeysTableShared, match="still holds 38 rows"):  # 12 are legacy
        Engine(dsn, StoreConfig([Target("orders")]), keks(app.kek), actor="a",
               owner=owner).initialise(1)


# -- the watchdog (finding 5) -------------------------------------------------------------------
def test_a_trigger_that_suppresses_updates_stops_the_rotation_with_a_reason(dsn: str) -> None:
    app = make_app(dsn, 300)
    _as_app(dsn, "CREATE FUNCTION keep_tens() RETURNS trigger LANGUAGE plpgsql AS "
                 "$$ BEGIN IF NEW.id % 10 = 0 THEN RETURN NULL; END IF; RETURN NEW; END $$",
            "CREATE TRIGGER keep_tens BEFORE UPDATE ON secrets FOR EACH ROW "
            "EXECUTE FUNCTION keep_tens()")
    started = time.monotonic()
    with pytest.raises(RotationStuck) as info:
        app.engine().rotate(2, DEFAULTS.replace(grace=0.0))
    assert time.monotonic() - started < 30
    message = str(info.value)
    assert "public.secrets" in message and "keep_tens" in message
    row_id = int(message.split("row ")[1].split(" ")[0])
    assert row_id % 10 == 0 and info.value.retryable
    # resumable: with the trigger gone the same rotation finishes, nothing lost
    _as_app(dsn, "DROP TRIGGER keep_tens ON secrets")
    res = app.engine().rotate(2, DEFAULTS.replace(grace=0.0))
    assert res.resumed
    app.assert_rotated(keys_for_policy=[(2, 1)])


def test_a_trigger_that_changes_the_row_rolls_its_batch_back(dsn: str) -> None:
    app = make_app(dsn, 200)
    _as_app(dsn, "CREATE FUNCTION meddle() RETURNS trigger LANGUAGE plpgsql AS "
                 "$$ BEGIN NEW.value := NEW.value || '\\x00'::bytea; RETURN NEW; END $$",
            "CREATE TRIGGER meddle BEFORE UPDATE ON secrets FOR EACH ROW "
            "EXECUTE FUNCTION meddle()")
    before = read_rows(dsn, app.target)
    with pytest.raises(TriggerInterference, match="meddle"):
        app.engine().rotate(2, DEFAULTS)
    assert read_rows(dsn, app.target) == before  # nothing of the batch was written


def test_a_harmless_before_update_trigger_is_allowed(dsn: str) -> None:
    _as_app(dsn, "CREATE TABLE secrets (id bigint PRIMARY KEY, value bytea NOT NULL, "
                 "key_id int, touched timestamptz)",
            "CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN NEW.touched := now(); RETURN NEW; END $$",
            "CREATE TRIGGER touch BEFORE UPDATE ON secrets FOR EACH ROW EXECUTE FUNCTION touch()")
    _grant(dsn, "secrets")
    kek = crypto.new_key()
    cfg = StoreConfig([Target("secrets")])
    Engine(dsn, cfg, keks(kek), actor="t").initialise()
    expected = fill(dsn, Target("secrets"), kek, 300, ring=load_ring(dsn, cfg, kek))
    assert Engine(dsn, cfg, keks(kek), actor="t").rotate(2, DEFAULTS).performed
    assert_rotated(dsn, cfg, kek, {Target("secrets"): expected})


def test_row_level_security_that_hides_rows_is_refused(dsn: str) -> None:
    app = make_app(dsn, 100)
    _as_app(dsn, "ALTER TABLE secrets ENABLE ROW LEVEL SECURITY",
            f"CREATE POLICY some_rows ON secrets TO {OPERATOR_ROLE} USING (id < 50)")
    before = dump(dsn)
    with pytest.raises(RowSecurityError) as info:
        app.engine().rotate(2, DEFAULTS)
    assert info.value.reason == "RowLevelSecurity"
    assert f"CREATE POLICY rotation_operator ON public.secrets FOR ALL TO {OPERATOR_ROLE} " \
           "USING (true) WITH CHECK (true)" in str(info.value)
    assert dump(dsn) == before
    # the documented policy lets the operator see every row: rotated in full
    _as_app(dsn, f"CREATE POLICY rotation_operator ON secrets FOR ALL TO {OPERATOR_ROLE} "
                 "USING (true) WITH CHECK (true)")
    assert app.engine().rotate(2, DEFAULTS).re_encrypted == 100
    app.assert_rotated()


def test_paused_stops_between_batches_and_resumes_losing_nothing(dsn: str) -> None:
    app = make_app(dsn, 1000)
    calls = {"n": 0}

    def control() -> None:
        calls["n"] += 1
        if calls["n"] == 4:
            raise RotationPaused("spec.rotation.paused was set")

    with pytest.raises(RotationPaused):
        app.engine().rotate(2, DEFAULTS.replace(workers=1), control=control)
    snap = inspection.snapshot(dsn, app.cfg)
    assert snap.running is not None and 0 < snap.stale_count < 1000
    assert inspection.verify(dsn, app.cfg, keks(app.kek)).failures == []
    res = app.engine().rotate(2, DEFAULTS)
    assert res.resumed
    app.assert_rotated(keys_for_policy=[(2, 1)])


# -- errors, timeouts, memory (findings 6-8) ---------------------------------------------------
def test_a_check_violation_from_a_trigger_is_sanitized(dsn: str) -> None:
    app = make_app(dsn, 100, atomic=True)
    _as_app(dsn, "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                 "RAISE EXCEPTION USING ERRCODE = 'check_violation', MESSAGE = 'no', "
                 "DETAIL = 'Failing row contains (' || NEW.id || ', app-secret-in-detail)'; "
                 "END $$",
            "CREATE TRIGGER refuse BEFORE UPDATE ON secrets FOR EACH ROW "
            "EXECUTE FUNCTION refuse()")
    for options in (DEFAULTS, ATOMIC):
        with pytest.raises(DatabaseRejected) as info:
            app.engine().rotate(2, options)
        text = f"{info.value} {info.value!r}"
        assert "a trigger or function raised SQLSTATE 23514" in text
        assert "DETAIL" not in text and "app-secret" not in text and "Failing row" not in text


def test_statement_timeout_stops_a_rotation_statement(dsn: str) -> None:
    app = make_app(dsn, 50)
    _as_app(dsn, "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS "
                 "$$ BEGIN PERFORM pg_sleep(0.2); RETURN NEW; END $$",
            "CREATE TRIGGER slow BEFORE UPDATE ON secrets FOR EACH ROW EXECUTE FUNCTION slow()")
    with pytest.raises(StatementTimeout) as info:
        app.engine().rotate(2, DEFAULTS.replace(statement_timeout=1.0))
    assert info.value.retryable and "statement timeout" in str(info.value)
    assert {k for _, k in read_rows(dsn, app.target).values()} <= {None, 1}


def test_large_values_keep_memory_flat(dsn: str) -> None:
    """3,000 small rows, then 2,000 rows of 64 kB (128 MB of values): batches bounded by
    bytes keep every process of the rotation small, even where the first rows suggest small
    values.  ``wait4`` reports the largest resident set among the CLI and its workers."""
    create_table(dsn)
    kek = crypto.new_key()
    cfg = StoreConfig([Target("secrets")])
    Engine(dsn, cfg, keks(kek), actor="t").initialise()
    ring = load_ring(dsn, cfg, kek)
    big = os.urandom(32 * 1024).hex().encode()  # 64 kB, incompressible
    with psycopg.connect(app_dsn(dsn)) as conn, conn.cursor() as cur, cur.copy(
            "COPY secrets (id, value, key_id) FROM STDIN") as copy:
        for i in range(3000):
            copy.write_row((100_000 + i, ring.encrypt(b"small")[0], 1))
        for i in range(2000):
            copy.write_row((i, ring.encrypt(big)[0], 1))
    env = {k: v for k, v in os.environ.items() if k != "ROTATION_OPERATOR_FAULT"}
    env.update({DSN_ENV: dsn, KEK_ENV: kek.hex()})
    proc = subprocess.Popen([sys.executable, "-m", "rotation_operator.cli", "rotate",
                             "--policy-version", "2", "--no-vacuum", "--dsn-env", DSN_ENV,
                             "--kek-env", KEK_ENV], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    stdout, stderr = proc.communicate()
    assert os.waitstatus_to_exitcode(status) == 0, stderr
    peak_mb = usage.ru_maxrss / 1024
    print(f"\npeak RSS rotating 3000 small + 2000 x 64 kB rows: {peak_mb:.0f} MB")
    assert peak_mb < 200, f"peak RSS {peak_mb:.0f} MB"
    assert b"5000 rows re-encrypted" in stdout
    rows = read_rows(dsn, Target("secrets"))
    assert {k for _, k in rows.values()} == {2}
    ring = load_ring(dsn, cfg, kek)
    assert all(ring.decrypt(rows[i][0], 2) == big for i in range(0, 2000, 97))


# -- truthful state (finding 11) ----------------------------------------------------------------
def test_a_corrupt_legacy_row_is_a_bad_row_not_a_wrong_kek(dsn: str) -> None:
    create_table(dsn)
    kek = crypto.new_key()
    fill(dsn, Target("secrets"), kek, 30, ring=None)  # all legacy
    with psycopg.connect(app_dsn(dsn), autocommit=True) as conn:
        row = conn.execute("SELECT min(id) FROM secrets").fetchone()
        assert row is not None
        conn.execute("UPDATE secrets SET value = overlay(value placing '\\x00' from 20 for 1) "
                     "WHERE id = %s", (row[0],))
    cfg = StoreConfig([Target("secrets")])
    init = Engine(dsn, cfg, keks(kek), actor="t").initialise()  # the KEK opens the other rows
    assert init.created_key
    with pytest.raises(Exception, match=f"row {row[0]} of table secrets does not decrypt "
                                        "under the KEK") as info:
        Engine(dsn, cfg, keks(kek), actor="t").rotate(2, DEFAULTS)
    assert getattr(info.value, "reason", "") == "RowDecryptFailed"


# -- found by review: each reproduced first, then fixed -------------------------------------
def test_a_new_keys_table_over_rows_of_another_is_refused(dsn: str) -> None:
    """Changing keysTable over rows that carry the old table's key ids would mint a v1
    whose ids collide with theirs: a rotation then moves nothing and no row decrypts."""
    app = make_app(dsn, 200)
    app.engine().rotate(2, DEFAULTS.replace(grace=0.0))
    before = dump(dsn)
    other = StoreConfig(app.cfg.targets, keys_table="other_keys")
    for call in (lambda: Engine(dsn, other, keks(app.kek), actor="t").initialise(1),
                 lambda: Engine(dsn, other, keks(app.kek), actor="t").rotate(3)):
        with pytest.raises(Exception, match="rows under key id 2, but keys table other_keys "
                                            "holds no key") as info:
            call()
        assert getattr(info.value, "reason", "") == "KeysTableMismatch"
    proc = run_cli("rotate", "--keys-table", "other_keys", dsn=dsn, kek=app.kek)
    assert proc.returncode == 2 and "[KeysTableMismatch]" in proc.stderr
    assert dump(dsn) == before


def test_a_transaction_that_reads_first_and_writes_late_is_waited_for(dsn: str) -> None:
    """Encrypts right after the new key appears, reads, and INSERTs only after the grace
    (no xid yet when the handover starts), then commits: its virtual transaction id is
    waited for all the same."""
    app = make_app(dsn, 300)
    gate = Gate(at=1)
    with Encryptor(app_dsn(dsn), app.kek) as enc, psycopg.connect(app_dsn(dsn)) as writer:
        enc.encrypt(b"warm the ring")
        rotation, out = in_thread(lambda: app.engine().rotate(2, DEFAULTS, progress=gate))
        assert gate.entered.wait(30)
        value, kid = enc.encrypt(b"app-secret-read-then-write")
        assert kid == 1, "setup: the ring already saw the new key"
        writer.execute("SELECT count(*) FROM secrets")  # a transaction, no xid
        gate.release.set()
        time.sleep(3.5)  # past the grace: the handover has started and must wait for us
        writer.execute("INSERT INTO secrets VALUES (9005, %s, %s)", (value, kid))
        time.sleep(3)
        assert rotation.is_alive(), "the rotation did not wait for an open transaction"
        writer.commit()
        rotation.join(60)
    assert "error" not in out, out
    assert out["result"].handover["transactions"] >= 1
    assert read_rows(dsn, app.target)[9005][1] == 2
    app.expected[app.target][9005] = b"app-secret-read-then-write"
    app.assert_rotated(keys_for_policy=[(2, 1)])


def test_two_policies_racing_on_a_fresh_database_one_wins(dsn: str,
                                                         make_database: Any) -> None:
    """Both pass the read-only coverage check at once: the meta row's lock lets exactly one
    record its targets; the other is refused, and neither trips over the other's tables."""
    import threading

    for _ in range(4):
        db = make_database()
        create_table(db, Target("secrets"))
        create_table(db, Target("orders"))
        kek = crypto.new_key()
        barrier = threading.Barrier(2)
        outs = []
        for owner, table in (("EncryptionPolicy ns/a", "secrets"),
                             ("EncryptionPolicy ns/b", "orders")):
            def run(owner: str = owner, table: str = table, db: str = db, kek: bytes = kek,
                    barrier: threading.Barrier = barrier) -> object:
                barrier.wait()
                return Engine(db, StoreConfig([Target(table)]), keks(kek), actor=owner,
                              owner=owner).initialise(1)
            outs.append(in_thread(run))
        for t, _ in outs:
            t.join(60)
        errors = [out.get("error") for _, out in outs]
        assert sum(e is None for e in errors) == 1, errors
        assert [type(e).__name__ for e in errors if e is not None] == ["KeysTableShared"]


def test_a_rotator_that_lost_its_lock_does_not_sweep_over_the_one_that_took_over(
        dsn: str, fault_hook: FaultHook) -> None:
    """A finishes, stalls (a GC pause), loses its lock session; B rotates to v3; then A
    wakes for its post-finish sweep: it must not claim anything."""
    app = make_app(dsn, 500)
    calls = {"n": 0}

    def stalled() -> None:
        calls["n"] += 1
        if calls["n"] == 1:  # A's: kill its lock session and let B run to the end
            with psycopg.connect(admin_dsn(dsn), autocommit=True) as admin:  # superuser:
                killed = admin.execute(  # only it may end another role's session
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = "
                    "current_database() AND application_name = 'rotation-operator-lock'"
                ).fetchall()
            assert killed == [(True,)]
            time.sleep(1.5)  # A's heartbeat notices
            app.engine(actor="B").rotate(3, DEFAULTS.replace(grace=0.0), lock_wait=30)

    fault_hook("after-finish", stalled)
    res = app.engine(actor="A").rotate(2, DEFAULTS.replace(grace=0.0))
    assert res.performed and res.swept_after == 0
    with psycopg.connect(dsn) as conn:
        phases = [(r.kind, r.requested_version, r.phase)
                  for r in app.engine().store.rotation_records(conn)]
    assert phases == [("policy", 2, "done"), ("policy", 3, "done")]
    app.assert_rotated()


def test_a_partition_in_a_schema_without_usage_is_named_before_any_write(dsn: str) -> None:
    _as_app(dsn, "CREATE SCHEMA archive",
            "CREATE TABLE secrets (id bigint, value bytea NOT NULL, key_id int) "
            "PARTITION BY LIST (id)",
            "CREATE TABLE archive.secrets_p1 PARTITION OF secrets FOR VALUES IN (1)")
    with psycopg.connect(app_dsn(dsn), autocommit=True) as conn:
        grant_target(conn, sql.Identifier("secrets"))
        grant_target(conn, sql.Identifier("archive", "secrets_p1"))  # but no USAGE
    before = dump(dsn)
    proc = run_cli("init", dsn=dsn, kek=crypto.new_key())
    assert proc.returncode == 2 and "lacks USAGE on schema archive" in proc.stderr, proc.stderr
    assert "GRANT USAGE ON SCHEMA archive TO ro_operator" in proc.stderr
    assert dump(dsn) == before


def test_atomic_without_its_grant_is_refused_before_a_key_is_minted(dsn: str) -> None:
    app = make_app(dsn, 50)  # column grants only
    before = dump(dsn)
    proc = run_cli("rotate", "--policy-version", "2", "--mode", "Atomic", dsn=dsn, kek=app.kek)
    assert proc.returncode == 2 and "table-level UPDATE" in proc.stderr, proc.stderr
    assert dump(dsn) == before


def test_a_trigger_raising_with_any_sqlstate_never_shows_its_message(dsn: str) -> None:
    app = make_app(dsn, 20)
    _as_app(dsn, "ALTER TABLE secrets ADD COLUMN owner_email text DEFAULT 'user13@example.com'",
            "CREATE FUNCTION no_rewrite() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege', "
            "MESSAGE = 'secret of ' || OLD.owner_email || ' is frozen'; END $$",
            "CREATE TRIGGER no_rewrite BEFORE UPDATE ON secrets FOR EACH ROW "
            "EXECUTE FUNCTION no_rewrite()")
    proc = run_cli("rotate", "--policy-version", "2", dsn=dsn, kek=app.kek)
    assert proc.returncode == 3 and "[DatabaseRejected]" in proc.stderr, proc.stderr
    assert "user13@example.com" not in proc.stderr + proc.stdout
    assert "SQLSTATE 42501" in proc.stderr and "withheld" in proc.stderr


def test_idle_session_timeout_kills_no_rotation_connection(dsn: str) -> None:
    """A role-level idle_session_timeout (set by the superuser: ALTER ROLE ... IN DATABASE
    for another role needs it) must not kill the rotation's connections while workers run,
    nor make the library fail after an idle period."""
    app = make_app(dsn, 3000)
    _as_app(dsn, "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS "
                 "$$ BEGIN PERFORM pg_sleep(0.001); RETURN NEW; END $$",
            "CREATE TRIGGER slow BEFORE UPDATE ON secrets FOR EACH ROW EXECUTE FUNCTION slow()")
    dbname = dsn.rsplit("/", 1)[1]
    with psycopg.connect(admin_dsn(dsn), autocommit=True) as admin:
        for role in ("ro_operator", "ro_app"):
            admin.execute(sql.SQL("ALTER ROLE {} IN DATABASE {} SET idle_session_timeout = "
                                  "'1s'").format(sql.Identifier(role), sql.Identifier(dbname)))
    res = app.engine().rotate(2, DEFAULTS.replace(workers=2, grace=0.0))
    assert res.performed
    app.assert_rotated()
    with Encryptor(app_dsn(dsn), app.kek) as enc:
        enc.encrypt(b"x")
        time.sleep(2.5)  # the server ends the idle session meanwhile
        value, kid = enc.encrypt(b"app-secret-after-idle")
        assert enc.decrypt(value, kid) == b"app-secret-after-idle"


def test_with_legacy_reads_open_a_late_legacy_row_is_reported_and_swept(dsn: str) -> None:
    """spec.legacy.reads: Open (the Engine's legacy_reads="open"): the behaviour from
    before legacy reads closed (tests/db/test_legacy.py has the closed default)."""
    app = make_app(dsn, 100)
    Engine(dsn, app.cfg, keks(app.kek), actor="t", legacy_reads="open").rotate(
        2, DEFAULTS.replace(grace=0.0))
    with psycopg.connect(app_dsn(dsn), autocommit=True) as conn:  # an old app, no DEKs
        conn.execute("INSERT INTO secrets VALUES (9006, %s, NULL)",
                     (crypto.encrypt(app.kek, b"app-secret-legacy-late"),))
    app.expected[app.target][9006] = b"app-secret-legacy-late"
    assert inspection.snapshot(dsn, app.cfg).retired_count == 1
    report = inspection.verify(dsn, app.cfg, keks(app.kek))
    assert not report.ok and report.retired == {"legacy": 1}
    res = app.engine().sweep(DEFAULTS)
    assert res.performed and res.re_encrypted == 1
    app.assert_rotated()
    assert inspection.verify(dsn, app.cfg, keks(app.kek)).ok
