"""Rotation records and their fences.

One row per rotation or sweep: what asked for it (a policy version, a manual CLI call, a
schedule, a sweep), its phase, its **fence** token and its progress.  Served policy
versions are read from here, which makes a bump idempotent; a partial unique index allows
one ``running`` rotation.

Fences only grow, across records: a rotator that takes a rotation over moves its fence on,
and every batch proves, in its own transaction, that its fence is still the record's
(:func:`check_fence`), so a rotator that lost the rotation stops at its next batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import sql
from psycopg.types.json import Jsonb

from rotation_operator.errors import Superseded
from rotation_operator.store import audit
from rotation_operator.store.advisory import lock_xact
from rotation_operator.store.database import Conn
from rotation_operator.store.names import Tables


@dataclass(frozen=True)
class RotationRecord:
    id: int
    kind: str  # policy | manual | scheduled | sweep
    requested_version: int | None  # the policy version served (policy kind only)
    phase: str  # baseline | running | done | superseded
    mode: str | None
    from_version: int | None
    to_version: int
    requested_by: str
    started_at: datetime
    announced_at: datetime | None
    finished_at: datetime | None
    re_encrypted: int
    total: int
    fence: int
    report: Mapping[str, Any]


_COLUMNS = sql.SQL("id, kind, requested_version, phase, mode, from_version, to_version, "
                   "requested_by, started_at, announced_at, finished_at, re_encrypted, total, "
                   "fence, report")


def rotation_records(conn: Conn, tables: Tables) -> list[RotationRecord]:
    rows = conn.execute(sql.SQL("SELECT {cols} FROM {rot} ORDER BY id").format(
        cols=_COLUMNS, rot=tables.rotations)).fetchall()
    return [RotationRecord(*r) for r in rows]


def record(conn: Conn, tables: Tables, record_id: int) -> RotationRecord:
    row = conn.execute(sql.SQL("SELECT {cols} FROM {rot} WHERE id = %s").format(
        cols=_COLUMNS, rot=tables.rotations), (record_id,)).fetchone()
    if row is None:
        raise Superseded(f"rotation record {record_id} is gone")
    return RotationRecord(*row)


def last_finished(conn: Conn, tables: Tables) -> datetime | None:
    """When the last rotation or sweep finished (rows moved then)."""
    row = conn.execute(sql.SQL("SELECT max(finished_at) FROM {rot} WHERE phase = 'done'")
                       .format(rot=tables.rotations)).fetchone()
    return row[0] if row else None


def record_baseline(conn: Conn, tables: Tables, policy_version: int, active_version: int,
                    actor: str) -> bool:
    """Record a fresh policy's version without rotating, if no policy version is
    recorded yet (manual rotations and sweeps do not count)."""
    with conn.transaction():
        lock_xact(conn, tables, "init")
        row = conn.execute(sql.SQL(
            "SELECT count(*) FROM {rot} WHERE requested_version IS NOT NULL").format(
                rot=tables.rotations)).fetchone()
        if row and row[0]:
            return False
        conn.execute(sql.SQL(
            "INSERT INTO {rot} (kind, requested_version, phase, to_version, requested_by, "
            "finished_at) VALUES ('policy', %s, 'baseline', %s, %s, now())").format(
                rot=tables.rotations), (policy_version, active_version, actor))
        audit.append(conn, tables, "baseline_recorded", key_version=active_version,
                     actor=actor, detail={"policy_version": policy_version})
        return True


def claim_new(conn: Conn, tables: Tables, *, kind: str, requested: int | None, mode: str,
              from_version: int | None, to_version: int, actor: str, total: int
              ) -> tuple[int, int]:
    """Record a new running rotation (superseding any other); returns (id, fence).

    Fences only grow, across records, so a rotator that read an older one can never
    mistake a newer claim for its own.  The running record is locked ``FOR UPDATE``
    first, which waits for the batches in flight (they hold it ``FOR KEY SHARE``).
    """
    rot = tables.rotations
    conn.execute(sql.SQL("SELECT id FROM {rot} WHERE phase = 'running' FOR UPDATE").format(
        rot=rot))
    conn.execute(sql.SQL(
        "UPDATE {rot} SET phase = 'superseded', finished_at = now(), fence = fence + 1 "
        "WHERE phase = 'running'").format(rot=rot))
    row = conn.execute(sql.SQL(
        "INSERT INTO {rot} (kind, requested_version, phase, mode, from_version, to_version, "
        "requested_by, total, fence) SELECT %s, %s, 'running', %s, %s, %s, %s, %s, "
        "coalesce(max(fence), 0) + 1 FROM {rot} RETURNING id, fence").format(rot=rot),
        (kind, requested, mode, from_version, to_version, actor, total)).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def claim_resume(conn: Conn, tables: Tables, record_id: int, mode: str) -> int:
    """Take over a running rotation: its fence moves on, so whoever ran it before
    stops at its next batch.  Waits for that rotator's batch in flight (it holds the
    record ``FOR KEY SHARE``; only ``FOR UPDATE`` waits for that)."""
    rot = tables.rotations
    conn.execute(sql.SQL("SELECT id FROM {rot} WHERE id = %s FOR UPDATE").format(rot=rot),
                 (record_id,))
    row = conn.execute(sql.SQL(
        "UPDATE {rot} SET fence = (SELECT max(fence) FROM {rot}) + 1, mode = %s "
        "WHERE id = %s AND phase = 'running' RETURNING fence").format(rot=rot),
        (mode, record_id)).fetchone()
    if row is None:
        raise Superseded(f"rotation record {record_id} is no longer running")
    return int(row[0])


def adopt(conn: Conn, tables: Tables, record_id: int, fence: int, policy_version: int,
          actor: str) -> None:
    """A running scheduled or manual rotation now serves ``policy_version``."""
    conn.execute(sql.SQL(
        "UPDATE {rot} SET kind = 'policy', requested_version = %s "
        "WHERE id = %s AND fence = %s AND phase = 'running'").format(rot=tables.rotations),
        (policy_version, record_id, fence))
    conn.execute(sql.SQL("UPDATE {keys} SET policy_version = %s WHERE version = "
                         "(SELECT to_version FROM {rot} WHERE id = %s)").format(
        keys=tables.keys, rot=tables.rotations), (policy_version, record_id))
    audit.append(conn, tables, "rotation_adopted", actor=actor, detail={
        "policy_version": policy_version, "record": record_id})


def announce(conn: Conn, tables: Tables, record_id: int, fence: int) -> datetime:
    """Stamp when the rotation's key is known committed (the handover's clock)."""
    row = conn.execute(sql.SQL(
        "UPDATE {rot} SET announced_at = coalesce(announced_at, clock_timestamp()) "
        "WHERE id = %s AND fence = %s RETURNING announced_at").format(rot=tables.rotations),
        (record_id, fence)).fetchone()
    if row is None:
        raise Superseded(f"rotation {record_id} was taken over by another rotator")
    announced: datetime = row[0]
    return announced


def seconds_since(conn: Conn, at: datetime | None) -> float:
    """Seconds from ``at`` (an announcement) to now, by the server's clock."""
    row = conn.execute("SELECT extract(epoch FROM clock_timestamp() - %s)::float8",
                       (at,)).fetchone()
    return float(row[0]) if row else 0.0


def check_fence(conn: Conn, tables: Tables, record_id: int, fence: int, key_version: int, *,
                exclusive: bool = False) -> None:
    """Prove, inside the caller's transaction, that this rotation is still the running
    one and its key still the active one; lock both rows until it commits, so a takeover
    or a new key waits for this transaction instead of racing it.

    ``FOR KEY SHARE``: batches of several workers hold it at once and still increment
    the record's progress (a non-key UPDATE does not conflict with it); takeovers and
    new keys lock ``FOR UPDATE``, which does.
    """
    mode = sql.SQL("UPDATE" if exclusive else "KEY SHARE")
    row = conn.execute(sql.SQL("SELECT phase, fence FROM {rot} WHERE id = %s FOR {mode}"
                               ).format(rot=tables.rotations, mode=mode),
                       (record_id,)).fetchone()
    if row is None or row[0] != "running" or row[1] != fence:
        why = "it was superseded" if row is not None and row[0] != "running" else \
            "another rotator took it over"
        raise Superseded(f"rotation {record_id} stopped: {why}")
    key = conn.execute(sql.SQL("SELECT state FROM {keys} WHERE version = %s FOR {mode}"
                               ).format(keys=tables.keys, mode=mode), (key_version,)
                       ).fetchone()
    if key is None or key[0] != "active":
        raise Superseded(f"rotation {record_id} stopped: DEK v{key_version} is no "
                         "longer the active key")


def still_ours(conn: Conn, tables: Tables, active_version: int) -> bool:
    """In the caller's transaction: no rotation runs and key ``active_version`` is the
    active one (the record and the key locked, so the answer holds until it commits)."""
    running = conn.execute(sql.SQL(
        "SELECT id FROM {} WHERE phase = 'running' FOR UPDATE").format(
            tables.rotations)).fetchone()
    active = conn.execute(sql.SQL(
        "SELECT version FROM {} WHERE state = 'active' FOR SHARE").format(
            tables.keys)).fetchone()
    return running is None and active is not None and active[0] == active_version


def add_progress(conn: Conn, tables: Tables, record_id: int, moved: int) -> None:
    """Count rows a batch moved, in the batch's own transaction (exact across crashes
    and workers)."""
    conn.execute(sql.SQL(
        "UPDATE {rot} SET re_encrypted = re_encrypted + %s WHERE id = %s").format(
            rot=tables.rotations), (moved, record_id))


def set_left(conn: Conn, tables: Tables, record_id: int, left: int) -> None:
    """A count found ``left`` rows still to move: the record's total is the rows it has
    to move, those it moved and those left (rows, not passes: a row a pass could not
    move is counted once however often it is tried)."""
    conn.execute(sql.SQL("UPDATE {rot} SET total = re_encrypted + %s WHERE id = %s").format(
        rot=tables.rotations), (left, record_id))


def finish_record(conn: Conn, tables: Tables, record_id: int, report: Mapping[str, Any]
                  ) -> None:
    """Done: none left, so the total is the rows it moved."""
    conn.execute(sql.SQL(
        "UPDATE {rot} SET phase = 'done', finished_at = now(), "
        "total = re_encrypted, report = report || %s WHERE id = %s"
    ).format(rot=tables.rotations), (Jsonb(dict(report)), record_id))


def add_report(conn: Conn, tables: Tables, record_id: int, report: Mapping[str, Any]
               ) -> None:
    conn.execute(sql.SQL("UPDATE {rot} SET report = report || %s WHERE id = %s").format(
        rot=tables.rotations), (Jsonb(dict(report)), record_id))
