"""Key policy (issue #10) on a real PostgreSQL: scheduled rotations with an injected
clock, a bump that arrives during one, usage counts, and the end of a key's life: census,
disable, enable, destroy, each refused while a row references the key; the dry run is
what then happens."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from rotation_operator import inspection
from rotation_operator.decisions import Request, Retention
from rotation_operator.errors import KeyInUse, KeyStateError, UnknownKeyError
from rotation_operator.keystore import KeyStore
from rotation_operator.library import Encryptor
from rotation_operator.lifecycle import Lifecycle
from tests.db.apptable import (
    ONLINE,
    App,
    audit_events,
    keys,
    make_app,
    read_rows,
    run_cli,
    verify_audit,
)
from tests.fixtures.roles import app_dsn

DAY = timedelta(days=1)
RETAIN = Retention(disable_after=timedelta(days=10), destroy_after=timedelta(days=7))


def _now(dsn: str) -> datetime:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT now()").fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def _records(app: App) -> list[tuple[str, int | None, str]]:
    with psycopg.connect(app.dsn) as conn:
        return [(r.kind, r.requested_version, r.phase)
                for r in KeyStore(app.cfg).rotation_records(conn)]


def _key(app: App, version: int) -> Any:
    with psycopg.connect(app.dsn) as conn:
        return next(k for k in KeyStore(app.cfg).list_keys(conn) if k.version == version)


# -- scheduled rotation ------------------------------------------------------------------------
def test_a_key_older_than_max_key_age_is_rotated_once_as_scheduled(dsn: str) -> None:
    app = make_app(dsn, 200)
    app.engine().initialise(policy_version=1)
    created = _key(app, 1).created_at
    age = timedelta(days=90)

    def at(when: datetime) -> Request:
        return Request("policy", 1, now=when, max_key_age=age)

    assert not app.engine().execute(at(created + age - timedelta(seconds=1)), ONLINE).performed
    res = app.engine().execute(at(created + age), ONLINE)
    assert res.performed and res.kind == "scheduled" and res.to_version == 2
    assert res.decision is not None and res.decision.kind == "scheduled"
    assert _records(app) == [("policy", 1, "baseline"), ("scheduled", None, "done")]
    assert "ScheduledRotation" in _key(app, 2).rotated_by
    assert inspection.snapshot(dsn, app.cfg).served_version == 1  # observedVersion stays
    # the same clock again: the new key is young, nothing is due (one per period)
    assert not app.engine().execute(at(created + age), ONLINE).performed
    events = [(e, d.get("kind")) for e, _, d in audit_events(dsn, app.cfg)]
    assert ("rotation_started", "scheduled") in events
    # a bump still rotates: the scheduled rotation served no policy version
    assert app.engine().rotate(2, ONLINE).performed
    app.assert_rotated()


def test_a_bump_during_a_scheduled_rotation_is_served_by_it(dsn: str) -> None:
    """The bump arrives while the scheduled rotation runs: that rotation serves it, so the
    final state has the one new key and observedVersion = the bump; nothing rotates again."""
    app = make_app(dsn, 1500)
    app.engine().initialise(policy_version=1)
    created = _key(app, 1).created_at
    age = timedelta(hours=1)
    calls = {"n": 0}

    def control() -> int | None:  # what the operator's Control returns between batches
        calls["n"] += 1
        return 2 if calls["n"] >= 3 else 1

    res = app.engine().execute(Request("policy", 1, now=created + age, max_key_age=age),
                               ONLINE.replace(workers=1), control=control)
    assert res.performed and res.to_version == 2
    assert _records(app) == [("policy", 1, "baseline"), ("policy", 2, "done")]
    assert inspection.snapshot(dsn, app.cfg).served_version == 2
    assert not app.engine().rotate(2, ONLINE).performed  # no rotation too many
    assert keys(dsn, app.cfg) == [(1, "retired", None), (2, "active", 2)]
    assert [e for e, _, _ in audit_events(dsn, app.cfg)].count("rotation_adopted") == 1


def test_a_schedule_due_during_a_bump_adds_no_rotation(dsn: str) -> None:
    app = make_app(dsn, 200)
    app.engine().initialise(policy_version=1)
    created = _key(app, 1).created_at
    age = timedelta(days=30)
    res = app.engine().execute(Request("policy", 2, now=created + age, max_key_age=age), ONLINE)
    assert res.performed and res.decision is not None and res.decision.kind == "policy"
    fresh = _key(app, 2).created_at
    again = app.engine().execute(Request("policy", 2, now=fresh + age - DAY,
                                         max_key_age=age), ONLINE)
    assert not again.performed  # the bump's key is fresh: the schedule starts over
    assert len(keys(dsn, app.cfg)) == 2


def test_usage_is_counted_and_a_key_near_its_bound_rotates_when_allowed(dsn: str) -> None:
    """Rotations count what they write; the library's writes are estimated from the
    targets' statistics (rows inserted or updated since the key was minted)."""
    app = make_app(dsn, 300)
    app.engine().rotate(2, ONLINE)
    assert _key(app, 2).encryptions == 300  # the rotation counted what it wrote
    with Encryptor(app_dsn(dsn), app.kek) as enc, psycopg.connect(app_dsn(dsn),
                                                                  autocommit=True) as conn:
        for _ in range(3):  # the application rewrites every row three times
            for i in app.expected[app.target]:
                value, kid = enc.encrypt(b"app-secret-rewritten")
                conn.execute("UPDATE secrets SET value = %s, key_id = %s WHERE id = %s",
                             (value, kid, i))
        conn.execute("SELECT pg_stat_force_next_flush()")
    for i in app.expected[app.target]:
        app.expected[app.target][i] = b"app-secret-rewritten"
    Lifecycle(dsn, app.cfg, actor="t").run(None, _now(dsn))  # the census
    assert _key(app, 2).encryptions >= 1200  # 300 by the rotation, 900 by the application
    limit = 1400  # 80% is 1120: near; 300 rows are under half of it: a rotation helps
    request = Request("policy", 2, now=_now(dsn), max_encryptions=limit, rotate_on_usage=True)
    res = app.engine().execute(request, ONLINE)
    assert res.performed, res.decision
    assert res.decision is not None and res.decision.reason == "UsageBound"
    Lifecycle(dsn, app.cfg, actor="t").run(None, _now(dsn))
    assert _key(app, 3).encryptions < 0.8 * limit  # the new key wrote each row once
    assert not app.engine().execute(request, ONLINE).performed
    app.assert_rotated()


# -- the end of a key's life -------------------------------------------------------------------
def test_disable_enable_then_destroy_after_the_waiting_period(dsn: str) -> None:
    app = make_app(dsn, 200)
    app.engine().rotate(2, ONLINE)  # v1 retired, no row under it
    life = Lifecycle(dsn, app.cfg, actor="retention")
    t0 = _now(dsn)
    # the census marks since when v1 has had no row; the plan is the dry run
    outcome = life.run(RETAIN, t0, apply=False)
    assert _key(app, 1).zero_rows_since is not None
    assert [(s.version, s.action, s.ready) for s in outcome.plan] == [(1, "disable", False)]
    planned = outcome.plan[0].due
    assert planned == _key(app, 1).zero_rows_since + RETAIN.disable_after

    # on time, the dry run's step happens
    outcome = life.run(RETAIN, planned)
    assert [(s.version, s.action) for s in outcome.done] == [(1, "disable")]
    assert _key(app, 1).state == "disabled"
    assert app.ring().versions == (2,)  # no ring unwraps it
    life.enable(1)
    assert _key(app, 1).state == "retired" and app.ring().versions == (1, 2)
    outcome = life.run(RETAIN, planned)
    assert [s.action for s in outcome.done] == ["disable"]
    destroy_at = _key(app, 1).destroy_after
    assert destroy_at == planned + RETAIN.destroy_after
    assert [(s.action, s.due) for s in life.run(RETAIN, planned, apply=False).plan] == [
        ("destroy", destroy_at)]
    with pytest.raises(KeyStateError, match="may be destroyed from"):
        life.destroy(1, destroy_at - timedelta(seconds=1))
    outcome = life.run(RETAIN, destroy_at)
    assert [(s.version, s.action) for s in outcome.done] == [(1, "destroy")]
    destroyed = _key(app, 1)
    assert destroyed.state == "destroyed" and destroyed.wrapped_dek == b""
    verify_audit(dsn, app.cfg)  # the chain still verifies
    events = [e for e, _, _ in audit_events(dsn, app.cfg)]
    assert events.count("key_disabled") == 2 and "key_enabled" in events
    assert events[-1] == "key_destroyed"
    app.assert_rotated()  # every row still reads back
    assert inspection.verify(dsn, app.cfg, app.kek).ok
    with pytest.raises(KeyStateError):
        life.enable(1)


def test_every_step_is_refused_while_a_row_references_the_key(dsn: str) -> None:
    app = make_app(dsn, 100)
    app.engine().rotate(2, ONLINE)
    life = Lifecycle(dsn, app.cfg, actor="t")
    life.disable(1, _now(dsn))
    held = read_rows(dsn, app.target)[1]
    with psycopg.connect(app_dsn(dsn), autocommit=True) as conn:  # a backup's row, restored
        conn.execute("UPDATE secrets SET key_id = 1 WHERE id = 1")
    with pytest.raises(KeyInUse, match=r"row 1 of public\.secrets still references it"):
        life.destroy(1, _now(dsn) + timedelta(days=8))
    with Encryptor(app_dsn(dsn), app.kek) as enc, pytest.raises(UnknownKeyError,
                                                              match="DEK v1 is disabled"):
        enc.decrypt(read_rows(dsn, app.target)[1][0], 1)
    life.enable(1)
    with pytest.raises(KeyInUse):
        life.disable(1, _now(dsn))
    with psycopg.connect(app_dsn(dsn), autocommit=True) as conn:
        conn.execute("UPDATE secrets SET key_id = %s WHERE id = 1", (held[1],))
    outcome = life.run(RETAIN, _now(dsn) + timedelta(days=30))
    assert _key(app, 1).state == "retired"  # zero rows only since the census just now
    assert outcome.done == ()


def test_the_cli_asks_for_confirmation_and_names_every_refusal(dsn: str) -> None:
    app = make_app(dsn, 50)
    app.engine().rotate(2, ONLINE)
    now = _now(dsn)
    proc = run_cli("keys", "disable", "1", dsn=dsn, kek=None)
    assert proc.returncode == 2 and "pass --confirm" in proc.stderr
    proc = run_cli("keys", "disable", "2", "--confirm", dsn=dsn, kek=None)
    assert proc.returncode == 2 and "only a retired key can be disabled" in proc.stderr
    proc = run_cli("keys", "disable", "1", "--confirm", dsn=dsn, kek=None)
    assert proc.returncode == 0 and "DEK v1 disabled" in proc.stdout, proc.stderr
    proc = run_cli("keys", "destroy", "1", dsn=dsn, kek=None)
    assert proc.returncode == 2 and "--confirm-destroy 1" in proc.stderr
    proc = run_cli("keys", "destroy", "1", "--confirm-destroy", "1", dsn=dsn, kek=None)
    assert proc.returncode == 2 and "may be destroyed from" in proc.stderr
    later = (now + timedelta(days=8)).isoformat()
    proc = run_cli("keys", "plan", "--disable-after-days", "7", "--assume-now", later,
                   dsn=dsn, kek=None)
    assert proc.returncode == 0 and "v1: destroy now" in proc.stdout, proc.stdout
    proc = run_cli("keys", "destroy", "1", "--confirm-destroy", "1", "--assume-now", later,
                   dsn=dsn, kek=None)
    assert proc.returncode == 0 and "DEK v1 destroyed" in proc.stdout, proc.stderr
    assert _key(app, 1).wrapped_dek == b""
    assert "Traceback" not in proc.stderr
    assert inspection.verify(dsn, app.cfg, app.kek).ok
    status = run_cli("status", dsn=dsn, kek=None).stdout
    assert "destroyed" in status
    assert datetime.now(UTC) > now  # the audit records the real time, not --assume-now
    stamped = [d for e, _, d in audit_events(dsn, app.cfg) if e == "key_destroyed"]
    assert stamped
