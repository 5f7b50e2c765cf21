"""The guarantees through the real operator (issue #8): the operator and the application
as non-superuser database roles, on the real apiserver with real kubectl.

Slow rotations are made with a harmless BEFORE UPDATE trigger that sleeps a little per
row (the application's own table, the application's own trigger), so a test can act while
a rotation is between batches without racing a fast machine.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

from rotation_operator.crypto import codec as crypto
from rotation_operator.library import Encryptor
from rotation_operator.policy.config import Target
from tests.fixtures import roles
from tests.fixtures.fix_app import create_table
from tests.fixtures.fix_cluster import Kubectl
from tests.fixtures.fix_operator import (
    ENCPOL,
    KEK_SECRET,
    App,
    MakeApp,
    StartOperator,
    eventually,
    parse_table,
)


def _as_app(app: App, *statements: str) -> None:
    with psycopg.connect(roles.app_dsn(app.dsn), autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def _slow_down(app: App, seconds_per_row: float = 0.004) -> None:
    """A harmless trigger (returns NEW) that makes each updated row take a little time."""
    _as_app(app, "CREATE FUNCTION slow_rows() RETURNS trigger LANGUAGE plpgsql AS "
                 f"$$ BEGIN PERFORM pg_sleep({seconds_per_row}); RETURN NEW; END $$",
            f"CREATE TRIGGER slow_rows BEFORE UPDATE ON {app.table} FOR EACH ROW "
            "EXECUTE FUNCTION slow_rows()")


def _partial_progress(app: App) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        obj = app.get()
        rot = (obj.get("status") or {}).get("rotation") or {}
        return obj if rot.get("phase") == "Running" and (rot.get("done") or 0) > 0 else None
    return eventually(check, timeout=60, interval=0.2,
                      what="a rotation with partial progress")


def _assert_no_detail(*texts: str) -> None:
    for text in texts:
        assert "DETAIL" not in text and "Failing row" not in text and "app-secret" not in text


def test_paused_then_resumed_loses_nothing(namespace: str, dsn: str, make_app: MakeApp,
                                           start_operator: StartOperator) -> None:
    app = make_app(namespace, dsn, rows=1500, legacy=300, batch_size=100, workers=1)
    _slow_down(app)
    start_operator([namespace])
    app.wait_condition("Ready", "True")
    app.patch_spec({"version": 2})
    _partial_progress(app)
    app.patch_spec({"rotation": {"paused": True}})
    obj = app.wait_condition("Ready", "False", "Paused", timeout=30)
    assert app.cond("Rotating", obj)["reason"] == "Paused"
    assert obj["status"]["rotation"]["phase"] == "Paused"
    stale = app.stale_count()
    assert 0 < stale < 1500
    time.sleep(3)
    assert app.stale_count() == stale, "a paused rotation kept moving rows"
    assert app.rotations()[-1][:2] == (2, "running")  # resumable, recorded as running
    app.assert_intact()

    app.patch_spec({"rotation": {"paused": False}})
    obj = app.wait_condition("Ready", "True", "RotationSucceeded", timeout=120)
    assert obj["status"]["rotation"]["resumed"] is True
    assert app.stale_count() == 0 and app.active_version() == 2
    app.assert_intact()
    assert [r[:2] for r in app.rotations()] == [(1, "baseline"), (2, "done")]


def test_deleting_the_policy_stops_its_rotation_and_a_recreated_one_resumes(
        kubectl: Kubectl, namespace: str, dsn: str, make_app: MakeApp,
        start_operator: StartOperator) -> None:
    app = make_app(namespace, dsn, rows=1500, legacy=300, batch_size=100, workers=1)
    _slow_down(app)
    op = start_operator([namespace])
    app.wait_condition("Ready", "True")
    app.patch_spec({"version": 2})
    _partial_progress(app)
    kubectl("delete", ENCPOL, app.name, "-n", namespace, "--wait=true", "--timeout=60s")
    eventually(lambda: "was deleted: rotation stopped" in op.log(), timeout=30,
               what="the rotation to stop")
    stale = app.stale_count()
    assert 0 < stale < 1500
    time.sleep(2)
    assert app.stale_count() == stale, "the rotation went on after its policy was deleted"
    app.assert_intact()

    app.apply_policy(version=2, workers=1)
    obj = app.wait_condition("Ready", "True", "RotationSucceeded", timeout=120)
    assert obj["status"]["rotation"]["resumed"] is True
    assert [k["version"] for k in app.key_rows() if k["policy_version"] == 2] == [2]
    assert app.stale_count() == 0
    app.assert_intact()


def test_two_policies_on_one_keys_table_with_different_targets(
        kubectl: Kubectl, namespace: str, dsn: str, make_app: MakeApp,
        start_operator: StartOperator) -> None:
    app = make_app(namespace, dsn, rows=50, legacy=10)
    start_operator([namespace])
    app.wait_condition("Ready", "True")
    create_table(dsn, Target("orders"))
    before = app.db_state()
    other = app.policy_manifest(version=1)
    other["metadata"]["name"] = "orders"
    other["spec"]["targets"] = [{"table": "orders"}]
    kubectl.apply(other)
    b = App(kubectl, namespace, "orders", dsn, app.kek, "orders", {})
    obj = b.wait_condition("Ready", "False", "KeysTableShared")
    message = b.cond("Ready", obj)["message"]
    assert f"covers public.secrets for EncryptionPolicy {namespace}/app" in message
    assert "give each application its own keysTable" in message
    b.wait_event("KeysTableShared", "Warning")
    assert app.db_state() == before  # refused before any write
    # the first policy goes on rotating its own keys
    app.patch_spec({"version": 2})
    app.wait_condition("Ready", "True", "RotationSucceeded")
    app.assert_intact()


def test_a_check_violation_in_atomic_mode_is_reported_without_detail(
        namespace: str, dsn: str, make_app: MakeApp, start_operator: StartOperator) -> None:
    app = make_app(namespace, dsn, rows=40, legacy=10, mode="Atomic")
    with psycopg.connect(roles.app_dsn(dsn), autocommit=True) as conn:
        conn.execute(sql.SQL("GRANT UPDATE ON secrets TO {}").format(
            sql.Identifier(roles.OPERATOR_ROLE)))
    _as_app(app, "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                 "RAISE EXCEPTION USING ERRCODE = 'check_violation', MESSAGE = 'refused', "
                 "DETAIL = 'Failing row contains (' || NEW.id || ', app-secret-detail)'; END $$",
            "CREATE TRIGGER refuse BEFORE UPDATE ON secrets FOR EACH ROW "
            "EXECUTE FUNCTION refuse()")
    start_operator([namespace])
    app.wait_condition("Ready", "True")
    rows_before = app.rows()
    app.patch_spec({"version": 2})
    obj = app.wait_condition("Ready", "False", "DatabaseRejected", timeout=60)
    ready = app.condition("Ready", obj)
    degraded = app.condition("Degraded", obj)
    assert ready is not None and degraded is not None
    assert "a trigger or function raised SQLSTATE 23514" in ready["message"]
    events = app.wait_event("DatabaseRejected", "Warning")
    _assert_no_detail(ready["message"], degraded["message"], *(e["message"] for e in events),
                      json.dumps(obj["status"]))
    assert obj["status"]["rotation"]["phase"] == "Failed"
    assert app.rows() == rows_before  # Atomic: not one row written


def test_a_late_writer_at_library_defaults_ends_under_the_active_key(
        namespace: str, dsn: str, make_app: MakeApp, start_operator: StartOperator) -> None:
    """An application (its own role) whose Encryptor runs at the default max_age encrypts
    right after the new key appears, inserts, and commits 6 s later; the operator (its own
    role) waits for it in the handover, moves the row, and says so in status."""
    app = make_app(namespace, dsn, rows=200, legacy=20)
    start_operator([namespace])
    app.wait_condition("Ready", "True")
    app_dsn = roles.app_dsn(dsn)
    for attempt, version in enumerate((2, 3, 4)):
        with Encryptor(app_dsn, app.kek) as enc, psycopg.connect(app_dsn) as writer:
            enc.encrypt(b"warm")
            app.patch_spec({"version": version})
            def active(v: int = version) -> bool:
                return app.active_version() == v

            eventually(active, timeout=30, interval=0.02, what=f"key v{version}")
            plain = f"app-secret-late-{version}".encode()
            value, kid = enc.encrypt(plain)
            writer.execute("INSERT INTO secrets VALUES (%s, %s, %s)", (9000 + version, value, kid))
            time.sleep(6)
            writer.commit()
        app.plaintexts[9000 + version] = plain
        obj = app.wait_condition("Ready", "True", "RotationSucceeded", timeout=60)
        assert app.rows()[9000 + version][0] == version  # under the active key
        if kid == version - 1:  # the ring had not seen the new key: the case under test
            rot = obj["status"]["rotation"]
            assert rot["handover"]["transactions"] >= 1 and not rot["handover"]["timedOut"]
            assert rot["caughtInHandover"] >= 1
            break
        print(f"attempt {attempt}: the ring saw v{version} before writing; trying again")
    else:
        raise AssertionError("the writer's ring never lagged the new key in three tries")
    app.assert_intact()
    assert app.status()["retiredKeyRows"] == 0


def test_rows_under_a_retired_key_are_reported_then_swept(
        kubectl: Kubectl, namespace: str, dsn: str, make_app: MakeApp,
        start_operator: StartOperator) -> None:
    app = make_app(namespace, dsn, rows=100, legacy=10)
    start_operator([namespace])
    app.wait_condition("Ready", "True")
    held = crypto.encrypt(app.deks()[1], b"app-secret-held-across")  # encrypted under v1
    app.patch_spec({"version": 2, "rotation": {"paused": False}})
    app.wait_condition("Ready", "True", "RotationSucceeded")
    app.patch_spec({"rotation": {"paused": True}})  # hold the sweep back to see the report
    app.wait_condition("Ready", "True")
    with psycopg.connect(roles.app_dsn(dsn), autocommit=True) as conn:
        conn.execute("INSERT INTO secrets VALUES (7777, %s, 1)", (held,))
    app.plaintexts[7777] = b"app-secret-held-across"

    def degraded() -> dict[str, Any] | None:
        obj = app.get()
        cond = app.condition("Degraded", obj) or {}
        return obj if cond.get("reason") == "RowsUnderRetiredKey" else None

    obj = eventually(degraded, timeout=30, what="Degraded=True RowsUnderRetiredKey")
    assert app.cond("Degraded", obj)["status"] == "True"
    assert obj["status"]["retiredKeyRows"] == 1 and obj["status"]["staleCount"] == 1

    app.patch_spec({"rotation": {"paused": False}})
    app.wait_event("StaleRowsSwept", "Warning", timeout=30)
    obj = eventually(lambda: (lambda o: o if (o["status"].get("sweep") or {}).get("rows") == 1
                              and o["status"]["retiredKeyRows"] == 0 else None)(app.get()),
                     timeout=30, what="the sweep in status")
    assert app.cond("Degraded", obj)["status"] == "False"
    assert app.rows()[7777][0] == 2 and app.active_version() == 2
    app.assert_intact()


def test_status_describes_a_failed_bump_and_a_version_below_the_served_one(
        kubectl: Kubectl, namespace: str, dsn: str, make_app: MakeApp,
        start_operator: StartOperator) -> None:
    app = make_app(namespace, dsn, rows=60, legacy=10)
    start_operator([namespace])
    app.wait_condition("Ready", "True")
    app.patch_spec({"version": 3})
    app.wait_condition("Ready", "True", "RotationSucceeded")
    # A failed bump (the KEK Secret now holds another key): its own rotation says Failed.
    app.set_secret(KEK_SECRET, "kek", crypto.new_key().hex())
    app.patch_spec({"version": 4})
    obj = app.wait_condition("Ready", "False", "KEKMismatch")
    rot = obj["status"]["rotation"]
    assert (rot["phase"], rot["policyVersion"]) == ("Failed", 4), rot
    assert rot.get("fromVersion") is None and rot.get("reEncrypted") is None
    wide = parse_table(kubectl("get", ENCPOL, "-n", namespace, "-o", "wide").stdout)
    assert "100%" not in wide[0]["PROGRESS"], wide  # no progress for what never started
    app.set_secret(KEK_SECRET, "kek", app.kek.hex())
    app.wait_condition("Ready", "True", "RotationSucceeded")

    # Re-created below what the database served: reported, not Ready.
    kubectl("delete", ENCPOL, app.name, "-n", namespace, "--wait=true", "--timeout=60s")
    app.apply_policy(version=2)
    obj = app.wait_condition("Ready", "False", "VersionBelowServed")
    assert "below 4" in app.cond("Ready", obj)["message"]
    app.patch_spec({"version": 3})  # still below
    app.wait_condition("Ready", "False", "VersionBelowServed")
    app.patch_spec({"version": 4})  # adopts the current keys, no rotation
    app.wait_condition("Ready", "True", "KeysReady")
    assert app.active_version() == 3
    app.patch_spec({"version": 5})
    app.wait_condition("Ready", "True", "RotationSucceeded")
    assert app.active_version() == 4
    app.assert_intact()


def test_a_legacy_replay_after_the_migration_is_reported_by_name_and_not_swept(
        namespace: str, dsn: str, make_app: MakeApp, start_operator: StartOperator) -> None:
    """Issue #17, finding 4, through the operator: a database writer puts an old KEK-direct
    ciphertext back with key_id NULL after the first rotation migrated every legacy row.
    The refresh names the row (status.legacy, Degraded, an Event) and never sweeps it."""
    app = make_app(namespace, dsn, rows=60, legacy=10)
    start_operator([namespace])
    app.wait_condition("Ready", "True")
    victim = next(i for i, (kid, _) in app.rows().items() if kid is None)
    kept = app.rows()[victim][1]
    app.patch_spec({"version": 2})
    app.wait_condition("Ready", "True", "RotationSucceeded")
    obj = app.wait_condition("LegacyReadsOpen", "False", "LegacyClosed")
    assert obj["status"]["legacy"]["reads"] == "Closed"
    assert obj["status"]["legacy"]["migratedAt"]
    with psycopg.connect(roles.admin_dsn(dsn), autocommit=True) as conn:  # the attacker
        conn.execute(sql.SQL("UPDATE {} SET value = %s, key_id = NULL WHERE id = %s").format(
            sql.Identifier(app.table)), (kept, victim))

    def named() -> dict[str, Any] | None:
        o = app.get()
        cond = app.condition("Degraded", o) or {}
        return o if cond.get("reason") == "LegacyRowsAfterMigration" else None

    obj = eventually(named, timeout=30, what="Degraded=True LegacyRowsAfterMigration")
    assert app.cond("Degraded", obj)["status"] == "True"
    assert f"{app.table} id {victim}" in app.cond("Degraded", obj)["message"]
    assert obj["status"]["legacy"]["lateRows"] == 1
    assert obj["status"]["legacy"]["lateRowIds"] == [{"table": app.table, "id": str(victim)}]
    assert obj["status"]["retiredKeyRows"] == 0
    events = app.wait_event("LegacyRowsAfterMigration", "Warning")
    assert f"{app.table} id {victim}" in events[0]["message"]
    # Refreshes later, the row still holds the attacker's bytes under key_id NULL: no
    # sweep laundered it onto the active key.
    def refreshed_after(seen: str) -> Callable[[], dict[str, Any] | None]:
        def check() -> dict[str, Any] | None:
            o = app.get()
            return o if o["status"]["lastRefreshed"] != seen else None
        return check

    for _ in range(2):
        obj = eventually(refreshed_after(obj["status"]["lastRefreshed"]), timeout=30,
                         what="another refresh")
    assert app.rows()[victim] == (None, kept)
    assert not app.events(reason="StaleRowsSwept")
