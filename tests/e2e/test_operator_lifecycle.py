"""Key policy through the real operator (issue #10): a short maxKeyAge fires exactly one
scheduled rotation per period, a bump during a scheduled rotation is served by it, and
status shows the census, the next rotation due and the retention dry run."""

from __future__ import annotations

import itertools
import time
from datetime import datetime, timedelta
from typing import Any

import psycopg

from tests.fixtures import roles
from tests.fixtures.fix_operator import App, MakeApp, StartOperator, eventually

AGE = 20  # seconds: short enough for a test, long against the 2 s refresh


def _ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _slow_down(app: App) -> None:
    with psycopg.connect(roles.app_dsn(app.dsn), autocommit=True) as conn:
        conn.execute("CREATE FUNCTION slow_rows() RETURNS trigger LANGUAGE plpgsql AS "
                     "$$ BEGIN PERFORM pg_sleep(0.004); RETURN NEW; END $$")
        conn.execute("CREATE TRIGGER slow_rows BEFORE UPDATE ON secrets FOR EACH ROW "
                     "EXECUTE FUNCTION slow_rows()")


def test_a_short_max_key_age_fires_one_scheduled_rotation_per_period(
        namespace: str, dsn: str, make_app: MakeApp, start_operator: StartOperator) -> None:
    app = make_app(namespace, dsn, rows=150, legacy=20,
                   rotation={"maxKeyAge": f"{AGE}s", "graceSeconds": 0})
    start_operator([namespace])
    obj = app.wait_condition("Ready", "True")
    v1 = next(k for k in app.key_rows() if k["version"] == 1)
    due = _ts(obj["status"]["nextRotationDue"])
    assert abs((due - v1["created_at"]).total_seconds() - AGE) < 1.5
    started = time.monotonic()
    eventually(lambda: len(app.key_rows()) >= 3, timeout=3 * AGE + 20, interval=0.5,
               what="two scheduled rotations")
    elapsed = time.monotonic() - started
    time.sleep(AGE / 4)  # and no third one right after the second
    keys = app.key_rows()
    assert [k["version"] for k in keys] == [1, 2, 3], keys
    gaps = [(b["created_at"] - a["created_at"]).total_seconds()
            for a, b in itertools.pairwise(keys)]
    assert all(AGE <= g < AGE + 10 for g in gaps), gaps  # once per period, never early
    assert all("ScheduledRotation" in k["rotated_by"] and k["policy_version"] is None
               for k in keys[1:])
    status = app.status()
    assert status["observedVersion"] == 1  # scheduled rotations serve no spec.version
    assert status["activeKeyVersion"] == 3
    assert abs((_ts(status["nextRotationDue"]) - keys[2]["created_at"]).total_seconds()
               - AGE) < 1.5
    assert app.rotations()[-1][:2] == (None, "done")
    started_events = [e["message"] for e in app.events(reason="RotationStarted")]
    assert sum("older than maxKeyAge" in m for m in started_events) == 2
    app.assert_intact()
    assert elapsed < 3 * AGE + 20


def test_a_bump_during_a_scheduled_rotation_is_served_by_it(
        namespace: str, dsn: str, make_app: MakeApp, start_operator: StartOperator) -> None:
    app = make_app(namespace, dsn, rows=1500, legacy=100, batch_size=100, workers=1,
                   rotation={"maxKeyAge": f"{AGE}s"})
    _slow_down(app)
    start_operator([namespace])
    app.wait_condition("Ready", "True")

    def scheduled_running() -> bool:
        rows = app.rotations()
        return bool(rows) and rows[-1][1] == "running" and rows[-1][0] is None
    eventually(scheduled_running, timeout=AGE + 30, interval=0.2,
               what="the scheduled rotation to start")
    app.patch_spec({"version": 2})
    obj = app.wait_condition("Ready", "True", timeout=120)
    assert obj["status"]["observedVersion"] == 2
    keys = app.key_rows()
    assert [(k["version"], k["state"], k["policy_version"]) for k in keys] == [
        (1, "retired", 1), (2, "active", 2)]  # one rotation, adopted by the bump
    assert [r[:2] for r in app.rotations()] == [(1, "baseline"), (2, "done")]
    time.sleep(4)  # a refresh or two: nothing rotates again (the key is fresh)
    assert len(app.key_rows()) == 2
    app.assert_intact()


def test_status_shows_the_census_and_the_retention_dry_run(
        namespace: str, dsn: str, make_app: MakeApp, start_operator: StartOperator) -> None:
    app = make_app(namespace, dsn, rows=60, legacy=10)
    start_operator([namespace])
    app.wait_condition("Ready", "True")
    app.patch_spec({"version": 2, "retention": {"disableAfterDays": 7, "destroyAfterDays": 7}})
    app.wait_condition("Ready", "True", "RotationSucceeded")

    def planned() -> dict[str, Any] | None:
        status = app.status()
        steps = (status.get("retention") or {}).get("steps") or []
        return status if steps else None
    status = eventually(planned, timeout=20, what="the retention plan in status")
    v1 = next(k for k in status["keys"] if k["version"] == 1)
    assert v1["state"] == "retired" and v1["zeroRowsSince"]
    assert status["retention"]["steps"] == [{
        "version": 1, "action": "disable", "ready": False,
        "due": (_ts(v1["zeroRowsSince"]) + timedelta(days=7)).strftime("%Y-%m-%dT%H:%M:%SZ")}]
    v2 = next(k for k in status["keys"] if k["version"] == 2)
    assert v2["encryptions"] >= 60


def test_rotate_on_usage_rotates_once_through_the_operator(
        namespace: str, dsn: str, make_app: MakeApp, start_operator: StartOperator) -> None:
    """The library's writes count (estimated from the statistics): near the bound the
    policy rotates by itself, once; the fresh key starts its count from the rotation."""
    app = make_app(namespace, dsn, rows=100, legacy=0,
                   rotation={"maxEncryptionsPerKey": 1000, "rotateOnUsage": True,
                             "graceSeconds": 0})
    start_operator([namespace])
    app.wait_condition("Ready", "True")
    with psycopg.connect(roles.app_dsn(app.dsn), autocommit=True) as conn:
        for _ in range(8):  # 800 more values written under v1: 900 of 1000
            conn.execute("UPDATE secrets SET value = value")
    eventually(lambda: app.active_version() == 2, timeout=40, interval=0.5,
               what="a rotation for usage")
    obj = app.wait_condition("Ready", "True", timeout=60)
    keys = app.key_rows()
    assert "UsageBound" in keys[1]["rotated_by"] and keys[1]["policy_version"] is None
    assert obj["status"]["observedVersion"] == 1
    time.sleep(6)  # a few refreshes: the new key is far from its bound, nothing more
    assert len(app.key_rows()) == 2
    app.assert_intact()
