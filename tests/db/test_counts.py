"""Cheap counts for the periodic status (issue #11): estimates from the statistics scan
nothing, stay close to the exact counts, say what they are, and never start a key's
zero-rows clock (only an exact count may)."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import psycopg

from rotation_operator.rotation import inspection
from rotation_operator.rotation.lifecycle import Lifecycle
from tests.fixtures.fix_app import ONLINE, keys, make_app
from tests.fixtures.roles import admin_dsn, app_dsn


def _scans(dsn: str) -> int:
    with psycopg.connect(admin_dsn(dsn)) as conn:
        row = conn.execute("SELECT seq_scan + coalesce(idx_scan, 0) FROM pg_stat_all_tables "
                           "WHERE relid = 'public.secrets'::regclass").fetchone()
    assert row is not None
    return int(row[0])


def _settled_scans(dsn: str, before: int) -> int:
    """The scan count once the session statistics have been flushed (up to 3 s)."""
    end = time.monotonic() + 3
    now = _scans(dsn)
    while now == before and time.monotonic() < end:
        time.sleep(0.2)
        now = _scans(dsn)
    return now


def _analyze(dsn: str) -> None:
    with psycopg.connect(app_dsn(dsn), autocommit=True) as conn:
        conn.execute("ANALYZE secrets")


def test_estimates_scan_nothing_and_stay_close_to_the_exact_counts(dsn: str) -> None:
    app = make_app(dsn, 4000, legacy_every=4)
    app.engine().rotate(2, ONLINE)
    with psycopg.connect(app_dsn(dsn), autocommit=True) as conn:  # some rows under v1 again
        conn.execute("UPDATE secrets SET key_id = 1 WHERE id <= 400")
    _analyze(dsn)
    time.sleep(1.0)  # let the statistics of the UPDATE and ANALYZE land
    exact = inspection.snapshot(dsn, app.cfg)
    assert exact.exact and exact.summary()["counts"]["kind"] == "Exact"
    before = _settled_scans(dsn, -1)
    est = inspection.snapshot(dsn, app.cfg, exact=False, exact_below=0)
    assert not est.exact
    counts = est.summary()["counts"]
    assert counts["kind"] == "Estimated" and counts["lastExactAt"] is None
    time.sleep(1.5)
    assert _scans(dsn) == before, "an estimated snapshot scanned the table"
    assert abs(est.secret_count - 4000) <= 40
    for k_exact, k_est in zip(exact.keys, est.keys, strict=True):
        assert abs(k_exact.rows - k_est.rows) <= 40, (exact.keys, est.keys)
    assert abs(est.retired_count - exact.retired_count) <= 40 and est.retired_count > 0
    # and the exact snapshot does scan (so the check above can fail)
    inspection.snapshot(dsn, app.cfg)
    assert _settled_scans(dsn, before) > before


def test_a_heap_without_statistics_or_under_the_threshold_is_counted_exactly(
        dsn: str) -> None:
    app = make_app(dsn, 500, legacy_every=5)
    small = inspection.snapshot(dsn, app.cfg, exact=False)  # 500 rows < 100000
    assert small.exact and small.secret_count == 500 and small.legacy_count == 100
    never = inspection.snapshot(dsn, app.cfg, exact=False, exact_below=0)  # not analysed
    assert never.exact and never.secret_count == 500


def test_estimated_counts_never_start_a_zero_rows_clock(dsn: str) -> None:
    app = make_app(dsn, 300, legacy_every=0)
    app.engine().rotate(2, ONLINE)
    now = datetime.now(UTC)
    life = Lifecycle(dsn, app.cfg, actor="test")
    life.run(None, now, {1: 0, 2: 300}, exact=False)
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT zero_rows_since FROM encryption_keys WHERE version = 1"
                           ).fetchone()
    assert row is not None and row[0] is None
    life.run(None, now, {1: 0, 2: 300}, exact=True)
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT zero_rows_since FROM encryption_keys WHERE version = 1"
                           ).fetchone()
    assert row is not None and row[0] is not None
    # an estimate that sees rows under the key again stops the clock
    life.run(None, now, {1: 5, 2: 295}, exact=False)
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT zero_rows_since FROM encryption_keys WHERE version = 1"
                           ).fetchone()
    assert row is not None and row[0] is None
    assert [k[0] for k in keys(dsn, app.cfg)] == [1, 2]


def test_statistics_older_than_the_last_rotation_put_every_row_under_the_active_key(
        dsn: str) -> None:
    """The operator's role may not ANALYZE the application's table: after a rotation the
    planner's statistics still say "every row under v1".  The estimate must not believe
    them (a refresh would report retired-key rows and sweep with full scans every minute
    until autovacuum analyses the table)."""
    app = make_app(dsn, 3000, legacy_every=0)
    app.engine().rotate(2, ONLINE)
    _analyze(dsn)  # statistics: every row under v2
    app.engine().rotate(3, ONLINE)  # the engine's role does not own the table: no ANALYZE
    time.sleep(1.0)
    with psycopg.connect(admin_dsn(dsn)) as conn:
        row = conn.execute("SELECT most_common_vals::text FROM pg_stats WHERE tablename = "
                           "'secrets' AND attname = 'key_id'").fetchone()
    assert row is not None and row[0] == "{2}", row  # the statistics are indeed out of date
    est = inspection.snapshot(dsn, app.cfg, exact=False, exact_below=0)
    assert not est.exact
    assert est.retired_count == 0 and est.stale_count == 0, est.keys
    assert abs(est.secret_count - 3000) <= 30
    assert {k.version: k.rows for k in est.keys if k.rows} == {3: est.secret_count}
    # once analysed after the rotation, the statistics are believed again
    with psycopg.connect(app_dsn(dsn), autocommit=True) as conn:
        conn.execute("UPDATE secrets SET key_id = 2 WHERE id <= 300")
    _analyze(dsn)
    time.sleep(1.0)
    est = inspection.snapshot(dsn, app.cfg, exact=False, exact_below=0)
    assert 250 <= {k.version: k.rows for k in est.keys}.get(2, 0) <= 350, est.keys
