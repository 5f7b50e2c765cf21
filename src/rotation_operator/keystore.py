"""The SQL side of the key store: own tables, keys, rotation records, targets, counts.

Only this module and :mod:`.audit` write SQL.  Every name from a spec is passed through
``psycopg.sql.Identifier`` (and was validated by :mod:`.config` before); every value is a
query parameter.  Functions take an open connection and run in the caller's transaction
unless they say otherwise, so the engine decides what commits together.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import psycopg
from psycopg import sql

from . import audit, crypto
from .config import StoreConfig, Target
from .errors import (
    DatabaseUnavailable,
    InvalidToken,
    KekMismatchError,
    LockHeld,
    RotationOperatorError,
    SchemaError,
)
from .keyring import KeyRing

Conn = psycopg.Connection[Any]
SCHEMA_VERSION = 1
KEY_INT_TYPES = ("smallint", "integer", "bigint")
#: Transient conflicts a batch simply retries (application transactions hold its rows).
RETRYABLE = (psycopg.errors.DeadlockDetected, psycopg.errors.LockNotAvailable,
             psycopg.errors.SerializationFailure)


def connect(dsn: str, *, autocommit: bool = True, application_name: str = "rotation-operator"
            ) -> Conn:
    """Open a connection (autocommit: callers group writes with ``conn.transaction()``),
    mapping failures to :class:`DatabaseUnavailable`.

    The DSN is never put in the error: it may hold a password.
    """
    try:
        return psycopg.connect(dsn, autocommit=autocommit, connect_timeout=10,
                               application_name=application_name)
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(f"cannot connect to PostgreSQL: {first_line(exc)}") from None
    except psycopg.ProgrammingError as exc:  # malformed DSN
        raise DatabaseUnavailable(f"invalid database DSN: {type(exc).__name__}") from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def ident(schema: str | None, name: str) -> sql.Identifier:
    return sql.Identifier(schema, name) if schema else sql.Identifier(name)


def lock_id(cfg: StoreConfig, purpose: str, qualified: str | None = None) -> int:
    """A stable 64-bit advisory-lock key for this keys table (``qualified``: its name as
    resolved by :func:`lock_key`) and purpose."""
    name = qualified or cfg.qualified_keys
    digest = hashlib.sha256(f"rotation-operator:{purpose}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def lock_key(conn: Conn, cfg: StoreConfig, purpose: str) -> int:
    """:func:`lock_id` of the keys table as PostgreSQL resolves its name.

    ``encryption_keys`` (found through the search_path) and ``public.encryption_keys`` are
    one table, so they must be one lock: an operator without ``schema`` and a CLI run with
    ``--schema public`` would otherwise rotate the same keys at once.
    """
    if cfg.schema:
        return lock_id(cfg, purpose)
    row = conn.execute(
        "SELECT coalesce((SELECT n.nspname FROM pg_class c JOIN pg_namespace n "
        "ON n.oid = c.relnamespace WHERE c.oid = to_regclass(quote_ident(%s))), "
        "current_schema())", (cfg.keys_table,)).fetchone()
    schema = row[0] if row else None
    return lock_id(cfg, purpose, f"{schema}.{cfg.keys_table}" if schema else None)


@dataclass(frozen=True)
class KeyRecord:
    version: int
    wrapped_dek: bytes = field(repr=False)
    kek_fingerprint: str
    state: str
    rotated_by: str
    policy_version: int | None
    created_at: datetime
    retired_at: datetime | None


@dataclass(frozen=True)
class RotationRecord:
    requested_version: int
    phase: str  # baseline | running | done | superseded
    mode: str | None
    from_version: int | None
    to_version: int
    requested_by: str
    started_at: datetime
    finished_at: datetime | None
    re_encrypted: int
    total: int


class KeyStore:
    """The tables of one keys table: keys, rotations, audit."""

    def __init__(self, cfg: StoreConfig):
        self.cfg = cfg
        self.keys = ident(cfg.schema, cfg.keys_table)
        self.rotations = ident(cfg.schema, cfg.rotations_table)
        self.one_active = sql.Identifier(f"{cfg.keys_table}_one_active")

    # -- schema --------------------------------------------------------------------------
    def migrate(self, conn: Conn) -> None:
        """Create or upgrade the operator's own tables; idempotent, safe concurrently."""
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)",
                         (lock_key(conn, self.cfg, "migrate"),))
            if self.cfg.schema:
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
                    sql.Identifier(self.cfg.schema)))
            conn.execute(sql.SQL(
                """CREATE TABLE IF NOT EXISTS {keys} (
                    version integer PRIMARY KEY CHECK (version > 0),
                    wrapped_dek bytea NOT NULL,
                    kek_fingerprint text NOT NULL,
                    state text NOT NULL CHECK (state IN ('active', 'retiring', 'retired')),
                    active boolean GENERATED ALWAYS AS (state = 'active') STORED,
                    rotated_by text NOT NULL,
                    policy_version bigint,
                    created_at timestamptz NOT NULL DEFAULT now(),
                    retired_at timestamptz
                )""").format(keys=self.keys))
            conn.execute(sql.SQL(
                "CREATE UNIQUE INDEX IF NOT EXISTS {idx} ON {keys} (active) WHERE active"
            ).format(idx=self.one_active, keys=self.keys))
            conn.execute(sql.SQL(
                """CREATE TABLE IF NOT EXISTS {rot} (
                    requested_version bigint PRIMARY KEY,
                    phase text NOT NULL
                        CHECK (phase IN ('baseline', 'running', 'done', 'superseded')),
                    mode text,
                    from_version integer,
                    to_version integer NOT NULL,
                    requested_by text NOT NULL,
                    started_at timestamptz NOT NULL DEFAULT now(),
                    finished_at timestamptz,
                    re_encrypted bigint NOT NULL DEFAULT 0,
                    total bigint NOT NULL DEFAULT 0
                )""").format(rot=self.rotations))
            conn.execute(audit.create_sql(self.cfg))

    # -- keys ----------------------------------------------------------------------------
    def list_keys(self, conn: Conn) -> list[KeyRecord]:
        rows = conn.execute(sql.SQL(
            "SELECT version, wrapped_dek, kek_fingerprint, state, rotated_by, policy_version, "
            "created_at, retired_at FROM {keys} ORDER BY version").format(keys=self.keys)
        ).fetchall()
        return [KeyRecord(r[0], bytes(r[1]), *r[2:]) for r in rows]

    def insert_key(self, conn: Conn, kek: bytes, *, version: int, actor: str,
                   policy_version: int | None) -> None:
        """Mint a DEK, wrap it, store it as the active key (caller retires the old one)."""
        wrapped = crypto.wrap_dek(kek, crypto.new_key(), version)
        conn.execute(sql.SQL(
            "INSERT INTO {keys} (version, wrapped_dek, kek_fingerprint, state, rotated_by, "
            "policy_version) VALUES (%s, %s, %s, 'active', %s, %s)").format(keys=self.keys),
            (version, wrapped, crypto.kek_fingerprint(kek), actor, policy_version))
        audit.append(conn, self.cfg, "key_created", key_version=version, actor=actor,
                     detail={"policy_version": policy_version})

    def mark_active_retiring(self, conn: Conn) -> list[int]:
        rows = conn.execute(sql.SQL(
            "UPDATE {keys} SET state = 'retiring' WHERE state = 'active' RETURNING version"
        ).format(keys=self.keys)).fetchall()
        return [r[0] for r in rows]

    def retire_retiring(self, conn: Conn, actor: str) -> list[int]:
        rows = conn.execute(sql.SQL(
            "UPDATE {keys} SET state = 'retired', retired_at = now() WHERE state = 'retiring' "
            "RETURNING version").format(keys=self.keys)).fetchall()
        versions = sorted(r[0] for r in rows)
        for v in versions:
            audit.append(conn, self.cfg, "key_retired", key_version=v, actor=actor)
        return versions

    def ensure_active_key(self, conn: Conn, kek: bytes, actor: str,
                          policy_version: int | None = None) -> bool:
        """Create key v1 when the table has no key at all; True if it did.

        Serialised by a transaction-scoped advisory lock, so two initialisers make one key.
        """
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)",
                         (lock_key(conn, self.cfg, "init"),))
            row = conn.execute(sql.SQL("SELECT count(*), count(*) FILTER (WHERE active) "
                                       "FROM {keys}").format(keys=self.keys)).fetchone()
            total, active = row if row else (0, 0)
            if total == 0:
                self.check_legacy_kek(conn, kek)
                self.insert_key(conn, kek, version=1, actor=actor, policy_version=policy_version)
                return True
            if active == 0:
                raise RotationOperatorError(
                    f"keys table {self.cfg.qualified_keys} has {total} keys but none is active; "
                    "it was edited by hand: restore it from backup")
            return False

    def has_keys(self, conn: Conn) -> bool:
        """Whether the keys table exists and holds at least one key (read-only)."""
        row = conn.execute(
            "SELECT to_regclass(CASE WHEN %s::text IS NULL THEN quote_ident(%s) "
            "ELSE quote_ident(%s) || '.' || quote_ident(%s) END) IS NOT NULL",
            (self.cfg.schema, self.cfg.keys_table, self.cfg.schema, self.cfg.keys_table)
        ).fetchone()
        if not row or not row[0]:
            return False
        found = conn.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(self.keys)
                             ).fetchone()
        return bool(found and found[0])

    def check_legacy_kek(self, conn: Conn, kek: bytes, sample: int = 3) -> None:
        """Before key v1 binds the keys table to ``kek``, prove ``kek`` is the one the
        legacy rows were encrypted with (a few rows per target): fail closed otherwise.

        Without this, a wrong KEK on a database of only legacy rows would mint v1 under the
        wrong key, and the right KEK would be refused from then on.
        """
        for target in self.cfg.targets:
            q = sql.SQL("SELECT {id}, {val} FROM {t} WHERE {kid} IS NULL LIMIT %s").format(
                id=sql.Identifier(target.id_column), val=sql.Identifier(target.value_column),
                kid=sql.Identifier(target.key_id_column), t=ident(target.schema, target.table))
            for row_id, value in conn.execute(q, (sample,)).fetchall():
                try:
                    crypto.decrypt(kek, bytes(value))
                except InvalidToken:
                    raise KekMismatchError(
                        f"the KEK (fingerprint {crypto.kek_fingerprint(kek)}) does not decrypt "
                        f"legacy row {row_id!r} of table {target.name}; refusing to create "
                        "DEK v1 under it") from None

    def load_ring(self, conn: Conn, kek: bytes) -> KeyRing:
        """Unwrap every stored DEK; fail closed with :class:`KekMismatchError`.

        Every key is checked, not only the active one: rows (and backups) may reference any.
        """
        keys = self.list_keys(conn)
        active = [k.version for k in keys if k.state == "active"]
        if not active:
            raise RotationOperatorError(
                f"keys table {self.cfg.qualified_keys} has no active key")
        fingerprint = crypto.kek_fingerprint(kek)
        deks: dict[int, bytes] = {}
        # The active key first, so the error names the key that matters most.
        for k in sorted(keys, key=lambda k: (k.state != "active", -k.version)):
            if k.kek_fingerprint != fingerprint:
                raise KekMismatchError(
                    f"the KEK (fingerprint {fingerprint}) does not match the key that wrapped "
                    f"DEK v{k.version} (fingerprint {k.kek_fingerprint})")
            try:
                deks[k.version] = crypto.unwrap_dek(kek, k.wrapped_dek, k.version)
            except InvalidToken:
                raise KekMismatchError(
                    f"wrapped DEK v{k.version} does not unwrap under the KEK although the "
                    "fingerprints match: the keys table was altered") from None
        return KeyRing(active[0], deks, kek)

    # -- rotation records ----------------------------------------------------------------
    def rotation_records(self, conn: Conn) -> list[RotationRecord]:
        rows = conn.execute(sql.SQL(
            "SELECT requested_version, phase, mode, from_version, to_version, requested_by, "
            "started_at, finished_at, re_encrypted, total FROM {rot} ORDER BY requested_version"
        ).format(rot=self.rotations)).fetchall()
        return [RotationRecord(*r) for r in rows]

    def served_version(self, conn: Conn) -> int | None:
        """The highest policy version fully served (baseline or finished rotation)."""
        row = conn.execute(sql.SQL(
            "SELECT max(requested_version) FROM {rot} WHERE phase IN ('baseline', 'done')"
        ).format(rot=self.rotations)).fetchone()
        return row[0] if row else None

    def record_baseline(self, conn: Conn, policy_version: int, active_version: int,
                        actor: str) -> bool:
        """Record a fresh policy's version without rotating, if nothing is recorded yet."""
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)",
                         (lock_key(conn, self.cfg, "init"),))
            row = conn.execute(sql.SQL("SELECT count(*) FROM {rot}").format(
                rot=self.rotations)).fetchone()
            if row and row[0]:
                return False
            conn.execute(sql.SQL(
                "INSERT INTO {rot} (requested_version, phase, to_version, requested_by, "
                "finished_at) VALUES (%s, 'baseline', %s, %s, now())").format(rot=self.rotations),
                (policy_version, active_version, actor))
            audit.append(conn, self.cfg, "baseline_recorded", key_version=active_version,
                         actor=actor, detail={"policy_version": policy_version})
            return True

    def start_rotation(self, conn: Conn, requested: int, mode: str, from_version: int,
                       to_version: int, actor: str, total: int) -> None:
        conn.execute(sql.SQL(
            "UPDATE {rot} SET phase = 'superseded', finished_at = now() WHERE phase = 'running'"
        ).format(rot=self.rotations))
        # A version whose rotation was superseded (a higher one was requested meanwhile)
        # may be requested again later: its record starts over.
        conn.execute(sql.SQL(
            "INSERT INTO {rot} (requested_version, phase, mode, from_version, to_version, "
            "requested_by, total) VALUES (%s, 'running', %s, %s, %s, %s, %s) "
            "ON CONFLICT (requested_version) DO UPDATE SET phase = 'running', "
            "mode = EXCLUDED.mode, from_version = EXCLUDED.from_version, "
            "to_version = EXCLUDED.to_version, requested_by = EXCLUDED.requested_by, "
            "started_at = now(), finished_at = NULL, re_encrypted = 0, total = EXCLUDED.total"
        ).format(rot=self.rotations), (requested, mode, from_version, to_version, actor, total))

    def add_progress(self, conn: Conn, requested: int, moved: int) -> None:
        conn.execute(sql.SQL(
            "UPDATE {rot} SET re_encrypted = re_encrypted + %s WHERE requested_version = %s"
        ).format(rot=self.rotations), (moved, requested))

    def finish_rotation(self, conn: Conn, requested: int) -> None:
        conn.execute(sql.SQL(
            "UPDATE {rot} SET phase = 'done', finished_at = now() WHERE requested_version = %s"
        ).format(rot=self.rotations), (requested,))

    # -- targets -------------------------------------------------------------------------
    def check_target(self, conn: Conn, target: Target) -> None:
        """Refuse a target that does not exist or whose columns cannot work, by name."""
        row = conn.execute(
            "SELECT to_regclass(CASE WHEN %s::text IS NULL THEN quote_ident(%s) "
            "ELSE quote_ident(%s) || '.' || quote_ident(%s) END)::oid",
            (target.schema, target.table, target.schema, target.table)).fetchone()
        oid = row[0] if row else None
        if oid is None:
            raise SchemaError(f"target table {target.name} does not exist")
        cols = dict(conn.execute(
            "SELECT attname, atttypid::regtype::text FROM pg_attribute "
            "WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped", (oid,)).fetchall())
        for col in (target.id_column, target.value_column, target.key_id_column):
            if col not in cols:
                raise SchemaError(f"table {target.name} has no column {col}")
        if cols[target.value_column] != "bytea":
            raise SchemaError(f"value column {target.name}.{target.value_column} is "
                              f"{cols[target.value_column]}; it must be bytea")
        if cols[target.key_id_column] not in KEY_INT_TYPES:
            raise SchemaError(f"key-id column {target.name}.{target.key_id_column} is "
                              f"{cols[target.key_id_column]}; it must be an integer type")
        unique = conn.execute(
            "SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
            "AND a.attnum = i.indkey[0] WHERE i.indrelid = %s AND i.indisunique "
            "AND i.indnkeyatts = 1 AND a.attname = %s", (oid, target.id_column)).fetchone()
        if not unique:
            raise SchemaError(f"id column {target.name}.{target.id_column} needs a unique "
                              "index (a primary key): rotation walks the table by it")

    def key_counts(self, conn: Conn, target: Target) -> dict[int | None, int]:
        """Rows per key id in one target (``None`` = legacy)."""
        q = sql.SQL("SELECT {kid}, count(*) FROM {t} GROUP BY {kid}").format(
            kid=sql.Identifier(target.key_id_column), t=ident(target.schema, target.table))
        return {r[0]: r[1] for r in conn.execute(q).fetchall()}

    def count_not_under(self, conn: Conn, target: Target, version: int) -> int:
        q = sql.SQL("SELECT count(*) FROM {t} WHERE {kid} IS DISTINCT FROM %s").format(
            kid=sql.Identifier(target.key_id_column), t=ident(target.schema, target.table))
        row = conn.execute(q, (version,)).fetchone()
        return int(row[0]) if row else 0

    def table_size(self, conn: Conn, target: Target) -> int:
        row = conn.execute(
            "SELECT pg_total_relation_size(CASE WHEN %s::text IS NULL THEN quote_ident(%s) "
            "ELSE quote_ident(%s) || '.' || quote_ident(%s) END::regclass)",
            (target.schema, target.table, target.schema, target.table)).fetchone()
        return int(row[0]) if row else 0


@contextmanager
def rotation_lock(dsn: str, cfg: StoreConfig, wait: float = 0.0) -> Iterator[Conn]:
    """Hold the rotation lock of ``cfg``'s keys table on a dedicated session.

    A session-level advisory lock: it covers every transaction of a long online rotation
    and is released by PostgreSQL itself if this process dies (kill -9 included).
    Raises :class:`LockHeld` if another rotator has it after ``wait`` seconds.
    """
    conn = connect(dsn, autocommit=True, application_name="rotation-operator-lock")
    try:
        key = lock_key(conn, cfg, "rotate")
        deadline = time.monotonic() + wait
        while True:
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
            if row and row[0]:
                break
            if time.monotonic() >= deadline:
                raise LockHeld(f"another rotation of {cfg.qualified_keys} is running "
                               "(advisory lock held)")
            time.sleep(min(0.5, max(0.05, deadline - time.monotonic())))
        try:
            yield conn
        finally:
            if not conn.closed:
                # If this fails the session ends below and PostgreSQL releases it anyway.
                with suppress(psycopg.Error):
                    conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
    finally:
        conn.close()


class db_errors:
    """Map connection-level psycopg failures to :class:`DatabaseUnavailable`."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> Literal[False]:
        if isinstance(exc, psycopg.OperationalError) and not isinstance(exc, RETRYABLE):
            raise DatabaseUnavailable(f"database error: {first_line(exc)}") from None
        return False
