"""Key policy (issue #10) on a real PostgreSQL: scheduled rotations with an injected
clock, a bump that arrives during one, usage counts, and the end of a key's life: census,
disable, enable, destroy, each refused while a row references the key; the dry run is
what then happens."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from rotation_operator.errors import KeyInUse, KeyStateError, UnknownKeyError
from rotation_operator.library import Encryptor
from rotation_operator.policy.decisions import Request, Retention
from rotation_operator.rotation import inspection
from rotation_operator.rotation.lifecycle import Lifecycle
from rotation_operator.store.keystore import KeyStore
from tests.fixtures.fix_app import (
    ONLINE,
    App,
    audit_events,
    db_now,
    in_thread,
    keys,
    make_app,
    read_rows,
    relation_on_disk,
    run_cli,
    verify_audit,
)
from tests.fixtures.keks import keks
from tests.fixtures.roles import app_dsn

DAY = timedelta(days=1)
RETAIN = Retention(disable_after=timedelta(days=10), destroy_after=timedelta(days=7))



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
    Lifecycle(dsn, app.cfg, actor="t").run(None, db_now(dsn))  # the census
    assert _key(app, 2).encryptions >= 1200  # 300 by the rotation, 900 by the application
    limit = 1400  # 80% is 1120: near; 300 rows are under half of it: a rotation helps
    request = Request("policy", 2, now=db_now(dsn), max_encryptions=limit, rotate_on_usage=True)
    res = app.engine().execute(request, ONLINE)
    assert res.performed, res.decision
    assert res.decision is not None and res.decision.reason == "UsageBound"
    Lifecycle(dsn, app.cfg, actor="t").run(None, db_now(dsn))
    assert _key(app, 3).encryptions < 0.8 * limit  # the new key wrote each row once
    assert not app.engine().execute(request, ONLINE).performed
    app.assert_rotated()


# -- the end of a key's life -------------------------------------------------------------------
def test_disable_enable_then_destroy_after_the_waiting_period(dsn: str) -> None:
    app = make_app(dsn, 200)
    app.engine().rotate(2, ONLINE)  # v1 retired, no row under it
    life = Lifecycle(dsn, app.cfg, actor="retention")
    t0 = db_now(dsn)
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
    # enabling restarts the clock: the census starts it again, and the period runs anew
    assert life.run(RETAIN, planned).done == ()
    planned = _key(app, 1).zero_rows_since + RETAIN.disable_after
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
    assert inspection.verify(dsn, app.cfg, keks(app.kek)).ok
    with pytest.raises(KeyStateError):
        life.enable(1)


def test_every_step_is_refused_while_a_row_references_the_key(dsn: str) -> None:
    app = make_app(dsn, 100)
    app.engine().rotate(2, ONLINE)
    life = Lifecycle(dsn, app.cfg, actor="t")
    life.disable(1, db_now(dsn))
    held = read_rows(dsn, app.target)[1]
    with psycopg.connect(app_dsn(dsn), autocommit=True) as conn:  # a backup's row, restored
        conn.execute("UPDATE secrets SET key_id = 1 WHERE id = 1")
    with pytest.raises(KeyInUse, match=r"row 1 of public\.secrets still references it"):
        life.destroy(1, db_now(dsn) + timedelta(days=8))
    with Encryptor(app_dsn(dsn), app.kek) as enc, pytest.raises(UnknownKeyError,
                                                              match="DEK v1 is disabled"):
        enc.decrypt(read_rows(dsn, app.target)[1][0], 1)
    life.enable(1)
    with pytest.raises(KeyInUse):
        life.disable(1, db_now(dsn))
    with psycopg.connect(app_dsn(dsn), autocommit=True) as conn:
        conn.execute("UPDATE secrets SET key_id = %s WHERE id = 1", (held[1],))
    outcome = life.run(RETAIN, db_now(dsn) + timedelta(days=30))
    assert _key(app, 1).state == "retired"  # zero rows only since the census just now
    assert outcome.done == ()


def _age_disabled(dsn: str, *, days: int) -> None:
    """Let ``days`` pass for the disabled keys (their recorded times move back)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE encryption_keys SET disabled_at = disabled_at - %s, "
                     "destroy_after = destroy_after - %s WHERE state = 'disabled'",
                     (timedelta(days=days), timedelta(days=days)))


def test_the_cli_asks_for_confirmation_and_names_every_refusal(dsn: str) -> None:
    app = make_app(dsn, 50)
    app.engine().rotate(2, ONLINE)
    now = db_now(dsn)
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
    before = _key(app, 1)
    proc = run_cli("keys", "plan", "--disable-after-days", "7", "--assume-now", later,
                   dsn=dsn, kek=None)
    assert proc.returncode == 0 and "v1: destroy now" in proc.stdout, proc.stdout
    assert _key(app, 1) == before  # a rehearsal writes nothing
    proc = run_cli("keys", "destroy", "1", "--confirm-destroy", "1", "--assume-now", later,
                   dsn=dsn, kek=None)
    assert proc.returncode == 2 and "--assume-now" in proc.stderr  # only plan rehearses
    _age_disabled(dsn, days=8)  # eight days pass
    proc = run_cli("keys", "destroy", "1", "--confirm-destroy", "1", dsn=dsn, kek=None)
    assert proc.returncode == 0 and "DEK v1 destroyed" in proc.stdout, proc.stderr
    assert _key(app, 1).wrapped_dek == b""
    assert "Traceback" not in proc.stderr
    assert inspection.verify(dsn, app.cfg, keks(app.kek)).ok
    status = run_cli("status", dsn=dsn, kek=None).stdout
    assert "destroyed" in status
    assert datetime.now(UTC) > now  # the audit records the real time, not --assume-now
    stamped = [d for e, _, d in audit_events(dsn, app.cfg) if e == "key_destroyed"]
    assert stamped


# -- review findings: what must never happen by itself ------------------------------------
def _disable_and_age(dsn: str, app: App, days: int) -> Lifecycle:
    life = Lifecycle(dsn, app.cfg, actor="t")
    life.disable(1, db_now(dsn))
    _age_disabled(dsn, days=days)
    return life


def test_a_key_disabled_by_hand_is_destroyed_by_no_timer(dsn: str) -> None:
    app = make_app(dsn, 50)
    app.engine().rotate(2, ONLINE)
    proc = run_cli("keys", "disable", "1", "--confirm", dsn=dsn, kek=None)
    assert proc.returncode == 0 and "nothing destroys it but" in proc.stdout, proc.stderr
    assert _key(app, 1).destroy_after is None
    life = Lifecycle(dsn, app.cfg, actor="t")
    later = db_now(dsn) + timedelta(days=400)
    outcome = life.run(None, later)
    assert outcome.plan == () and _key(app, 1).state == "disabled"
    # a policy's own waiting period counts from the disable, whatever was stored
    slow = Retention(disable_after=timedelta(days=10), destroy_after=timedelta(days=30))
    _age_disabled(dsn, days=8)
    assert life.run(slow, db_now(dsn)).done == ()
    assert _key(app, 1).state == "disabled"
    _age_disabled(dsn, days=23)
    assert [s.action for s in life.run(slow, db_now(dsn)).done] == ["destroy"]
    assert _key(app, 1).state == "destroyed"


def test_the_cli_must_name_every_target_the_keys_table_covers(dsn: str) -> None:
    from rotation_operator.policy.config import Target

    app = make_app(dsn, 40, targets=(Target("secrets"), Target("tokens")))
    app.engine().rotate(2, ONLINE)
    with psycopg.connect(app_dsn(dsn), autocommit=True) as conn:  # a row of tokens on v1
        conn.execute("UPDATE tokens SET key_id = 1 WHERE id = 1")
    proc = run_cli("keys", "disable", "1", "--confirm", dsn=dsn, kek=None)  # secrets only
    assert proc.returncode != 0 and "covers" in proc.stderr, proc.stderr
    assert _key(app, 1).state == "retired"
    proc = run_cli("keys", "disable", "1", "--confirm", "--target", "secrets",
                   "--target", "tokens", dsn=dsn, kek=None)
    assert proc.returncode != 0 and "row 1 of public.tokens still references it" in \
        proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_writer_in_flight_cannot_slip_a_row_past_a_destroy(dsn: str) -> None:
    app = make_app(dsn, 50)
    app.engine().rotate(2, ONLINE)
    life = _disable_and_age(dsn, app, days=8)
    old = read_rows(dsn, app.target)[1][0]
    with psycopg.connect(app_dsn(dsn)) as writer:  # a restore in flight, not yet committed
        writer.execute("UPDATE secrets SET value = %s, key_id = 1 WHERE id = 2", (old,))
        thread, out = in_thread(lambda: life.destroy(1, db_now(dsn)))
        thread.join(1.5)
        assert thread.is_alive(), "the destroy did not wait for the transaction in flight"
        writer.commit()
    thread.join(30)
    assert isinstance(out.get("error"), KeyInUse), out
    assert "row 2 of public.secrets still references it" in str(out["error"])
    assert _key(app, 1).state == "disabled" and _key(app, 1).wrapped_dek != b""


def test_rows_under_a_destroyed_key_stop_rotations_before_anything_is_minted(dsn: str) -> None:
    from rotation_operator.errors import RowsUnderUnusableKey

    app = make_app(dsn, 50)
    app.engine().rotate(2, ONLINE)
    old = read_rows(dsn, app.target)[3][0]
    life = _disable_and_age(dsn, app, days=8)
    life.destroy(1, db_now(dsn))
    with psycopg.connect(app_dsn(dsn), autocommit=True) as conn:  # an old backup's row
        conn.execute("UPDATE secrets SET value = %s, key_id = 1 WHERE id = 3", (old,))
    with pytest.raises(RowsUnderUnusableKey, match=r"row 3 of public\.secrets is under DEK "
                                                   r"v1, which is destroyed"):
        app.engine().rotate(3, ONLINE)
    assert [k[0] for k in keys(dsn, app.cfg)] == [1, 2]


def test_a_destroyed_dek_is_gone_from_every_page_of_the_keys_table(dsn: str) -> None:
    """Read the keys table's files as the superuser, after a checkpoint: a plain UPDATE
    would leave the old row version, and a plain VACUUM its bytes."""

    app = make_app(dsn, 20)
    app.engine().rotate(2, ONLINE)
    wrapped = _key(app, 1).wrapped_dek
    life = _disable_and_age(dsn, app, days=8)

    def on_disk() -> bytes:
        return relation_on_disk(dsn, "public.encryption_keys")

    assert wrapped in on_disk()  # the check can see it
    life.destroy(1, db_now(dsn))
    assert wrapped not in on_disk()
    verify_audit(dsn, app.cfg)  # raises if the chain is broken


def test_usage_of_key_v1_counts_the_library_writes_too(dsn: str) -> None:
    app = make_app(dsn, 100, legacy_every=0)
    with psycopg.connect(app_dsn(dsn), autocommit=True) as conn:
        for _ in range(3):
            conn.execute("UPDATE secrets SET value = value")  # 300 more encryptions
    import time

    time.sleep(1.0)  # the writes reach the statistics
    Lifecycle(dsn, app.cfg, actor="t").run(None, db_now(dsn))
    assert _key(app, 1).encryptions >= 400


def test_enable_restarts_the_zero_rows_clock(dsn: str) -> None:
    app = make_app(dsn, 30)
    app.engine().rotate(2, ONLINE)
    life = Lifecycle(dsn, app.cfg, actor="t")
    life.run(None, db_now(dsn))
    assert _key(app, 1).zero_rows_since is not None
    life.disable(1, db_now(dsn))
    life.enable(1)
    assert _key(app, 1).zero_rows_since is None
    assert life.run(RETAIN, db_now(dsn)).done == ()  # not disabled again at once


def test_a_resumed_scheduled_rotation_adopts_a_bump_known_before_its_first_batch(
        dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Interrupted scheduled rotation; spec.version is bumped meanwhile; the reconcile that
    resumes it serves the bump with it: one rotation, not two."""
    from rotation_operator.crypto.kek import as_kek
    from rotation_operator.operator import kube, workflow
    from rotation_operator.operator.secrets import Keks
    from rotation_operator.operator.settings import OperatorSettings
    from rotation_operator.operator.spec import Policy
    from rotation_operator.operator.writer import StatusWriter

    app = make_app(dsn, 300)
    app.engine().initialise(policy_version=1)
    created = _key(app, 1).created_at

    class Stop(Exception):
        pass

    def stop(done: int, total: int) -> None:
        if done >= 100:
            raise Stop

    age = timedelta(seconds=10)
    with pytest.raises(Stop):
        app.engine().execute(Request("policy", 1, now=created + age, max_key_age=age),
                             ONLINE.replace(workers=1), progress=stop)
    spec = {"version": 2, "targets": [{"table": "secrets"}],
            "rotation": {"vacuum": False, "graceSeconds": 0, "batchSize": 100,
                         "maxKeyAge": "1h"}}
    monkeypatch.setattr(kube, "patch_status", lambda *a, **k: None)
    monkeypatch.setattr(kube, "get_policy", lambda ns, n: {
        "metadata": {"generation": 1, "uid": "", "resourceVersion": "1"}, "spec": spec,
        "status": {}})

    class Events:
        def info(self, reason: str, message: str) -> None: ...
        def warn(self, reason: str, message: str) -> None: ...

    policy = Policy("ns", "app", 1, spec, {})
    workflow._reconcile(policy, OperatorSettings(), Events(), StatusWriter(policy),
                        dsn, Keks(as_kek(app.kek), [], []), policy.store_config(),
                        policy.options())
    assert [(k[0], k[2]) for k in keys(dsn, app.cfg)] == [(1, None), (2, 2)]
    with psycopg.connect(dsn) as conn:
        records = [(r.kind, r.requested_version, r.phase)
                   for r in KeyStore(app.cfg).rotation_records(conn)]
    assert records == [("policy", 1, "baseline"), ("policy", 2, "done")]


def test_the_timer_sweeps_rows_under_a_retired_key_even_when_a_schedule_is_due_and_behind(
        dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A review finding: with spec.version below the served version and maxKeyAge past, a
    refresh that let a due schedule take precedence started a reconcile that could not act
    (BEHIND) and swept nothing, tick after tick.  The timer sweeps first, then looks at the
    schedule."""
    import base64

    from rotation_operator.operator import kube, leader
    from rotation_operator.operator import refresh as timer
    from rotation_operator.operator.settings import OperatorSettings
    from rotation_operator.operator.spec import Policy
    from tests.fixtures.fix_app import fill, not_under_active

    app = make_app(dsn, 50, legacy_every=0)
    app.engine().initialise(policy_version=1)
    old_ring = app.ring()
    app.engine().rotate(2, ONLINE)
    app.expected[app.target].update(
        fill(dsn, app.target, app.kek, 5, ring=old_ring, legacy_every=0, start=1000))
    assert not_under_active(dsn, app.cfg) == 5  # written under the retired v1
    spec = {"version": 1, "kek": {"secretRef": {"name": "kek"}},
            "database": {"secretRef": {"name": "db"}}, "targets": [{"table": "secrets"}],
            "rotation": {"vacuum": False, "graceSeconds": 0, "maxKeyAge": "1h"}}
    secrets = {"kek": base64.b64encode(app.kek), "db": dsn.encode()}
    monkeypatch.setattr(kube, "read_secret", lambda ns, name, key, what: secrets[name])
    monkeypatch.setattr(kube, "patch_status", lambda *a, **k: None)
    monkeypatch.setattr(kube, "get_policy", lambda ns, n: {
        "metadata": {"generation": 1, "uid": "", "resourceVersion": "1"}, "spec": spec,
        "status": {"observedVersion": 2}})
    monkeypatch.setattr(leader, "may_act", lambda: True)
    reconciled: list[Policy] = []
    monkeypatch.setattr(timer, "reconcile", lambda policy, *a, **k: reconciled.append(policy))

    class Events:
        def __init__(self) -> None:
            self.seen: list[str] = []

        def info(self, reason: str, message: str) -> None:
            self.seen.append(reason)

        def warn(self, reason: str, message: str) -> None:
            self.seen.append(reason)

    events = Events()
    policy = Policy("ns", "app", 1, spec, {"observedVersion": 2})
    assert timer.refresh(policy, events, OperatorSettings(), db_now(dsn) + timedelta(hours=2))
    assert not_under_active(dsn, app.cfg) == 0  # swept onto v2
    assert "StaleRowsSwept" in events.seen
    assert len(reconciled) == 1  # and then the schedule, which is the reconcile's to judge
    app.assert_rotated()
