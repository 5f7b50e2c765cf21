"""Moving rows onto the active key, batch by batch, optionally in parallel processes.

Why batches by *heap block range* rather than by id: a ``ctid`` range is read with a TID
Range Scan (a plain sequential read of those pages, no index probes), works for any id
type, and lets disjoint ranges go to separate worker processes with no coordination.  A
target's rows may live in several heaps (leaf partitions, inheritance children; see
:mod:`rotation_operator.store.catalog`): each heap is walked on its own and every
statement says ``ONLY``, since ``ctid`` and ``xmin`` are unique only within one heap.

One batch, inside one transaction (the statements are built in
:mod:`rotation_operator.store.batches` and :mod:`rotation_operator.store.rotations`; this
module executes them)::

    -- the fence: this rotation is still the running one, its key still the active one
    SELECT phase, fence FROM K_rotations WHERE id = <rotation> FOR KEY SHARE
    SELECT state FROM K WHERE version = <active> FOR KEY SHARE
    SELECT tidsend(ctid), key_id, value, xidsend(xmin) FROM ONLY heap
     WHERE ctid >= '(lo,0)' AND ctid < '(hi,0)' AND key_id IS DISTINCT FROM <active>
    -- decrypt (GCM authenticates every row) and re-encrypt under the active DEK in Python
    UPDATE ONLY heap SET value = u.v, key_id = <active>
      FROM unnest(<ctids>, <values>, <xmins>) u(c, v, x) WHERE heap.ctid = u.c AND heap.xmin = u.x
    UPDATE K_rotations SET re_encrypted = re_encrypted + <moved> WHERE id = <rotation>

The ``ctid`` match is also the optimistic concurrency check, without ``FOR UPDATE``'s extra
tuple-lock writes: any application UPDATE of a row gives it a new ctid, so a row changed
between our SELECT and UPDATE is simply not matched (PostgreSQL re-checks the condition on
the newest row version) and is picked up by a later pass.  The ``xmin`` match (the inserting
transaction of the exact version we read) keeps a slot freed by VACUUM and reused by another
row from receiving this row's value (tests/db/test_engine_races.py).

The fence rows are locked ``FOR KEY SHARE`` until the batch commits: a rotator that takes
the rotation over, or mints a newer key, locks them ``FOR UPDATE`` and so waits for the batch
in flight, and every later batch of the old rotator sees it has been fenced off.  (Workers'
progress increments do not conflict with each other's ``KEY SHARE``.)

Memory: a batch is bounded by rows *and* bytes.  Values stored inline live inside the heap
pages, so a range of ``max_batch_bytes / 8 KiB`` blocks cannot hold more; that bound is
exact.  Once a heap has TOASTed values (its TOAST relation is not empty), a block can point
at any amount of data, so every batch is cut by a running sum of ``octet_length(value)``
(the raw length, read from the TOAST pointer without fetching the value): the server
returns rows of a block range, in ctid order, only until the budget is reached, and the
next batch starts after the last ctid returned.
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
from psycopg.adapt import Dumper
from psycopg.pq import Format

from rotation_operator import errors, faults
from rotation_operator.crypto.keyring import BadRow, KeyRing
from rotation_operator.errors import DatabaseUnavailable, RowDecryptError, TriggerInterference
from rotation_operator.policy.config import StoreConfig
from rotation_operator.store import batches, load
from rotation_operator.store.catalog import Heap, Layout
from rotation_operator.store.database import (
    RETRYABLE,
    Conn,
    Timeouts,
    connect,
    db_errors,
    translate,
)
from rotation_operator.store.keystore import KeyStore
from rotation_operator.store.targets import Scope

log = logging.getLogger(__name__)
BATCH_RETRIES = 5
#: Called after each committed batch with (rows moved, legacy rows among them, rows read,
#: application sessions the batch kept waiting on its locks just before it committed).
BatchFn = Callable[[int, int, int, int], None]
#: Before handing out the next block range (parallel workers): waits as the throttle asks.
GateFn = Callable[[], None]


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


@dataclass(frozen=True)
class Fence:
    """The rotation a batch works for: checked in every batch transaction."""

    record_id: int
    token: int
    key_version: int


@dataclass(frozen=True)
class Plan:
    """How to cut one heap into batches."""

    blocks: int
    step: int  # blocks per batch
    #: The heap has TOASTed values: cut each range by a running sum of value bytes.
    bounded: bool = False

    def ranges(self) -> Iterator[tuple[int, int]]:
        """[lo, hi) block ranges covering the heap, ``step`` blocks each."""
        for start in range(0, self.blocks, self.step):
            yield start, min(start + self.step, self.blocks)


@dataclass(frozen=True)
class Work:
    """Everything a mover needs besides a connection and a ring (picklable for workers)."""

    layout: Layout
    heap: Heap
    fence: Fence | None  # None inside an Atomic transaction (the record is locked already)
    legacy: Scope        # also (or only) move legacy (NULL) rows
    batch_size: int
    max_batch_bytes: int
    #: Count the application sessions each batch blocks (load back-off).
    count_blocked: bool = False


class BatchMover:
    """One batch for one heap; its statements are built once (:mod:`.store.batches`)."""

    def __init__(self, work: Work, ring: KeyRing, store: KeyStore):
        self.work = work
        self.ring = ring
        self.store = store
        built = batches.statements(work.layout, work.heap, work.legacy)
        self.select, self.select_bounded = built.select, built.select_bounded
        self.row_id, self.update = built.row_id, built.update
        self.update_checked = built.update_checked
        self.blocked = load.BLOCKED
        # A BEFORE UPDATE trigger may change or suppress the row: check what was written.
        self.verified = bool(work.heap.before_update_triggers)

    def _row_id(self, cur: psycopg.Cursor[Any], ctid: bytes) -> object:
        """The id of the row at a raw ctid (only to name a bad row in the error)."""
        block, offset = struct.unpack(">IH", ctid)
        row = cur.execute(self.row_id, {"c": f"({block},{offset})"}).fetchone()
        return row[0] if row else f"ctid ({block},{offset})"

    def run(self, conn: Conn, lo: str, hi: str, bounded: bool = False
            ) -> tuple[int, int, int, bytes | None]:
        """Move rows with ``lo <= ctid < hi`` in the caller's transaction (``bounded``: only
        the first ones in ctid order that fit the byte budget, and at most ``batch_size``).

        Returns (moved, legacy moved, rows read, ctid of the last row read).  Raises
        :class:`RowDecryptError` before writing anything if one row is bad.
        """
        active = self.ring.active_version
        register_types(conn)  # three dict entries: cheaper than remembering it was done
        params: dict[str, Any] = {"lo": lo, "hi": hi, "active": active}
        with conn.cursor(binary=True) as cur:
            if bounded:
                params.update(budget=self.work.max_batch_bytes, n=self.work.batch_size)
                rows = cur.execute(self.select_bounded, params).fetchall()
            else:
                rows = cur.execute(self.select, params).fetchall()
            if not rows:
                return 0, 0, 0, None
            ctids, key_ids, olds, xmins = zip(*rows, strict=True)
            faults.point("batch-read")
            try:
                values = self.ring.rotate_many(olds, key_ids)
            except BadRow as bad:
                raise RowDecryptError(self.work.layout.target.name,
                                      self._row_id(cur, ctids[bad.index]),
                                      key_ids[bad.index]) from None
            legacy = key_ids.count(None)
            args = {"active": active, "c": build_array(TidArray, list(ctids), 6),
                    "v": build_array(ByteaArray, values),
                    "x": build_array(XidArray, list(xmins), 4)}
            if self.verified:
                row = cur.execute(self.update_checked, args).fetchone()
                assert row is not None
                moved, wrong, example = int(row[0]), int(row[1]), row[2]
                if wrong:
                    raise TriggerInterference(
                        f"a BEFORE UPDATE trigger on {self.work.heap.display} "
                        f"({', '.join(self.work.heap.before_update_triggers)}) changed what the "
                        f"rotation wrote to {wrong} rows (e.g. id {example}); nothing of the "
                        "batch was written: make the trigger leave the value and key-id "
                        "columns alone")
            else:
                cur.execute(self.update, args)
                moved = cur.rowcount
        # Rows changed concurrently were skipped; the legacy tally is exact when none was.
        return moved, legacy if moved == len(rows) else min(legacy, moved), len(rows), ctids[-1]

    def move_range(self, conn: Conn, plan: Plan, lo: int, hi: int, *, own_tx: bool,
                   on_batch: BatchFn) -> None:
        """Move the rows of blocks [lo, hi): one batch, or (a bounded plan) batches of at
        most ``max_batch_bytes`` each; ``own_tx``: every batch in its own fenced
        transaction."""
        start, end = f"({lo},0)", f"({hi},0)"
        while True:
            blocked = 0
            if own_tx:
                moved, legacy, read, last, blocked = self._fenced(conn, start, end,
                                                                  plan.bounded)
            else:
                moved, legacy, read, last = self.run(conn, start, end, plan.bounded)
            if read:
                on_batch(moved, legacy, read, blocked)
            faults.point("after-batch")
            if not plan.bounded or last is None:
                return
            block, offset = struct.unpack(">IH", last)
            start = f"({block},{offset + 1})"

    def _fenced(self, conn: Conn, lo: str, hi: str, bounded: bool
                ) -> tuple[int, int, int, bytes | None, int]:
        """One batch in its own transaction, fenced, retried on deadlocks with
        application transactions; also returns the sessions it blocked before commit."""
        fence = self.work.fence
        assert fence is not None
        for attempt in range(BATCH_RETRIES):
            try:
                with conn.transaction():
                    self.store.check_fence(conn, fence.record_id, fence.token,
                                           fence.key_version)
                    result = self.run(conn, lo, hi, bounded)
                    blocked = 0
                    if result[0]:
                        self.store.add_progress(conn, fence.record_id, result[0])
                        if self.work.count_blocked:
                            row = conn.execute(self.blocked).fetchone()
                            blocked = int(row[0]) if row else 0
                    faults.point("batch-before-commit")
                    return (*result, blocked)
            except (*RETRYABLE, psycopg.errors.LockNotAvailable) as exc:
                log.warning("batch on %s conflicted with an application transaction (%s); "
                            "retrying", self.work.heap.display, type(exc).__name__)
                time.sleep(0.05 * (attempt + 1))
        raise DatabaseUnavailable(f"batch on {self.work.heap.display} kept conflicting with "
                                  "application transactions; will retry")


def plan(conn: Conn, work: Work) -> Plan:
    """Heap size in blocks, blocks per batch for about ``batch_size`` rows, and whether the
    heap's values may exceed what its pages hold (TOAST): then batches are cut by bytes."""
    heap = work.heap
    blocks, reltuples, relpages, toast, block_size = batches.heap_size(conn, heap)
    if blocks == 0:
        return Plan(0, 1)
    if relpages > 0 and reltuples > 0:
        per_block = reltuples / relpages
    else:  # never analysed: count once
        per_block = batches.count_heap(conn, heap) / max(blocks, 1)
    by_rows = max(1, int(work.batch_size / max(per_block, 1.0)))
    if toast:
        # Values out of line: a range of blocks holds about this many bytes of them, so a
        # range is about one byte-bounded batch, and the throttle, the pause and the lock
        # checks between ranges come about once per batch, not once per thousand.
        per_block_bytes = (blocks * block_size + toast) / blocks
        by_bytes = max(1, int(work.max_batch_bytes / per_block_bytes))
        return Plan(blocks, min(by_rows, by_bytes), bounded=True)
    # Inline values live in the pages: this many blocks cannot hold more than the budget.
    by_bytes = max(1, work.max_batch_bytes // block_size)
    return Plan(blocks, min(by_rows, by_bytes))


# -- parallel workers --------------------------------------------------------------------
def run_parallel(dsn: str, cfg: StoreConfig, work: Work, ring: KeyRing, pl: Plan, workers: int,
                 timeouts: Timeouts, on_batch: BatchFn, between: Callable[[], None],
                 gate: GateFn | None = None) -> None:
    """Move one heap's rows with ``workers`` processes sharing one queue of block ranges.

    A shared queue, not a fixed split: live rows are rarely spread evenly over the heap
    (after an UPDATE and VACUUM they sit in one half), so each worker takes the next range
    when it is free.  Processes, not threads: decrypt/encrypt and result parsing hold the
    GIL, and each worker's own connection keeps a second PostgreSQL backend busy.  Workers
    are started with ``spawn`` (safe from a threaded operator) and exit if this process
    dies, so no orphan keeps writing after a crash.  The first error stops all of them;
    every batch is its own fenced transaction, so stopping loses nothing but the batch in
    flight.  ``between`` runs in this process while the workers work (lock and control
    checks); whatever it raises stops them.

    With a ``gate`` (a throttle), ranges are handed out one at a time as workers finish
    them, each only once the gate lets it: the limits hold over all workers together.
    """
    ctx = mp.get_context("spawn")
    # The ring travels to the workers over the spawn pipe (never a log or an argument), as
    # the key material it pickles to (KeyRing.__reduce__): its unwrapped DEKs, and the
    # KEK's bytes only if it reads legacy rows (an HSM's KEK cannot leave it at all).
    results: Any = ctx.Queue()
    tasks: Any = ctx.Queue()
    pending = iter(pl.ranges())

    def hand_out(n: int) -> None:
        for _ in range(n):
            block_range = next(pending, None)
            if block_range is None:
                tasks.put(None)  # one sentinel per worker that asks once all is handed out
                continue
            if gate is not None:
                gate()
            tasks.put(block_range)

    if gate is not None:
        hand_out(workers)
    else:
        for block_range in pending:
            tasks.put(block_range)
        for _ in range(workers):
            tasks.put(None)
    procs = [ctx.Process(target=_worker, daemon=True, name=f"rotation-worker-{i}",
                         args=(dsn, cfg, work, ring, pl, timeouts, tasks, os.getpid(),
                               results))
             for i in range(workers)]
    for p in procs:
        p.start()
    running = len(procs)
    try:
        while running:
            between()
            try:
                kind, *payload = results.get(timeout=0.2)
            except queue_mod.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise DatabaseUnavailable(
                        f"rotation worker {dead[0].name} died (exit {dead[0].exitcode}); "
                        "the rotation resumes on the next attempt") from None
                continue
            if kind == "batch":
                on_batch(payload[0], payload[1], payload[2], payload[3])
            elif kind == "range":
                if gate is not None:
                    hand_out(1)
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


def _worker(dsn: str, cfg: StoreConfig, work: Work, ring: KeyRing, pl: Plan,
            timeouts: Timeouts, tasks: Any, parent: int, results: Any) -> None:
    try:
        store = KeyStore(cfg)
        with db_errors(), connect(dsn, application_name="rotation-operator-worker",
                                  timeouts=timeouts) as conn:
            mover = BatchMover(work, ring, store)

            def report(moved: int, legacy: int, read: int, blocked: int) -> None:
                results.put(("batch", moved, legacy, read, blocked))

            while True:
                try:
                    task = tasks.get(timeout=1.0)
                except queue_mod.Empty:
                    task = ()
                if os.getppid() != parent:
                    return  # the rotator died (even by kill -9): stop, its lock is gone
                if task is None:
                    break
                if not task:
                    continue
                a, b = task
                mover.move_range(conn, pl, a, b, own_tx=True, on_batch=report)
                results.put(("range",))
        results.put(("done",))
    except RowDecryptError as exc:
        results.put(("row", exc.table, exc.row_id, exc.key_version))
    except errors.RotationOperatorError as exc:
        results.put(("error", type(exc).__name__, str(exc)))
    except psycopg.Error as exc:
        err = translate(exc)
        results.put(("error", type(err).__name__, str(err)))


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
