"""Queries over the target tables: counts per key, stale rows, legacy rows, statistics.

Why apart from the keys table's modules: these statements read (and, for the rotation,
lock) the *application's* tables, through their parent (partitions and children included)
or, with ``ONLY``, one heap at a time (see :mod:`.catalog`).  Column names come from the
policy, so every one goes through ``sql.Identifier``; key versions are parameters.  The
batch statements that move rows are in :mod:`.batches`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import Final, Literal

from psycopg import sql

from rotation_operator.errors import ForeignKeyIds
from rotation_operator.policy.config import Target
from rotation_operator.store import names
from rotation_operator.store.catalog import Heap, Layout
from rotation_operator.store.database import Conn

#: Legacy rows alone (key id NULL), none under a DEK: what a rekey moves before the KEK
#: changes (rows under retired DEKs stay: their DEKs are rewrapped, not replaced).
LEGACY_ONLY: Final = "only"
#: Which rows not under the active key a statement takes: ``False`` those under another
#: DEK, ``True`` those and legacy rows, :data:`LEGACY_ONLY` legacy rows alone.
Scope = bool | Literal["only"]


def stale_condition(layout: Layout, legacy: Scope) -> sql.Composed:
    """``key_id`` not the active key (``%(active)s``); legacy rows included if asked, or
    only they (:data:`LEGACY_ONLY`)."""
    kid = sql.Identifier(layout.target.key_id_column)
    if legacy == LEGACY_ONLY:
        return sql.SQL("{kid} IS NULL").format(kid=kid)
    if legacy:
        return sql.SQL("({kid} IS NULL OR {kid} <> %(active)s)").format(kid=kid)
    return sql.SQL("{kid} <> %(active)s").format(kid=kid)


# -- counts --------------------------------------------------------------------------------
def key_counts(conn: Conn, layout: Layout) -> dict[int | None, int]:
    """Rows per key id in one target, through its parent (``None`` = legacy)."""
    kid = sql.Identifier(layout.target.key_id_column)
    q = sql.SQL("SELECT {kid}, count(*) FROM {t} GROUP BY {kid}").format(
        kid=kid, t=layout.ident)
    return {r[0]: r[1] for r in conn.execute(q).fetchall()}


def key_estimates(conn: Conn, layout: Layout, active: int | None, exact_below: int,
                  moved_at: datetime | None) -> tuple[dict[int | None, int], bool]:
    """Rows per key id in one target without scanning it: per heap, the live rows the
    statistics count (``n_live_tup``, kept by every commit) spread over key ids as the
    planner's statistics say (``pg_stats``: the NULL fraction and the most common
    values, which hold every key id the last ANALYZE sampled; the rest of the mass
    goes to the active key).  A heap smaller than ``exact_below`` rows, or one never
    analysed, is counted exactly.  Statistics older than ``moved_at`` (the last rotation
    or sweep: the operator's role may not ANALYZE a table it does not own, and autovacuum
    comes when it likes) describe rows that have moved since: every live row of
    such a heap is taken to be under the active key, where that rotation left it
    (the exact counts, hourly and after each rotation, catch any that is not).
    Returns (counts, all counted exactly)."""
    kid = sql.Identifier(layout.target.key_id_column)
    totals: dict[int | None, float] = {}
    exact = True
    for heap in layout.heaps:
        row = conn.execute(
            "SELECT coalesce(s.n_live_tup, greatest(c.reltuples, 0))::float8, "
            "p.null_frac::float8, p.most_common_vals::text, p.most_common_freqs::float8[], "
            "coalesce(greatest(s.last_analyze, s.last_autoanalyze) < %s, false) "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "LEFT JOIN pg_stat_all_tables s ON s.relid = c.oid "
            "LEFT JOIN pg_stats p ON p.schemaname = n.nspname AND p.tablename = c.relname "
            "AND p.attname = %s AND NOT p.inherited WHERE c.oid = %s",
            (moved_at, layout.target.key_id_column, heap.oid)).fetchone()
        live, null_frac, mcv, freqs, outdated = row if row else (
            0.0, None, None, None, False)
        if outdated and null_frac is not None and live > exact_below:
            exact = False
            totals[active] = totals.get(active, 0.0) + live
            continue
        try:
            values = [int(v) for v in str(mcv).strip("{}").split(",") if v] if mcv else []
        except ValueError:  # not an integer column after all: count it
            values, null_frac = [], None
        if live <= exact_below or null_frac is None:  # small, or never analysed
            counted = conn.execute(sql.SQL(
                "SELECT {kid}, count(*) FROM ONLY {h} GROUP BY {kid}").format(
                    kid=kid, h=heap.ident)).fetchall()
            for k, n in counted:
                totals[k] = totals.get(k, 0) + n
            continue
        exact = False
        shares: dict[int | None, float] = {None: float(null_frac)}
        for v, f in zip(values, freqs or [], strict=False):
            shares[v] = shares.get(v, 0.0) + float(f)
        rest = max(0.0, 1.0 - sum(shares.values()))
        if rest:
            shares[active] = shares.get(active, 0.0) + rest
        for k, share in shares.items():
            totals[k] = totals.get(k, 0.0) + share * live
    return {k: round(n) for k, n in totals.items() if round(n) > 0}, exact


def count_stale(conn: Conn, layouts: Iterable[Layout], active: int, *,
                legacy: Scope = True) -> int:
    """Rows of all targets not under ``active`` (``legacy=False``: under a non-active
    DEK only; :data:`LEGACY_ONLY`: legacy rows only)."""
    total = 0
    for layout in layouts:
        row = conn.execute(sql.SQL("SELECT count(*) FROM {t} WHERE {cond}").format(
            t=layout.ident, cond=stale_condition(layout, legacy)), {"active": active}
        ).fetchone()
        total += int(row[0]) if row else 0
    return total


def count_keyed(conn: Conn, layout: Layout) -> int:
    """Rows of one target under any key (not legacy)."""
    row = conn.execute(sql.SQL("SELECT count(*) FROM {t} WHERE {kid} IS NOT NULL").format(
        t=layout.ident, kid=sql.Identifier(layout.target.key_id_column))).fetchone()
    return int(row[0]) if row else 0


def example_stale(conn: Conn, layout: Layout, heap: Heap, active: int, legacy: Scope
                  ) -> object:
    """The id of one row of ``heap`` not under ``active``, to name it in an error."""
    row = conn.execute(sql.SQL("SELECT {id} FROM ONLY {h} WHERE {cond} LIMIT 1").format(
        id=sql.Identifier(layout.target.id_column), h=heap.ident,
        cond=stale_condition(layout, legacy)), {"active": active}).fetchone()
    return row[0] if row else None


def referenced_any(conn: Conn, layouts: Sequence[Layout], versions: Sequence[int]
                   ) -> tuple[str, object, int] | None:
    """(target, an id, the version) of a row under any of ``versions``, or None: one
    scan of each target at most."""
    for layout in layouts:
        t = layout.target
        row = conn.execute(sql.SQL(
            "SELECT {id}, {kid} FROM {tab} WHERE {kid} = ANY(%s) LIMIT 1").format(
                id=sql.Identifier(t.id_column), tab=layout.ident,
                kid=sql.Identifier(t.key_id_column)), (list(versions),)).fetchone()
        if row is not None:
            return layout.display, row[0], int(row[1])
    return None


def scan(conn: Conn, layout: Layout, itersize: int = 500
         ) -> Iterator[tuple[object, int | None, bytes]]:
    """Every row of a target as (id, key id, value), streamed by a server-side cursor
    (large values: bounded memory)."""
    t = layout.target
    q = sql.SQL("SELECT {id}, {kid}, {val} FROM {t}").format(
        id=sql.Identifier(t.id_column), kid=sql.Identifier(t.key_id_column),
        val=sql.Identifier(t.value_column), t=layout.ident)
    with conn.cursor(name="verify", binary=True) as cur:
        cur.itersize = itersize
        yield from cur.execute(q)


def row_xmin(conn: Conn, target: Target, row_id: object) -> str | None:
    """The ``xmin`` of one row of a target (what version of it is there now), or None."""
    row = conn.execute(sql.SQL("SELECT xmin::text FROM {} WHERE {} = %s").format(
        names.target(target), sql.Identifier(target.id_column)), (row_id,)).fetchone()
    return str(row[0]) if row else None


# -- legacy rows (key id NULL, encrypted with the KEK itself) ------------------------------
def check_no_key_ids(conn: Conn, layouts: Sequence[Layout], keys_table: str) -> None:
    """Refuse to start a keys table over rows that already carry key ids: they were written
    under another keys table (a changed keysTable, another application's), and a new v1
    here would make their ids mean other keys; a rotation would then move nothing and
    retire keys that nothing can replace."""
    for layout in layouts:
        kid = sql.Identifier(layout.target.key_id_column)
        row = conn.execute(sql.SQL(
            "SELECT {kid} FROM {t} WHERE {kid} IS NOT NULL LIMIT 1").format(
                kid=kid, t=layout.ident)).fetchone()
        if row is not None:
            raise ForeignKeyIds(
                f"{layout.display} has rows under key id {row[0]}, but keys table {keys_table} "
                "holds no key: those rows were written under another keys table (was "
                "spec.database.keysTable changed?); point the policy at that keys table, or "
                "rotate there first")


def has_legacy_rows(conn: Conn, layouts: Sequence[Layout]) -> bool:
    """Whether any target holds a legacy row (key id NULL)."""
    for layout in layouts:
        row = conn.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {t} WHERE {kid} IS NULL)").format(
            t=layout.ident, kid=sql.Identifier(layout.target.key_id_column))).fetchone()
        if row and row[0]:
            return True
    return False


def legacy_sample(conn: Conn, layout: Layout, n: int) -> list[tuple[object, bytes]]:
    """(id, value) of up to ``n`` legacy rows of one target."""
    t = layout.target
    q = sql.SQL("SELECT {id}, {val} FROM {t} WHERE {kid} IS NULL LIMIT %s").format(
        id=sql.Identifier(t.id_column), val=sql.Identifier(t.value_column),
        kid=sql.Identifier(t.key_id_column), t=layout.ident)
    return [(row_id, bytes(value)) for row_id, value in conn.execute(q, (n,)).fetchall()]


def legacy_ids(conn: Conn, layout: Layout, n: int) -> list[object]:
    """Ids of up to ``n`` legacy rows of one target, lowest first (to name late ones)."""
    t = layout.target
    q = sql.SQL("SELECT {id} FROM {t} WHERE {kid} IS NULL ORDER BY {id} LIMIT %s").format(
        id=sql.Identifier(t.id_column), kid=sql.Identifier(t.key_id_column), t=layout.ident)
    return [row[0] for row in conn.execute(q, (n,)).fetchall()]


# -- statistics and maintenance ------------------------------------------------------------
def writes(conn: Conn, layouts: Sequence[Layout]) -> int:
    """Rows inserted and updated in every heap of the targets, from the statistics."""
    oids = [h.oid for layout in layouts for h in layout.heaps]
    row = conn.execute("SELECT coalesce(sum(n_tup_ins + n_tup_upd), 0) FROM "
                       "pg_stat_all_tables WHERE relid = ANY(%s)", (oids,)).fetchone()
    return int(row[0]) if row else 0


def total_size(conn: Conn, layout: Layout) -> int:
    """Bytes of every heap of one target, with its indexes and TOAST."""
    row = conn.execute("SELECT coalesce(sum(pg_total_relation_size(x)), 0) "
                       "FROM unnest(%s::oid[]) AS x", ([h.oid for h in layout.heaps],)
                       ).fetchone()
    return int(row[0]) if row else 0


def vacuum_analyze(conn: Conn, heap: Heap) -> None:
    conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(heap.ident))


# -- the Atomic mode -----------------------------------------------------------------------
def lock_against_writes(conn: Conn, layout: Layout) -> None:
    """Lock a target (the parent's lock covers partitions and children) against writes
    until the caller's transaction ends; readers go on."""
    conn.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(layout.ident))


def not_updatable(conn: Conn, oids: Sequence[int]) -> tuple[str, str] | None:
    """(a relation among ``oids`` without table-level UPDATE for this role, the role), or
    None when the role may update them all."""
    row = conn.execute(
        "SELECT n.nspname || '.' || c.relname, current_user FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = ANY(%s) "
        "AND NOT has_table_privilege(c.oid, 'UPDATE') LIMIT 1", (list(oids),)).fetchone()
    return (str(row[0]), str(row[1])) if row else None
