"""Connections to PostgreSQL and the one translation of its errors.

Why a module of its own: every layer that talks to the database (the store's modules,
and the engine, inspection and library that open its sessions) must connect the same way
(keepalives, so a NAT or a load balancer does not silently drop an idle session;
timeouts, so nothing waits forever), and every ``psycopg`` exception must reach users in
the same sanitized form.  A server message can carry a ``DETAIL:`` line quoting a whole
application row (``Failing row contains (...)``), and data errors quote the offending
input; neither may reach a log line, a condition or an Event.  :func:`translate` keeps the
SQLSTATE, the class and, only for classes whose primary message names objects rather than
values, that message.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import psycopg
from psycopg.conninfo import conninfo_to_dict

from rotation_operator.errors import (
    DatabaseError,
    DatabaseForbidden,
    DatabaseRejected,
    DatabaseUnavailable,
    LockTimeout,
    RotationOperatorError,
    ServerUnsupported,
    StatementTimeout,
)

Conn = psycopg.Connection[Any]
#: Oldest server the engine supports: TID range scans arrived in PostgreSQL 14.
MIN_SERVER_VERSION = 140000
#: TCP keepalives on every connection: a dropped peer is noticed within about 25 s, and
#: an idle session (the rotation lock's) is not reaped by a NAT or proxy idle timer.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
              "keepalives_count": 3}
#: The same on the server's side of each session, and a bound on unacknowledged data:
#: when the client's host vanishes (node lost, partition), its backend ends within about
#: 30 s instead of the kernel's two hours, and with it the rotation lock, the batch's
#: row locks and anything a new leader's resume would wait for.
SERVER_KEEPALIVES = ("-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 "
                     "-c tcp_keepalives_count=3 -c tcp_user_timeout=30000")
#: Transient conflicts a batch simply retries (application transactions hold its rows).
RETRYABLE = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
#: SQLSTATE classes whose primary message names objects (tables, roles, settings), never
#: row values: connection, auth, transaction rollback, syntax/access, resources, limits,
#: object state, operator intervention, system errors.
_SAFE_CLASSES = frozenset({"08", "0A", "25", "28", "3D", "3F", "40", "42", "53", "54", "55",
                           "57", "58"})


@dataclass(frozen=True)
class Timeouts:
    """Per-session limits for rotation statements (milliseconds; 0 = none)."""

    lock_ms: int = 0
    statement_ms: int = 0

    def options(self) -> str:
        # A rotation's connections sit idle between passes and while workers run: an
        # idle_session_timeout set for the role must not kill them.
        return (f"-c lock_timeout={self.lock_ms} -c statement_timeout={self.statement_ms} "
                "-c idle_in_transaction_session_timeout=0 -c idle_session_timeout=0")


def connect(dsn: str, *, autocommit: bool = True, application_name: str = "rotation-operator",
            timeouts: Timeouts | None = None) -> Conn:
    """Open a connection (autocommit: callers group writes with ``conn.transaction()``),
    mapping failures to :class:`DatabaseUnavailable`.

    The DSN is never put in the error: it may hold a password.
    """
    extra: dict[str, Any] = dict(KEEPALIVES)
    try:
        # The DSN's own ``options`` (e.g. a search_path) come first and are kept.
        own = str(conninfo_to_dict(dsn).get("options") or "")
    except psycopg.ProgrammingError as exc:  # malformed DSN
        raise DatabaseUnavailable(f"invalid database DSN: {type(exc).__name__}") from None
    ours = SERVER_KEEPALIVES if timeouts is None else f"{SERVER_KEEPALIVES} {timeouts.options()}"
    extra["options"] = f"{own} {ours}".strip()
    try:
        conn = psycopg.connect(dsn, autocommit=autocommit, connect_timeout=10,
                               application_name=application_name, **extra)
        # What the operator reports as done (a finished rotation, a rewrap under a new
        # KEK, a destroyed key) must be on disk when it says so, even where the database
        # or role sets synchronous_commit = off; a stricter setting (remote_apply, ...)
        # is kept.
        conn.execute("SELECT set_config('synchronous_commit', 'on', false) "
                     "WHERE current_setting('synchronous_commit') = 'off'")
        if not autocommit:
            conn.commit()
        return conn
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(f"cannot connect to PostgreSQL: {first_line(exc)}") from None
    except psycopg.ProgrammingError as exc:  # malformed DSN
        raise DatabaseUnavailable(f"invalid database DSN: {type(exc).__name__}") from None


def first_line(exc: BaseException) -> str:
    """The first line of a message: libpq puts DETAIL/HINT/CONTEXT on the lines after."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def raised_by_code(exc: psycopg.Error) -> bool:
    """True for an error a trigger or function raised itself (PL/pgSQL ``RAISE``): its
    SQLSTATE and message are whatever the author chose, so neither says it is safe."""
    diag = exc.diag
    return diag.source_function == "exec_stmt_raise" or (
        diag.source_file is not None and diag.source_file.startswith("pl_"))


def describe(exc: psycopg.Error) -> str:
    """A one-line description of a server error that cannot contain row values."""
    state = exc.sqlstate or ""
    diag = exc.diag
    name = type(exc).__name__
    if not state:  # a client-side or connection error: libpq's first line names no values
        return first_line(exc)
    if raised_by_code(exc):
        table = f" on table {diag.table_name}" if diag.table_name else ""
        return (f"a trigger or function raised SQLSTATE {state}{table} (its message is "
                "withheld: it may quote row values)")
    if state[:2] in _SAFE_CLASSES and diag.message_primary:
        return f"{diag.message_primary} (SQLSTATE {state})"
    where = [f"{what} {value}" for what, value in (
        ("constraint", diag.constraint_name), ("table", diag.table_name),
        ("column", diag.column_name)) if value]
    return f"{name} (SQLSTATE {state})" + (f" on {', '.join(where)}" if where else "")


def translate(exc: psycopg.Error) -> RotationOperatorError:
    """The package error for a psycopg exception, with a sanitized message."""
    text = describe(exc)
    if raised_by_code(exc):
        return DatabaseRejected(f"the database rejected the write: {text}")
    if isinstance(exc, psycopg.errors.LockNotAvailable):
        return LockTimeout(f"lock not granted within lock_timeout: {text}")
    if isinstance(exc, psycopg.errors.QueryCanceled):
        return StatementTimeout(f"statement cancelled: {text}")
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return DatabaseForbidden(f"the database role lacks a privilege: {text}")
    if isinstance(exc, psycopg.errors.IntegrityError | psycopg.errors.RaiseException):
        return DatabaseRejected(f"the database rejected the write: {text}")
    if _connection_lost(exc):
        return DatabaseUnavailable(f"database connection failed: {text}")
    return DatabaseError(f"database error: {text}")


def _connection_lost(exc: psycopg.Error) -> bool:
    """The session is gone (server restart, terminated backend, network), not the
    statement refused."""
    state = exc.sqlstate or ""
    # 57P01-57P03: terminated or shutting down; 57P05: idle_session_timeout; 25P03:
    # idle_in_transaction_session_timeout; 08: connection exceptions.
    if state in ("57P01", "57P02", "57P03", "57P05", "25P03") or state.startswith("08"):
        return True
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError) and not state


class db_errors:
    """Translate psycopg exceptions leaving the block into package errors."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> Literal[False]:
        if isinstance(exc, psycopg.Error):
            raise translate(exc) from None
        return False


def check_server(conn: Conn) -> None:
    """Refuse a server older than :data:`MIN_SERVER_VERSION` with a clear reason."""
    version = conn.info.server_version
    if version < MIN_SERVER_VERSION:
        major = version // 10000
        raise ServerUnsupported(f"PostgreSQL {major} is not supported: the rotation reads heap "
                                "block ranges with TID range scans, which need PostgreSQL 14 "
                                "or later")


def read_only_snapshot(conn: Conn) -> None:
    """The first statement of the caller's transaction: every read after it sees one
    snapshot (REPEATABLE READ) and nothing can be written."""
    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")


def transaction_time(conn: Conn) -> datetime | None:
    """When the caller's transaction started, by the server's clock (``now()``)."""
    row = conn.execute("SELECT now()").fetchone()
    return row[0] if row else None
