"""The statements of a rotation batch, built once per heap; and how big a heap is.

Why here and not in the mover: every SQL statement lives in the store, and these are the
ones the rotation's speed depends on, so they are composed once per heap
(:func:`statements`) and the mover only executes them, with binary parameters, on its hot
path.  The batch itself (fence, select, re-encrypt, update) is described in
:mod:`rotation_operator.rotation.mover`.
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

from rotation_operator.store.catalog import Heap, Layout
from rotation_operator.store.database import Conn
from rotation_operator.store.targets import Scope, stale_condition


@dataclass(frozen=True)
class Statements:
    """One heap's batch statements (parameters: ``lo``, ``hi``, ``active``, ...)."""

    #: Rows of a block range not under the active key: raw ctid, key id, value, raw xmin.
    select: sql.Composed
    #: The same, in ctid order, while the bytes before each stay under ``budget``.
    select_bounded: sql.Composed
    #: The id of the row at a ctid (only to name a bad row).
    row_id: sql.Composed
    #: Write the new values where ctid and xmin still match what was read.
    update: sql.Composed
    #: The same, and count the rows a BEFORE UPDATE trigger changed.
    update_checked: sql.Composed


def statements(layout: Layout, heap: Heap, legacy: Scope) -> Statements:
    t = layout.target
    names = {"h": heap.ident, "id": sql.Identifier(t.id_column),
             "val": sql.Identifier(t.value_column), "kid": sql.Identifier(t.key_id_column),
             "cond": stale_condition(layout, legacy)}
    select = sql.SQL(
        "SELECT tidsend(ctid), {kid}, {val}, xidsend(xmin) FROM ONLY {h} "
        "WHERE ctid >= %(lo)s::tid AND ctid < %(hi)s::tid AND {cond}").format(**names)
    # Rows in ctid order while the bytes before each stay under the budget (the first
    # row always comes): memory is bounded whatever the values' sizes.
    select_bounded = sql.SQL(
        "SELECT c, k, v, x FROM (SELECT tidsend(ctid) AS c, {kid} AS k, {val} AS v, "
        "xidsend(xmin) AS x, ctid AS t, sum(octet_length({val})) OVER (ORDER BY ctid "
        "ROWS UNBOUNDED PRECEDING) - octet_length({val}) AS before FROM ONLY {h} "
        "WHERE ctid >= %(lo)s::tid AND ctid < %(hi)s::tid AND {cond}) s "
        "WHERE before < %(budget)s ORDER BY t LIMIT %(n)s").format(**names)
    row_id = sql.SQL("SELECT {id} FROM ONLY {h} WHERE ctid = %(c)s::tid").format(**names)
    update = sql.SQL(
        "UPDATE ONLY {h} AS r SET {val} = u.v, {kid} = %(active)s "
        "FROM unnest(%(c)b, %(v)b, %(x)b) AS u(c, v, x) "
        "WHERE r.ctid = u.c AND r.xmin = u.x")
    # A BEFORE UPDATE trigger may change or suppress the row: check what was written.
    update_checked = sql.SQL(
        "WITH w AS ({update} RETURNING r.{id} AS id, "
        "(r.{val} = u.v AND r.{kid} IS NOT DISTINCT FROM %(active)s) AS ok) "
        "SELECT count(*), count(*) FILTER (WHERE NOT ok), "
        "(array_agg(id::text) FILTER (WHERE NOT ok))[1] FROM w").format(
            update=update.format(**names), **names)
    return Statements(select, select_bounded, row_id, update.format(**names), update_checked)


#: (blocks now, rows and pages at the last ANALYZE, TOAST bytes, block size)
HeapSize = tuple[int, float, int, int, int]


def heap_size(conn: Conn, heap: Heap) -> HeapSize:
    """What cutting a heap into batches needs to know, from the catalog."""
    row = conn.execute(
        "SELECT pg_relation_size(c.oid) / current_setting('block_size')::int, c.reltuples, "
        "c.relpages, CASE WHEN c.reltoastrelid = 0 THEN 0 "
        "ELSE pg_relation_size(c.reltoastrelid) END, current_setting('block_size')::int "
        "FROM pg_class c WHERE c.oid = %s", (heap.oid,)).fetchone()
    return (int(row[0]), float(row[1]), int(row[2]), int(row[3]), int(row[4])
            ) if row else (0, 0.0, 0, 0, 8192)


def count_heap(conn: Conn, heap: Heap) -> int:
    """Rows of one heap, counted (a heap never analysed)."""
    row = conn.execute(sql.SQL("SELECT count(*) FROM ONLY {}").format(heap.ident)).fetchone()
    return int(row[0]) if row else 0
