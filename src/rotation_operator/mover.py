"""Moving rows onto the active key, batch by batch, optionally in parallel processes.

Why batches by *heap block range* rather than by id: a ``ctid`` range is read with a TID
Range Scan (a plain sequential read of those pages, no index probes), works for any id
type, and lets disjoint ranges go to separate worker processes with no coordination.

One batch, inside one transaction::

    SELECT tidsend(ctid), key_id, value, xidsend(xmin) FROM t
     WHERE ctid >= '(lo,0)' AND ctid < '(hi,0)' AND key_id IS DISTINCT FROM <active>
    -- decrypt (GCM authenticates every row) and re-encrypt under the active DEK in Python
    UPDATE t SET value = u.v, key_id = <active>
      FROM unnest(<ctids>, <values>, <xmins>) u(c, v, x) WHERE t.ctid = u.c AND t.xmin = u.x

The ``ctid`` match is also the optimistic concurrency check, without ``FOR UPDATE``'s extra
tuple-lock writes: any application UPDATE of a row gives it a new ctid, so a row changed
between our SELECT and UPDATE is simply not matched (PostgreSQL re-checks the condition on
the newest row version) and is picked up by a later pass.  The transaction's own lock on the
table keeps VACUUM FULL / CLUSTER from renumbering tuples in between.  Rows our UPDATE moves
to later pages are under the active key already and are skipped.

``ctid`` alone names a *slot*, not a row version: if VACUUM freed the slot of a row the
application deleted in between, another row's new version could take it, and a ctid-only
UPDATE would write the deleted row's plaintext into that other row.  Today the SELECT's
portal holds back the xmin horizon until the UPDATE, so VACUUM cannot free the slot; the
``xmin`` match (the inserting transaction of the exact version we read) makes that safe by
construction rather than by a protocol detail (tests/db/test_engine_races.py).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue as queue_mod
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import chain
from typing import Any

import psycopg
from psycopg import sql
from psycopg.adapt import Dumper
from psycopg.pq import Format

from . import errors, faults
from .config import StoreConfig, Target
from .errors import DatabaseUnavailable, RowDecryptError
from .keyring import BadRow, KeyRing
from .keystore import RETRYABLE, Conn, KeyStore, connect, db_errors, ident

log = logging.getLogger(__name__)
BATCH_RETRIES = 5
#: Called after each committed batch with (rows moved, legacy rows among them).
BatchFn = Callable[[int, int], None]


class BinaryArray(bytes):
    """A one-dimensional PostgreSQL array already in binary wire format.

    psycopg's generic list dumper works element by element in Python and cost more than
    the encryption itself; these payloads are built with a few ``join`` calls.
    """

    __slots__ = ()
    oid = 0


class TidArray(BinaryArray):
    __slots__ = ()
    oid = 1010  # tid[]


class XidArray(BinaryArray):
    __slots__ = ()
    oid = 1011  # xid[]


class ByteaArray(BinaryArray):
    __slots__ = ()
    oid = 1001  # bytea[]


_ELEMENT_OID = {TidArray: 27, XidArray: 28, ByteaArray: 17}


def build_array(kind: type[BinaryArray], items: list[bytes], width: int = 0) -> BinaryArray:
    """``items`` as a binary array of ``kind``; ``width``: every item has this length."""
    head = struct.pack(">iiiii", 1, 0, _ELEMENT_OID[kind], len(items), 1)
    if width:
        prefix = struct.pack(">i", width)
        return kind(head + prefix + prefix.join(items))
    lengths = [len(item).to_bytes(4, "big") for item in items]
    return kind(head + b"".join(chain.from_iterable(zip(lengths, items, strict=True))))


class _ArrayDumper(Dumper):
    format = Format.BINARY

    def dump(self, obj: Any) -> bytes:
        return bytes(obj)


def register_types(conn: Conn) -> None:
    """Teach one connection the binary array dumpers (ctids and xmins are fetched as
    ``tidsend``/``xidsend`` bytea, PostgreSQL's own binary form)."""
    for kind in (TidArray, XidArray, ByteaArray):
        dumper = type(f"_{kind.__name__}Dumper", (_ArrayDumper,), {"oid": kind.oid})
        conn.adapters.register_dumper(kind, dumper)


class BatchMover:
    """The two statements of one batch for one target, built once."""

    def __init__(self, target: Target, ring: KeyRing):
        self.target = target
        self.ring = ring
        names = {"t": ident(target.schema, target.table),
                 "id": sql.Identifier(target.id_column),
                 "val": sql.Identifier(target.value_column),
                 "kid": sql.Identifier(target.key_id_column)}
        self.select = sql.SQL(
            "SELECT tidsend(ctid), {kid}, {val}, xidsend(xmin) FROM {t} "
            "WHERE ctid >= %(lo)s::tid AND ctid < %(hi)s::tid "
            "AND ({kid} IS NULL OR {kid} <> %(active)s)").format(**names)
        self.row_id = sql.SQL("SELECT {id} FROM {t} WHERE ctid = %(c)s::tid").format(**names)
        self.update = sql.SQL(
            "UPDATE {t} AS r SET {val} = u.v, {kid} = %(active)s "
            "FROM unnest(%(c)b, %(v)b, %(x)b) AS u(c, v, x) "
            "WHERE r.ctid = u.c AND r.xmin = u.x").format(**names)

    def _row_id(self, cur: psycopg.Cursor[Any], ctid: bytes) -> object:
        """The id of the row at a raw ctid (only to name a bad row in the error)."""
        block, offset = struct.unpack(">IH", ctid)
        row = cur.execute(self.row_id, {"c": f"({block},{offset})"}).fetchone()
        return row[0] if row else f"ctid ({block},{offset})"

    def run(self, conn: Conn, lo: int, hi: int) -> tuple[int, int]:
        """Move the rows in blocks [lo, hi); returns (moved, legacy moved).

        Raises :class:`RowDecryptError` before writing anything if one row is bad.
        """
        active = self.ring.active_version
        register_types(conn)  # three dict entries: cheaper than remembering it was done
        with conn.cursor(binary=True) as cur:
            rows = cur.execute(self.select, {"lo": f"({lo},0)", "hi": f"({hi},0)",
                                             "active": active}).fetchall()
            if not rows:
                return 0, 0
            ctids, key_ids, olds, xmins = zip(*rows, strict=True)
            try:
                values = self.ring.rotate_many(olds, key_ids)
            except BadRow as bad:
                raise RowDecryptError(self.target.name, self._row_id(cur, ctids[bad.index]),
                                      key_ids[bad.index]) from None
            legacy = key_ids.count(None)
            cur.execute(self.update, {
                "active": active,
                "c": build_array(TidArray, list(ctids), 6),
                "v": build_array(ByteaArray, values),
                "x": build_array(XidArray, list(xmins), 4)})
            moved = cur.rowcount
        # Rows changed concurrently were skipped; the legacy tally is exact when none was.
        return moved, legacy if moved == len(rows) else min(legacy, moved)


def move_batch(conn: Conn, store: KeyStore, mover: BatchMover, lo: int, hi: int,
               requested: int | None) -> tuple[int, int]:
    """One batch in its own transaction (``requested``: also count it in the rotation
    record), retried on deadlocks with application transactions."""
    for attempt in range(BATCH_RETRIES):
        try:
            with conn.transaction():
                moved, legacy = mover.run(conn, lo, hi)
                if moved and requested is not None:
                    store.add_progress(conn, requested, moved)
            return moved, legacy
        except RETRYABLE as exc:
            log.warning("batch on %s conflicted with an application transaction (%s); "
                        "retrying", mover.target.name, type(exc).__name__)
            time.sleep(0.05 * (attempt + 1))
    raise DatabaseUnavailable(f"batch on {mover.target.name} kept conflicting with "
                              "application transactions; will retry")


@dataclass(frozen=True)
class Plan:
    """How to cut one target's heap into batches."""

    blocks: int
    step: int  # blocks per batch

    def ranges(self) -> Iterator[tuple[int, int]]:
        """[lo, hi) block ranges covering the heap, ``step`` blocks each."""
        for start in range(0, self.blocks, self.step):
            yield start, min(start + self.step, self.blocks)


def plan(conn: Conn, target: Target, batch_size: int) -> Plan:
    """Heap size in blocks and blocks per batch for about ``batch_size`` rows."""
    t = ident(target.schema, target.table)
    row = conn.execute(
        "SELECT pg_relation_size(c.oid) / current_setting('block_size')::int, c.reltuples, "
        "c.relpages FROM pg_class c WHERE c.oid = %s::regclass",
        (t.as_string(conn),)).fetchone()
    blocks, reltuples, relpages = (int(row[0]), float(row[1]), int(row[2])) if row else (0, 0, 0)
    if relpages > 0 and reltuples > 0:
        per_block = reltuples / relpages
    else:  # never analysed: count once
        count = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(t)).fetchone()
        per_block = (count[0] if count else 0) / max(blocks, 1)
    step = max(1, int(batch_size / max(per_block, 1.0)))
    return Plan(blocks, step)


# -- parallel workers --------------------------------------------------------------------
def run_parallel(dsn: str, cfg: StoreConfig, target_index: int, kek: bytes, pl: Plan,
                 workers: int, requested: int, on_batch: BatchFn) -> None:
    """Move one target's rows with ``workers`` processes sharing one queue of block ranges.

    A shared queue, not a fixed split: live rows are rarely spread evenly over the heap
    (after an UPDATE and VACUUM they sit in one half), so each worker takes the next range
    when it is free.  Processes, not threads: decrypt/encrypt and result parsing hold the
    GIL, and each worker's own connection keeps a second PostgreSQL backend busy.  Workers
    are started with ``spawn`` (safe from a threaded operator) and exit if this process
    dies, so no orphan keeps writing after a crash.  The first error stops all of them;
    every batch is its own transaction, so stopping loses nothing but the batch in flight.
    """
    ctx = mp.get_context("spawn")
    results: Any = ctx.Queue()
    tasks: Any = ctx.Queue()
    for block_range in pl.ranges():
        tasks.put(block_range)
    for _ in range(workers):
        tasks.put(None)
    procs = [ctx.Process(target=_worker, daemon=True, name=f"rotation-worker-{i}",
                         args=(dsn, cfg, target_index, kek, tasks, requested, os.getpid(),
                               results))
             for i in range(workers)]
    for p in procs:
        p.start()
    running = len(procs)
    try:
        while running:
            try:
                kind, *payload = results.get(timeout=0.5)
            except queue_mod.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise DatabaseUnavailable(
                        f"rotation worker {dead[0].name} died (exit {dead[0].exitcode}); "
                        "the rotation resumes on the next attempt") from None
                continue
            if kind == "batch":
                on_batch(payload[0], payload[1])
            elif kind == "done":
                running -= 1
            else:
                raise _rebuild(kind, payload)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
        results.close()
        tasks.close()


def _worker(dsn: str, cfg: StoreConfig, target_index: int, kek: bytes, tasks: Any,
            requested: int, parent: int, results: Any) -> None:
    try:
        store = KeyStore(cfg)
        with db_errors(), connect(dsn, application_name="rotation-operator-worker") as conn:
            mover = BatchMover(cfg.targets[target_index], store.load_ring(conn, kek))
            for a, b in iter(tasks.get, None):
                if os.getppid() != parent:
                    return  # the rotator died: stop, its lock is gone
                moved, legacy = move_batch(conn, store, mover, a, b, requested)
                results.put(("batch", moved, legacy))
                faults.point("after-batch")
        results.put(("done",))
    except RowDecryptError as exc:
        results.put(("row", exc.table, exc.row_id, exc.key_version))
    except errors.RotationOperatorError as exc:
        results.put(("error", type(exc).__name__, str(exc)))
    except psycopg.Error as exc:
        results.put(("error", "DatabaseUnavailable", f"database error: {type(exc).__name__}"))


def _rebuild(kind: str, payload: list[Any]) -> errors.RotationOperatorError:
    """Re-create a worker's error in the parent (exceptions with a custom ``__init__`` do
    not survive pickling, so workers send their fields)."""
    if kind == "row":
        table, row_id, key_version = payload
        return RowDecryptError(table, row_id, key_version)
    name, message = payload
    cls = vars(errors).get(name)
    if not (isinstance(cls, type) and issubclass(cls, errors.RotationOperatorError)):
        cls = errors.RotationOperatorError
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    return exc
