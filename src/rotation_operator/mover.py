"""Moving rows onto the active key, batch by batch, optionally in parallel processes.

Why batches by *heap block range* rather than by id: a ``ctid`` range is read with a TID
Range Scan (a plain sequential read of those pages, no index probes), works for any id
type, and lets disjoint ranges go to separate worker processes with no coordination.

One batch, inside one transaction::

    SELECT ctid, id, key_id, value, xmin FROM t
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
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.adapt import Dumper, Loader
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


class Tid(bytes):
    """A row's ctid in PostgreSQL's 6-byte binary form, passed back untouched.

    Fetching and sending ctids (and values) in binary avoids text escaping on both sides,
    which otherwise costs more than the encryption itself.
    """

    __slots__ = ()


class _TidLoader(Loader):
    format = Format.BINARY

    def load(self, data: Any) -> Tid:
        return Tid(data)


class _TidDumper(Dumper):
    format = Format.BINARY
    oid = 27  # tid

    def dump(self, obj: Any) -> bytes:
        return bytes(obj)


def register_tid(conn: Conn) -> None:
    """Teach one connection to load and dump ``tid`` in binary."""
    conn.adapters.register_loader("tid", _TidLoader)
    conn.adapters.register_dumper(Tid, _TidDumper)


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
            "SELECT ctid, {id}, {kid}, {val}, xmin::text::bigint FROM {t} "
            "WHERE ctid >= %(lo)s::tid AND ctid < %(hi)s::tid "
            "AND ({kid} IS NULL OR {kid} <> %(active)s)").format(**names)
        self.update = sql.SQL(
            "UPDATE {t} AS r SET {val} = u.v, {kid} = %(active)s "
            "FROM unnest(%(c)b::tid[], %(v)b::bytea[], %(x)b::bigint[]) AS u(c, v, x) "
            "WHERE r.ctid = u.c AND r.xmin::text::bigint = u.x").format(**names)

    def run(self, conn: Conn, lo: int, hi: int) -> tuple[int, int]:
        """Move the rows in blocks [lo, hi); returns (moved, legacy moved).

        Raises :class:`RowDecryptError` before writing anything if one row is bad.
        """
        active = self.ring.active_version
        if not getattr(conn, "_ro_tid", False):
            register_tid(conn)
            conn._ro_tid = True  # type: ignore[attr-defined]
        with conn.cursor(binary=True) as cur:
            rows = cur.execute(self.select, {"lo": f"({lo},0)", "hi": f"({hi},0)",
                                             "active": active}).fetchall()
            if not rows:
                return 0, 0
            try:
                values = self.ring.rotate_many([(r[3], r[2]) for r in rows])
            except BadRow as bad:
                row = rows[bad.index]
                raise RowDecryptError(self.target.name, row[1], row[2]) from None
            ctids = [r[0] for r in rows]
            legacy = sum(1 for r in rows if r[2] is None)
            cur.execute(self.update, {"active": active, "c": ctids, "v": values,
                                      "x": [r[4] for r in rows]})
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

    def ranges(self, lo: int = 0, hi: int | None = None) -> Iterator[tuple[int, int]]:
        end = self.blocks if hi is None else hi
        for start in range(lo, end, self.step):
            yield start, min(start + self.step, end)

    def split(self, parts: int) -> list[tuple[int, int]]:
        """Contiguous, step-aligned block ranges, one per worker."""
        batches = max(1, -(-self.blocks // self.step))
        per = -(-batches // parts)
        out = []
        for i in range(parts):
            lo, hi = i * per * self.step, min((i + 1) * per * self.step, self.blocks)
            if lo < hi:
                out.append((lo, hi))
        return out


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
    """Move one target's rows with ``workers`` processes over disjoint block ranges.

    Processes, not threads: decrypt/encrypt and result parsing hold the GIL, and each
    worker's own connection keeps a second PostgreSQL backend busy.  Workers are started
    with ``spawn`` (safe from a threaded operator) and exit if this process dies, so no
    orphan keeps writing after a crash.  The first error stops all of them; every batch is
    its own transaction, so stopping loses nothing but the batch in flight.
    """
    ctx = mp.get_context("spawn")
    results: Any = ctx.Queue()
    procs = [ctx.Process(target=_worker, daemon=True, name=f"rotation-worker-{i}",
                         args=(dsn, cfg, target_index, kek, lo, hi, pl.step, requested,
                               os.getpid(), results))
             for i, (lo, hi) in enumerate(pl.split(workers))]
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


def _worker(dsn: str, cfg: StoreConfig, target_index: int, kek: bytes, lo: int, hi: int,
            step: int, requested: int, parent: int, results: Any) -> None:
    try:
        store = KeyStore(cfg)
        with db_errors(), connect(dsn, application_name="rotation-operator-worker") as conn:
            mover = BatchMover(cfg.targets[target_index], store.load_ring(conn, kek))
            for a, b in Plan(hi, step).ranges(lo, hi):
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
