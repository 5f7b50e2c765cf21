"""Throttling (issue #11) on a real PostgreSQL with a real streaming standby: the rate
limit holds over all workers, a replica that falls behind pauses the batches until it
catches up, a replica that disappears stalls nothing, and a batch that keeps application
sessions waiting makes the rotation back off.  Every rotation here is also checked
lossless."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest

from rotation_operator.errors import DatabaseForbidden
from tests.fixtures.fix_app import ONLINE, App, active_version, in_thread, make_app
from tests.fixtures.roles import admin_dsn, app_dsn


class Seen:
    """The engine's callbacks: progress with timestamps, and every throttle report."""

    def __init__(self) -> None:
        self.progress: list[tuple[float, int]] = []
        self.throttle: list[tuple[float, str | None, str, float | None]] = []
        self.lock = threading.Lock()

    def on_progress(self, done: int, total: int) -> None:
        with self.lock:
            self.progress.append((time.monotonic(), done))

    def on_throttle(self, reason: str | None, message: str, lag: float | None) -> None:
        with self.lock:
            self.throttle.append((time.monotonic(), reason, message, lag))

    def reasons(self) -> list[str | None]:
        with self.lock:
            return [r for _, r, _, _ in self.throttle]

    def done(self) -> int:
        with self.lock:
            return self.progress[-1][1] if self.progress else 0


def _wait(predicate: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _rotate(app: App, seen: Seen, **options: Any) -> tuple[threading.Thread, dict[str, Any]]:
    opts = ONLINE.replace(**options)
    return in_thread(lambda: app.engine().rotate(2, opts, progress=seen.on_progress,
                                                 throttled=seen.on_throttle))


def test_rate_limit_holds_over_all_workers(dsn: str) -> None:
    rate = 2000
    app = make_app(dsn, 20_000, legacy_every=0)
    seen = Seen()
    t0 = time.monotonic()
    thread, out = _rotate(app, seen, max_rows_per_second=rate, workers=2)
    thread.join(120)
    assert "error" not in out, out.get("error")
    result = out["result"]
    assert result.re_encrypted == 20_000
    # The first pass moves every row: from the start to the last row moved.
    t_end = next(t for t, done in seen.progress if done >= 20_000)
    measured = 20_000 / (t_end - t0)
    assert 0.9 * rate <= measured <= 1.1 * rate, f"{measured:.0f} rows/s against {rate}"
    # a rate limit is a steady state, not a pause
    assert seen.reasons() == []
    app.assert_rotated()


def test_replica_lag_pauses_the_rotation_until_the_replica_catches_up(
        dsn: str, standby: Any, pg_monitor: None) -> None:
    app = make_app(dsn, 20_000, legacy_every=4)
    seen = Seen()
    standby.psql("SELECT pg_wal_replay_pause()")
    try:
        thread, out = _rotate(app, seen, max_replication_lag=1.0, max_rows_per_second=4000)
        _wait(lambda: "ReplicationLag" in seen.reasons(), 30, "the rotation to throttle")
        paused_at = seen.done()
        time.sleep(1.5)
        assert seen.done() == paused_at, "batches went on while the replica lagged"
        assert paused_at < 20_000
        lag_report = next(x for x in seen.throttle if x[1] == "ReplicationLag")
        assert lag_report[3] is not None and lag_report[3] > 1.0
        assert "replays" in lag_report[2] and "maxReplicationLag 1s" in lag_report[2]
    finally:
        standby.psql("SELECT pg_wal_replay_resume()")
    thread.join(120)
    assert "error" not in out, out.get("error")
    assert seen.reasons()[-1] is None, "the throttle never said it stopped waiting"
    assert out["result"].re_encrypted == 20_000
    app.assert_rotated()


def test_a_replica_that_disappears_does_not_stall_the_rotation(
        dsn: str, standby: Any, pg_monitor: None) -> None:
    """A replica that disconnects leaves pg_stat_replication: it is no longer waited for
    (its replication slot, if it has one, is PostgreSQL's and the DBA's concern)."""
    app = make_app(dsn, 20_000, legacy_every=0)
    seen = Seen()
    standby.psql("SELECT pg_wal_replay_pause()")
    thread, out = _rotate(app, seen, max_replication_lag=1.0, max_rows_per_second=4000)
    _wait(lambda: "ReplicationLag" in seen.reasons(), 30, "the rotation to throttle")
    standby.stop()
    thread.join(60)
    assert not thread.is_alive(), "the rotation stalled on a replica that is gone"
    assert "error" not in out, out.get("error")
    assert out["result"].re_encrypted == 20_000
    app.assert_rotated()


def test_replica_lag_needs_pg_monitor_and_says_so_before_minting(dsn: str) -> None:
    app = make_app(dsn, 100)
    with pytest.raises(DatabaseForbidden, match="GRANT pg_monitor TO"):
        app.engine().rotate(2, ONLINE.replace(max_replication_lag=5.0))
    assert active_version(dsn, app.cfg) == 1


def test_a_batch_that_blocks_application_sessions_makes_the_rotation_back_off(
        dsn: str) -> None:
    """A trigger holds the first batch (row 1 already locked by the UPDATE); an application
    session then waits on row 1 until that batch commits: the batch counts it, and the
    rotation backs off before the next one."""
    app = make_app(dsn, 600, legacy_every=0)
    with psycopg.connect(app_dsn(dsn), autocommit=True) as conn:
        conn.execute("""
            CREATE FUNCTION slow_first() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
              IF OLD.id = 1 AND OLD.key_id IS DISTINCT FROM NEW.key_id THEN
                PERFORM pg_sleep(1.5);
              END IF;
              RETURN NEW;
            END $$""")
        conn.execute("CREATE TRIGGER slow_first BEFORE UPDATE ON secrets FOR EACH ROW "
                     "EXECUTE FUNCTION slow_first()")
    seen = Seen()
    thread, out = _rotate(app, seen, max_blocked_sessions=0, workers=1)

    def sleeping() -> bool:
        with psycopg.connect(admin_dsn(dsn)) as conn:
            row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                               "current_database() AND wait_event = 'PgSleep'").fetchone()
        return bool(row and row[0])

    _wait(sleeping, 30, "the first batch to reach the trigger")
    with psycopg.connect(app_dsn(dsn), autocommit=True) as app_conn:
        app_conn.execute("SET lock_timeout = '20s'")
        app_conn.execute("UPDATE secrets SET value = value WHERE id = 1")  # waits, then runs
    thread.join(60)
    assert "error" not in out, out.get("error")
    load = [x for x in seen.throttle if x[1] == "Load"]
    assert load, seen.throttle
    assert "blocked 1 application sessions" in load[0][2]
    assert seen.reasons()[-1] is None
    app.assert_rotated()
