"""What the rotation's throttle reads: replicas' positions and sessions kept waiting.

Why statements of their own: these read the server's monitoring views
(``pg_stat_replication``, ``pg_locks``), which need other privileges than the tables do
and whose answers the throttle (:mod:`rotation_operator.rotation.throttle`) turns into
"slow down, and why".
"""

from __future__ import annotations

from psycopg import sql

from rotation_operator.store.database import Conn

#: Sessions waiting on a lock this backend holds: the application writers a batch keeps
#: waiting.  pg_locks is readable by every role (pg_stat_activity hides other roles' wait
#: events), and pg_blocking_pids, which takes the lock manager's partition locks, runs only
#: for the few lock requests not granted (the CASE makes that order certain), not for every
#: backend.  Executed by the mover inside each batch's transaction, before it commits.
BLOCKED = sql.SQL(
    "SELECT count(DISTINCT pid) FROM pg_locks WHERE CASE WHEN granted THEN false "
    "ELSE pg_backend_pid() = ANY(pg_blocking_pids(pid)) END")

#: (name, replay lag seconds, current WAL LSN, replay LSN, bytes behind)
ReplicaRow = tuple[str, float | None, str, str | None, float | None]


def may_read_replication(conn: Conn) -> tuple[bool, str]:
    """(whether this role sees the replicas' positions, the role's name)."""
    row = conn.execute(
        "SELECT pg_has_role('pg_read_all_stats', 'USAGE') OR rolsuper, current_user "
        "FROM pg_roles WHERE rolname = current_user").fetchone()
    return (True, "") if row is None else (bool(row[0]), str(row[1]))


def replicas(conn: Conn) -> list[ReplicaRow]:
    """Every connected physical streaming replica, as ``pg_stat_replication`` shows it."""
    rows = conn.execute(
        "SELECT coalesce(application_name, '') || '@' || coalesce(client_addr::text, "
        "'local'), extract(epoch FROM replay_lag)::float8, pg_current_wal_lsn()::text, "
        "replay_lsn::text, pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::float8 "
        "FROM pg_stat_replication r WHERE state IN ('streaming', 'catchup') "
        # physical standbys only: a logical consumer (a subscription, CDC) confirms
        # its position when it likes, and is no replica a failover would promote
        "AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = r.pid "
        "AND a.datid IS NOT NULL)").fetchall()
    return [(str(r[0]), r[1], str(r[2]), r[3], r[4]) for r in rows]


def current_wal_lsn(conn: Conn) -> str:
    row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return str(row[0])
