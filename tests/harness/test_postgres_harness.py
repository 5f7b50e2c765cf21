"""Smoke tests proving the PostgreSQL harness is a real, isolated, restartable server."""

from __future__ import annotations

import urllib.parse

import psycopg
import pytest

from tests.fixtures._env import testenv
from tests.fixtures.fix_db import PostgresServer

_seen_databases: set[str] = set()


def _dbname(dsn: str) -> str:
    return urllib.parse.urlsplit(dsn).path.lstrip("/")


def test_dsn_is_a_fresh_postgres_15_database(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        version = conn.execute("SHOW server_version").fetchone()
        current = conn.execute("SELECT current_database()").fetchone()
        tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchone()
    assert version is not None and version[0].startswith("15")
    assert current is not None and current[0] == _dbname(dsn)
    assert tables == (0,)


@pytest.mark.parametrize("run", [1, 2])
def test_each_test_gets_its_own_database(dsn: str, run: int) -> None:
    # Whichever run comes second would see the first run's name or table if the fixture
    # shared databases between tests.
    name = _dbname(dsn)
    assert name not in _seen_databases
    _seen_databases.add(name)
    with psycopg.connect(dsn) as conn:
        exists = conn.execute("SELECT to_regclass('public.leak') IS NOT NULL").fetchone()
        conn.execute("CREATE TABLE leak (run int)")
        conn.execute("INSERT INTO leak VALUES (%s)", (run,))
    assert exists == (False,)


def test_drop_database_terminates_leaked_sessions(postgres: PostgresServer) -> None:
    name = "t_harness_leaked_session"
    postgres.drop_database(name)
    leaked = psycopg.connect(postgres.create_database(name))
    try:
        postgres.drop_database(name)
        with psycopg.connect(postgres.dsn) as admin:
            row = admin.execute("SELECT count(*) FROM pg_database WHERE datname = %s",
                                (name,)).fetchone()
        assert row == (0,)
        with pytest.raises(psycopg.OperationalError):
            leaked.execute("SELECT 1")
    finally:
        leaked.close()


def test_restart_keeps_data_and_breaks_old_connections(
    dsn: str, pg_server: testenv.Postgres
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE survives (v text)")
        conn.execute("INSERT INTO survives VALUES ('before restart')")
    old = psycopg.connect(dsn, autocommit=True)
    try:
        started = old.execute("SELECT pg_postmaster_start_time()").fetchone()
        pg_server.restart()
        with pytest.raises(psycopg.OperationalError):
            old.execute("SELECT 1")
    finally:
        old.close()
    with psycopg.connect(dsn) as conn:
        restarted = conn.execute("SELECT pg_postmaster_start_time()").fetchone()
        rows = conn.execute("SELECT v FROM survives").fetchall()
    assert started is not None and restarted is not None and restarted[0] > started[0]
    assert rows == [("before restart",)]
