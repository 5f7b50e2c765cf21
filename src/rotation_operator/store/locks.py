"""The rotation lock: one rotator per keys table, and a loud stop when the lock is lost.

A session-level advisory lock covers every transaction of a long online rotation and is
released by PostgreSQL itself if the rotator dies (kill -9 included).  It lives on an idle
session, and idle sessions get killed: ``idle_session_timeout``, a NAT or load balancer
idle timer, ``pg_terminate_backend``.  Then a second rotator can take the lock while the
first still runs.  So the session has TCP keepalives and ``idle_session_timeout = 0``, a
heartbeat thread proves it alive every second, and the rotation checks :meth:`check`
between batches.  What the heartbeat cannot see in time, the fence does: every batch
proves its rotation record and key are still current (``KeyStore.check_fence``).

One cause, one reason: when the lock's session dies because the database itself went away
(a restart, a crash, a failover, unreachable), every connection of the rotation breaks and
whichever notices first must report the same thing, so :meth:`check` then raises
:class:`DatabaseUnavailable`, as a batch's or a worker's broken connection does.
:class:`LockLost` is only for this session ending while the database stayed up (killed,
an idle timer, a proxy): the one case in which another rotator can take the lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType

import psycopg

from rotation_operator.errors import DatabaseUnavailable, LockHeld, LockLost
from rotation_operator.policy.config import StoreConfig
from rotation_operator.store.database import Conn, connect, first_line
from rotation_operator.store.keystore import KeyStore

log = logging.getLogger(__name__)


class RotationLock:
    """``with RotationLock(dsn, cfg, wait=0) as lock: ... lock.check()``."""

    def __init__(self, dsn: str, cfg: StoreConfig, *, wait: float = 0.0,
                 heartbeat: float = 1.0) -> None:
        self._dsn = dsn
        self._cfg = cfg
        self._wait = wait
        self._interval = heartbeat
        self._conn: Conn | None = None
        self._key = 0
        self._lost: str | None = None
        self._lost_state: str | None = None  # the SQLSTATE the heartbeat saw, if any
        self._database_gone: bool | None = None  # why the session died, once looked at
        self._started: object = None  # the server's pg_postmaster_start_time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.backend_pid = 0

    def __enter__(self) -> RotationLock:
        conn = connect(self._dsn, application_name="rotation-operator-lock")
        try:
            conn.execute("SET idle_session_timeout = 0")
            self._key = KeyStore(self._cfg).lock_key(conn, "rotate")
            self._acquire(conn)
            self.backend_pid = conn.info.backend_pid
            self._started = _postmaster_started(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._thread = threading.Thread(target=self._beat, name="rotation-lock-heartbeat",
                                        daemon=True)
        self._thread.start()
        return self

    def _acquire(self, conn: Conn) -> None:
        deadline = time.monotonic() + self._wait
        while True:
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (self._key,)).fetchone()
            if row and row[0]:
                return
            if time.monotonic() >= deadline:
                raise LockHeld(f"another rotation of {self._cfg.qualified_keys} is running "
                               "(advisory lock held)")
            time.sleep(min(0.5, max(0.05, deadline - time.monotonic())))

    def _beat(self) -> None:
        conn = self._conn
        assert conn is not None
        while not self._stop.wait(self._interval):
            try:
                conn.execute("SELECT 1")
            except psycopg.Error as exc:
                self._lost_state = exc.sqlstate
                self._lost = first_line(exc)
                log.error("the session holding the rotation lock of %s is gone (%s); the "
                          "rotation stops at its next batch", self._cfg.qualified_keys,
                          self._lost)
                return

    @property
    def lost(self) -> bool:
        return self._lost is not None

    def check(self) -> None:
        """Raise if the lock's session died: :class:`DatabaseUnavailable` if the database
        went away with it, else :class:`LockLost` (see the module's docstring)."""
        if self._lost is None:
            return
        if self._database_gone is None:
            self._database_gone = self._went_away()
        if self._database_gone:
            raise DatabaseUnavailable(
                f"the database restarted or cannot be reached: the session holding the "
                f"rotation lock of {self._cfg.qualified_keys} ended ({self._lost}); the "
                "rotation resumes on the next attempt")
        raise LockLost(f"the session holding the rotation lock of "
                       f"{self._cfg.qualified_keys} was lost ({self._lost}); stopped so "
                       "that no other rotator interleaves; it resumes on the next attempt")

    def _went_away(self) -> bool:
        """Whether the database itself went away, not only the lock's session: decided by
        the cause, whenever it is looked at.  A crash of another backend (57P02) ends every
        session; otherwise a new session must reach the same server still running since the
        lock was taken (a restart or a failover changes its start time)."""
        if self._lost_state == "57P02":
            return True
        try:
            with connect(self._dsn, application_name="rotation-operator-lock-probe") as probe:
                started = _postmaster_started(probe)
        except (DatabaseUnavailable, psycopg.Error):
            return True
        return started is None or started != self._started

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self._interval + 10)
        conn = self._conn
        self._conn = None
        if conn is None:
            return
        try:
            if not conn.closed and self._lost is None:
                # If this fails the session ends below and PostgreSQL releases it anyway.
                conn.execute("SELECT pg_advisory_unlock(%s)", (self._key,))
        except psycopg.Error:
            pass
        finally:
            conn.close()


def rotation_lock_held(conn: Conn, cfg: StoreConfig) -> bool:
    """Whether some session holds the rotation lock of this keys table now: a rotation in
    progress, not one that stopped (``pg_locks``, which every role may read; taking the
    lock to find out would make a starting rotator fail with :class:`LockHeld`).  A
    bigint advisory key shows as its high and low 32 bits, ``objsubid`` 1."""
    key = KeyStore(cfg).lock_key(conn, "rotate") & 0xFFFF_FFFF_FFFF_FFFF
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND classid::int8 = %s AND objid::int8 = %s AND objsubid = 1)",
        (key >> 32, key & 0xFFFF_FFFF)).fetchone()
    return bool(row and row[0])


def _postmaster_started(conn: Conn) -> object:
    """When the server's postmaster started: another value means another server run."""
    row = conn.execute("SELECT pg_postmaster_start_time()").fetchone()
    return row[0] if row else None


#: (pid, virtual xid) of sessions in a transaction, and xids of prepared transactions.
InFlight = tuple[list[tuple[int, str]], list[str]]


def in_flight(conn: Conn, *exclude_pids: int | None) -> InFlight:
    """Every other session of this database in a transaction now (its virtual xid, which
    ``pg_locks`` shows to every role: the wait ``CREATE INDEX CONCURRENTLY`` does), and the
    database's prepared transactions.  Waiting for them all to end is a barrier: whatever
    they write is visible afterwards."""
    pids = [p for p in exclude_pids if p is not None]
    vxids = [(int(r[0]), str(r[1])) for r in conn.execute(
        "SELECT l.pid, l.virtualxid FROM pg_locks l JOIN pg_stat_activity a "
        "ON a.pid = l.pid WHERE l.locktype = 'virtualxid' AND l.mode = 'ExclusiveLock' "
        "AND l.granted AND a.usesysid IS NOT NULL AND a.datid = "
        "(SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND l.pid <> pg_backend_pid() AND NOT l.pid = ANY(%s::int[])", (pids,)).fetchall()]
    xids = [str(r[0]) for r in conn.execute(
        "SELECT transaction::text FROM pg_prepared_xacts "
        "WHERE database = current_database()").fetchall()]
    return vxids, xids


def still_open(conn: Conn, waiting: InFlight) -> int:
    """How many of the transactions :func:`in_flight` found are still open."""
    vxids, xids = waiting
    row = conn.execute(
        "SELECT (SELECT count(*) FROM pg_locks l JOIN unnest(%s::int[], %s::text[]) "
        "AS w(pid, vxid) ON l.pid = w.pid AND l.virtualxid = w.vxid "
        "WHERE l.locktype = 'virtualxid' AND l.granted) + (SELECT count(*) FROM "
        "pg_prepared_xacts WHERE transaction::text = ANY(%s::text[]))",
        ([v[0] for v in vxids], [v[1] for v in vxids], xids)).fetchone()
    return int(row[0]) if row else 0


def wait_for(conn: Conn, waiting: InFlight, timeout: float,
             sleep: Callable[[float], None] = time.sleep) -> int:
    """Wait up to ``timeout`` seconds for ``waiting`` to end; returns how many remain."""
    deadline = time.monotonic() + timeout
    while True:
        left = still_open(conn, waiting)
        if not left or time.monotonic() >= deadline:
            return left
        sleep(0.05)
