"""The audit log: one row per key event, each chained to the previous by SHA-256.

Why a chain: the keys table says what *is*; the audit log says what *happened* (which
rotation minted a key, how many rows it moved, who asked).  Chaining each row to the
previous one's hash makes an edited, deleted or inserted row show up in ``verify`` instead
of silently rewriting history.  (It detects tampering by someone without the code, not by
someone who recomputes the whole chain; the last hash is also reported in status so it can
be pinned elsewhere.)

Rows hold versions, counts and actors only, never key material.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from rotation_operator.errors import AuditChainError
from rotation_operator.policy.config import StoreConfig
from rotation_operator.store.names import Tables

GENESIS = bytes(32)


def record_hash(prev_hash: bytes, seq: int, at: datetime, event: str, key_version: int | None,
                actor: str, detail: Mapping[str, Any]) -> bytes:
    """SHA-256 over the previous hash and a canonical JSON form of the row."""
    canonical = json.dumps(
        {
            "seq": seq,
            "at": at.astimezone(UTC).isoformat(timespec="microseconds"),
            "event": event,
            "key_version": key_version,
            "actor": actor,
            "detail": detail,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.sha256(prev_hash + canonical.encode()).digest()


def table(cfg: StoreConfig | Tables) -> sql.Identifier:
    return Tables.of(cfg).audit


def create_sql(cfg: StoreConfig | Tables) -> sql.Composed:
    return sql.SQL(
        """CREATE TABLE IF NOT EXISTS {t} (
            seq bigint PRIMARY KEY,
            at timestamptz NOT NULL,
            event text NOT NULL,
            key_version integer,
            actor text NOT NULL,
            detail jsonb NOT NULL DEFAULT '{{}}'::jsonb,
            prev_hash bytea NOT NULL,
            hash bytea NOT NULL
        )"""
    ).format(t=table(cfg))


def append(conn: psycopg.Connection[Any], cfg: StoreConfig | Tables, event: str, *,
           key_version: int | None = None, actor: str,
           detail: Mapping[str, Any] | None = None) -> int:
    """Append one event in the caller's transaction; returns its sequence number.

    A transaction-scoped lock on the audit table serialises appenders, so the chain never
    forks; it is held only until the caller commits.
    """
    detail = dict(detail or {})
    conn.execute(sql.SQL("LOCK TABLE {t} IN SHARE ROW EXCLUSIVE MODE").format(t=table(cfg)))
    last = conn.execute(
        sql.SQL("SELECT seq, hash FROM {t} ORDER BY seq DESC LIMIT 1").format(t=table(cfg))
    ).fetchone()
    seq, prev = (last[0] + 1, bytes(last[1])) if last else (1, GENESIS)
    at = datetime.now(UTC)
    digest = record_hash(prev, seq, at, event, key_version, actor, detail)
    conn.execute(
        sql.SQL(
            "INSERT INTO {t} (seq, at, event, key_version, actor, detail, prev_hash, hash) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
        ).format(t=table(cfg)),
        (seq, at, event, key_version, actor, Jsonb(detail), prev, digest),
    )
    return seq


@dataclass(frozen=True)
class ChainReport:
    events: int
    head: str  # hex of the last hash ("" when empty)


def count(conn: psycopg.Connection[Any], cfg: StoreConfig | Tables) -> int:
    """How many events the log holds."""
    row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table(cfg))).fetchone()
    return int(row[0]) if row else 0


def verify(conn: psycopg.Connection[Any], cfg: StoreConfig | Tables) -> ChainReport:
    """Recompute the whole chain; raise :class:`AuditChainError` at the first bad row."""
    prev, expected_seq, count = GENESIS, 1, 0
    query = sql.SQL(
        "SELECT seq, at, event, key_version, actor, detail, prev_hash, hash FROM {t} ORDER BY seq"
    ).format(t=table(cfg))
    with conn.cursor() as cur:
        for seq, at, event, key_version, actor, detail, prev_hash, digest in cur.execute(query):
            if seq != expected_seq:
                raise AuditChainError(f"audit row {expected_seq} is missing (found {seq} next)")
            if bytes(prev_hash) != prev:
                raise AuditChainError(f"audit row {seq} does not follow row {seq - 1}")
            if record_hash(prev, seq, at, event, key_version, actor, detail) != bytes(digest):
                raise AuditChainError(f"audit row {seq} ({event}) was altered")
            prev, expected_seq, count = bytes(digest), seq + 1, count + 1
    return ChainReport(events=count, head=prev.hex() if count else "")
