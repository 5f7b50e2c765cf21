"""The keys table: one row per DEK, its wrap, its state and its life.

A DEK is stored wrapped by a KEK (never in the clear); :mod:`.keystore` wraps and unwraps,
this module only reads and writes rows.  States: ``active`` (one, by a partial unique
index), ``retiring`` (while a rotation moves rows off it), ``retired``, ``disabled``
(reversible: no ring unwraps it), ``destroyed`` (the wrap erased, the row kept so data
names the key it needed).  Every change of state is audited in the same transaction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from psycopg import sql

from rotation_operator.errors import KeyStateError
from rotation_operator.policy.decisions import zero_rows_clock
from rotation_operator.store import audit
from rotation_operator.store.database import Conn
from rotation_operator.store.names import Tables

#: Key states in which a DEK can still be unwrapped into a ring.
READABLE = ("active", "retiring", "retired")


@dataclass(frozen=True)
class KeyRecord:
    version: int
    wrapped_dek: bytes = field(repr=False)
    kek_fingerprint: str
    state: str  # active | retiring | retired | disabled | destroyed
    rotated_by: str
    policy_version: int | None
    created_at: datetime
    retired_at: datetime | None
    zero_rows_since: datetime | None = None
    disabled_at: datetime | None = None
    destroy_after: datetime | None = None
    destroyed_at: datetime | None = None
    encryptions: int = 0
    #: The targets' rows inserted and updated (statistics) when the key was minted.
    writes_at_mint: int | None = None


def list_keys(conn: Conn, tables: Tables) -> list[KeyRecord]:
    rows = conn.execute(sql.SQL(
        "SELECT version, wrapped_dek, kek_fingerprint, state, rotated_by, policy_version, "
        "created_at, retired_at, zero_rows_since, disabled_at, destroy_after, destroyed_at, "
        "encryptions, writes_at_mint FROM {keys} ORDER BY version").format(keys=tables.keys)
    ).fetchall()
    return [KeyRecord(r[0], bytes(r[1]), *r[2:]) for r in rows]


def active_version(conn: Conn, tables: Tables) -> int | None:
    """The active key's version (one tiny index lookup: the library asks it often)."""
    row = conn.execute(sql.SQL("SELECT version FROM {} WHERE active").format(tables.keys)
                       ).fetchone()
    return int(row[0]) if row else None


def counts(conn: Conn, tables: Tables) -> tuple[int, int]:
    """(keys, active keys)."""
    row = conn.execute(sql.SQL("SELECT count(*), count(*) FILTER (WHERE active) "
                               "FROM {keys}").format(keys=tables.keys)).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def insert(conn: Conn, tables: Tables, *, version: int, wrapped: bytes, fingerprint: str,
           actor: str, policy_version: int | None, writes: int | None) -> None:
    """Store a wrapped DEK as the active key (the caller retires the old one)."""
    conn.execute(sql.SQL(
        "INSERT INTO {keys} (version, wrapped_dek, kek_fingerprint, state, rotated_by, "
        "policy_version, writes_at_mint) VALUES (%s, %s, %s, 'active', %s, %s, %s)").format(
            keys=tables.keys),
        (version, wrapped, fingerprint, actor, policy_version, writes))
    audit.append(conn, tables, "key_created", key_version=version, actor=actor,
                 detail={"policy_version": policy_version})


def set_wrap(conn: Conn, tables: Tables, version: int, wrapped: bytes, fingerprint: str,
             was: str) -> None:
    """Replace the wrap of DEK ``version`` if it is still under the KEK ``was``."""
    conn.execute(sql.SQL(
        "UPDATE {keys} SET wrapped_dek = %s, kek_fingerprint = %s "
        "WHERE version = %s AND kek_fingerprint = %s").format(keys=tables.keys),
        (wrapped, fingerprint, version, was))


def mark_active_retiring(conn: Conn, tables: Tables) -> list[int]:
    """The active key becomes retiring.  ``FOR UPDATE`` first: batches hold the key row
    ``FOR KEY SHARE``, which a plain UPDATE would not wait for."""
    conn.execute(sql.SQL("SELECT version FROM {keys} WHERE state = 'active' FOR UPDATE"
                         ).format(keys=tables.keys))
    rows = conn.execute(sql.SQL(
        "UPDATE {keys} SET state = 'retiring' WHERE state = 'active' RETURNING version"
    ).format(keys=tables.keys)).fetchall()
    return [r[0] for r in rows]


def retire_retiring(conn: Conn, tables: Tables, actor: str) -> list[int]:
    rows = conn.execute(sql.SQL(
        "UPDATE {keys} SET state = 'retired', retired_at = now() WHERE state = 'retiring' "
        "RETURNING version").format(keys=tables.keys)).fetchall()
    versions = sorted(r[0] for r in rows)
    for v in versions:
        audit.append(conn, tables, "key_retired", key_version=v, actor=actor)
    return versions


def census(conn: Conn, tables: Tables, rows: Mapping[int | None, int], now: datetime,
           writes: int | None = None, *, exact: bool = True) -> bool:
    """Record, from a fresh count of rows per key, since when each retired or disabled
    key has had no row, and raise the active key's usage estimate: at least its rows,
    and at least the rows the targets' statistics say were inserted or updated since it
    was minted (every such write encrypted a value under it; the library's writes are
    not counted one by one).  Estimated counts (``exact=False``) may stop a key's
    zero-rows clock but never start it.  True if anything changed."""
    changed = False
    for k in list_keys(conn, tables):
        n = rows.get(k.version, 0)
        since = zero_rows_clock(k.state, k.zero_rows_since, n, now, exact)
        used, base = n, k.writes_at_mint
        if k.state == "active" and writes is not None:
            if base is None or writes < base:
                # never based (a key minted before usage was counted), or the statistics
                # were reset (a failover, pg_stat_reset): count on from what is known
                base = writes - k.encryptions
            used = max(used, writes - base)
        if since != k.zero_rows_since or used > k.encryptions or base != k.writes_at_mint:
            conn.execute(sql.SQL(
                "UPDATE {keys} SET zero_rows_since = %s, encryptions = greatest(encryptions, "
                "%s), writes_at_mint = %s WHERE version = %s").format(keys=tables.keys),
                (since, used, base, k.version))
            changed = True
    return changed


def add_encryptions(conn: Conn, tables: Tables, version: int, n: int) -> None:
    conn.execute(sql.SQL("UPDATE {keys} SET encryptions = encryptions + %s "
                         "WHERE version = %s").format(keys=tables.keys), (n, version))


def key_for_update(conn: Conn, tables: Tables, version: int) -> KeyRecord:
    conn.execute(sql.SQL("SELECT 1 FROM {keys} WHERE version = %s FOR UPDATE").format(
        keys=tables.keys), (version,))
    key = next((k for k in list_keys(conn, tables) if k.version == version), None)
    if key is None:
        raise KeyStateError(f"there is no DEK v{version} in {tables.qualified_keys}")
    return key


def disable(conn: Conn, tables: Tables, version: int, now: datetime,
            destroy_after: datetime | None, actor: str) -> None:
    conn.execute(sql.SQL(
        "UPDATE {keys} SET state = 'disabled', disabled_at = %s, destroy_after = %s "
        "WHERE version = %s").format(keys=tables.keys), (now, destroy_after, version))
    audit.append(conn, tables, "key_disabled", key_version=version, actor=actor,
                 detail={"destroy_after": destroy_after.isoformat()
                         if destroy_after else None})


def enable(conn: Conn, tables: Tables, version: int, actor: str) -> None:
    conn.execute(sql.SQL(
        "UPDATE {keys} SET state = 'retired', disabled_at = NULL, destroy_after = NULL, "
        "zero_rows_since = NULL WHERE version = %s").format(keys=tables.keys), (version,))
    audit.append(conn, tables, "key_enabled", key_version=version, actor=actor)


def destroy(conn: Conn, tables: Tables, version: int, now: datetime, actor: str) -> None:
    """Erase the wrapped DEK (the row and its version stay, so data names the key it
    needed); the audit chain records it."""
    conn.execute(sql.SQL(
        "UPDATE {keys} SET state = 'destroyed', wrapped_dek = ''::bytea, destroyed_at = %s "
        "WHERE version = %s").format(keys=tables.keys), (now, version))
    audit.append(conn, tables, "key_destroyed", key_version=version, actor=actor)


def vacuum_full(conn: Conn, tables: Tables) -> None:
    """Rewrite the keys table, so an erased wrap leaves no old row version in its pages;
    waits at most 5 s for its lock (the session keeps that setting)."""
    conn.execute("SET lock_timeout = '5s'")
    conn.execute(sql.SQL("VACUUM FULL {}").format(tables.keys))
