"""One rotation, sweep or rekey under the rotation lock: claim, pass, handover, finish.

:class:`Run` acts on a decision the engine took under the lock (see :mod:`.engine`): it
holds the lock's connection, the fence of the claimed record and the step's counters; the
batches themselves are the mover's (:mod:`.mover`), and every statement is the store's.
:func:`observe` gathers the database's state for the decision layer, under the lock or
before it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from rotation_operator import faults
from rotation_operator.crypto.keyring import KeyRing
from rotation_operator.errors import (
    DatabaseForbidden,
    LockLost,
    RotationOperatorError,
    RotationStuck,
    RowDecryptError,
)
from rotation_operator.policy.config import RotationOptions
from rotation_operator.policy.decisions import (
    Action,
    Decision,
    Request,
    Running,
    State,
    adopts,
    gather,
    running_record,
    served_version,
    step_mode,
    usage_high,
)
from rotation_operator.rotation import mover
from rotation_operator.rotation.inspection import EXACT_BELOW
from rotation_operator.rotation.results import ControlFn, Prepared, ProgressFn, RotationResult
from rotation_operator.rotation.throttle import Throttle, ThrottleFn
from rotation_operator.store import audit
from rotation_operator.store.catalog import Layout
from rotation_operator.store.database import Conn, Timeouts
from rotation_operator.store.keystore import (
    KeyStore,
    has_legacy_rows,
    raise_legacy_needs_raw,
    wrapping_kek,
)
from rotation_operator.store.locks import InFlight, RotationLock, in_flight, still_open
from rotation_operator.store.rotations import seconds_since, still_ours
from rotation_operator.store.targets import (
    LEGACY_ONLY,
    Scope,
    lock_against_writes,
    not_updatable,
)

if TYPE_CHECKING:
    from rotation_operator.rotation.engine import Engine

log = logging.getLogger(__name__)


#: Passes in a row that move nothing while rows remain before a rotation is called stuck.
STUCK_PASSES = 3


#: Passes after the handover in which rows keep arriving under old keys before stopping.
MAX_FINAL_PASSES = 8


@dataclass
class _Counter:
    done: int = 0
    total: int = 0
    legacy: int = 0


@dataclass(frozen=True)
class _Claim:
    record_id: int
    fence: int
    kind: str
    requested: int | None
    from_version: int | None
    to_version: int
    resumed: bool
    announced: datetime


def observe(conn: Conn, store: KeyStore, active: int, current_kek: str | None = None,
            count: Iterable[Layout] = (), usage: Request | None = None,
            targets: Sequence[Layout] = (), *, estimate: bool = False,
            sweeps_legacy: bool = False) -> State:
    """The database's state for :func:`decide` (``current_kek``: the current KEK's
    fingerprint, to see whether a rekey is due; ``count``: also count rows under retired
    keys in these targets, a full scan, so only sweeps ask; ``usage``: a request that may
    rotate on usage, for which the rows of ``targets`` are counted when the active key is
    near its bound, in ``targets``; ``estimate``: from the statistics for large tables, as
    a report's look may, not under the lock; ``sweeps_legacy``: legacy rows count among
    them, as a sweep would move them: :func:`sweeps_legacy`)."""
    records = store.rotation_records(conn)
    layouts = list(count)
    retired = store.count_stale(conn, layouts, active, legacy=sweeps_legacy) \
        if layouts else None
    state = gather(store.list_keys(conn), served_version(records),
                   Running.of(running_record(records)), current_kek=current_kek,
                   retired_rows=retired)
    if usage is not None and usage.rotate_on_usage and usage_high(usage, state) and targets:
        if estimate:
            rows = sum(sum(store.key_estimates(conn, t, active, EXACT_BELOW)[0].values())
                       for t in targets)
        else:
            rows = store.count_stale(conn, targets, 0, legacy=True)  # every row (no key 0)
        state = dataclasses.replace(state, rows=rows)
    return state


def sweeps_legacy(conn: Conn, store: KeyStore, ring: KeyRing) -> bool:
    """Whether a sweep moves legacy rows: only once every legacy row was migrated (one
    written later is under the KEK, not the active key), and only with a ring that reads
    them (the KEK's bytes at hand, and legacy reads kept open, or a vouched legacy KEK)."""
    return ring.reads_legacy and store.legacy_state(conn).migrated


class Run:
    """One rotation or sweep under the lock: its connection, fence and counters."""

    def __init__(self, engine: Engine, conn: Conn, lock: RotationLock, prepared: Prepared,
                 options: RotationOptions, timeouts: Timeouts, progress: ProgressFn | None,
                 control: ControlFn | None, throttled: ThrottleFn | None = None) -> None:
        self.e = engine
        self.store = engine.store
        self.conn = conn
        self.lock = lock
        self.layouts = prepared.layouts
        self.ring = prepared.ring
        self.options = options
        self.timeouts = timeouts
        self._progress = progress
        self._control = control
        self.counter = _Counter()
        self.claim: _Claim | None = None
        #: Online batches wait here for the policy's limits (Atomic mode is one
        #: transaction holding a write lock: waiting inside it would only hurt more).
        self.throttle = Throttle(conn, options, throttled, self.sleep)
        #: A sweep also moves legacy rows once a rotation has moved them (one written later
        #: is under the KEK, not the active key), when its ring reads them.
        self.sweeps_legacy = sweeps_legacy(conn, engine.store, prepared.ring)
        #: A rotation moves legacy rows when its ring reads them; once legacy reads are
        #: closed it leaves them where they are (refused, and reported by name).
        self.moves_legacy = prepared.ring.reads_legacy

    # -- the steps -----------------------------------------------------------------------
    def act(self, decision: Decision, request: Request) -> RotationResult:
        mode = step_mode(decision, self.options.mode)
        with self.conn.transaction():
            if decision.action is Action.ROTATE:
                claim = self._mint(request, mode, decision)
            elif decision.action is Action.RESUME:
                assert decision.running is not None
                claim = self._resume(decision.running, mode)
            else:
                claim = self._claim_sweep(legacy=self.sweeps_legacy)
        faults.point("after-start")
        self.claim = claim = dataclasses.replace(claim, announced=self.store.announce(
            self.conn, claim.record_id, claim.fence))
        self.ring = self.e.load_ring(self.conn)
        self.report()
        try:
            if claim.kind == "sweep":
                handover: dict[str, Any] = {}
                caught = self._passes(legacy=self.sweeps_legacy, after_handover=False)
                retired = self._finish(legacy=self.sweeps_legacy)
            elif mode == "Atomic":
                handover = self._handover()
                retired = self._atomic()
                caught = 0
            else:
                self._pass(legacy=self.moves_legacy)
                handover = self._handover()
                caught = self._passes(legacy=self.moves_legacy, after_handover=True)
                retired = self._finish(legacy=self.moves_legacy)
        except RowDecryptError as exc:
            self._record_failure(exc)
            raise
        swept = self._after() if claim.kind != "sweep" else 0
        return RotationResult(
            claim.requested, True, claim.resumed, mode, claim.from_version, claim.to_version,
            decision, claim.kind, self.counter.done, self.counter.legacy, retired,
            handover=handover, caught_in_handover=caught, swept_after=swept)

    def _mint(self, request: Request, mode: str, decision: Decision) -> _Claim:
        """New DEK active, old ones retiring, rotation recorded: one transaction.  The
        record is claimed first: rotators' batches lock it before the key row.  A scheduled
        rotation serves no policy version (``observedVersion`` stays)."""
        versions = [k.version for k in self.store.list_keys(self.conn)]
        new_version, old = max(versions) + 1, self.ring.active_version
        # Every row moves: none is under the key about to be minted.
        total = self.store.count_stale(self.conn, self.layouts, new_version,
                                       legacy=self.moves_legacy)
        kind = decision.kind
        requested = request.version if kind == "policy" else None
        actor = f"{self.e.actor} {decision.reason}" if kind == "scheduled" else self.e.actor
        record_id, fence = self.store.claim_new(
            self.conn, kind=kind, requested=requested, mode=mode, from_version=old,
            to_version=new_version, actor=actor, total=total)
        self.store.mark_active_retiring(self.conn)
        self.store.insert_key(self.conn, self.e._kek, version=new_version, actor=actor,
                              policy_version=requested,
                              writes=self.store.writes(self.conn, self.layouts))
        audit.append(self.conn, self.e.cfg, "rotation_started", key_version=new_version,
                     actor=actor, detail={"policy_version": requested, "kind": kind,
                                          "mode": mode, "from_version": old, "rows": total,
                                          "why": decision.message})
        self.counter.total = total
        return _Claim(record_id, fence, kind, requested, old, new_version, False,
                      datetime.min)

    def _resume(self, running: Running, mode: str) -> _Claim:
        fence = self.store.claim_resume(self.conn, running.id, mode)
        record = self.store.record(self.conn, running.id)
        # What this run has to move: the rows left (the record counts on from what the
        # earlier runs moved).
        left = self.store.count_stale(self.conn, self.layouts, record.to_version,
                                      legacy=self.moves_legacy)
        self.store.set_left(self.conn, record.id, left)
        self.counter.total = self.counter.done + left
        audit.append(self.conn, self.e.cfg, "rotation_resumed", key_version=record.to_version,
                     actor=self.e.actor, detail={"policy_version": record.requested_version,
                                                 "kind": record.kind, "mode": mode,
                                                 "fence": fence})
        log.info("resuming the %s rotation to DEK v%s", record.kind, record.to_version)
        return _Claim(record.id, fence, record.kind, record.requested_version,
                      record.from_version, record.to_version, True, datetime.min)

    def _claim_sweep(self, legacy: Scope = False) -> _Claim:
        active = self.ring.active_version
        total = self.store.count_stale(self.conn, self.layouts, active, legacy=legacy)
        record_id, fence = self.store.claim_new(
            self.conn, kind="sweep", requested=None, mode="Online", from_version=None,
            to_version=active, actor=self.e.actor, total=total)
        # This run may have moved rows already (the rotation a sweep follows).
        self.counter.total = self.counter.done + total
        return _Claim(record_id, fence, "sweep", None, None, active, False, datetime.min)

    # -- rekey -----------------------------------------------------------------------------
    def rekey(self) -> tuple[int, ...]:
        """Wrap every DEK under the current KEK, unwrapping each with the previous KEK that
        wrapped it.  Legacy rows go first (they are under the old KEK itself): a sweep that
        moves them, and only them, onto the active DEK, while the ring reads them.  Once
        every legacy row was migrated and legacy reads are closed, a late one stays where it
        is (refused, reported by name; ``sweep --legacy-kek`` moves it).  Then one
        transaction rewraps every key, each new wrap checked before it is written.
        Idempotent and crash-safe: the stored fingerprints say what is left.

        No other value changes (``docs/format.md`` §3): a row under a retired DEK needs
        that DEK, not the old KEK, and the DEK is rewrapped.  Moving it would not help
        against a leaked old KEK either: the active DEK was wrapped by it too (a rotation
        after the rekey mints one the old KEK never saw)."""
        current = self.e._kek
        moving = not self.ring.reads_legacy_as(current) and has_legacy_rows(self.conn,
                                                                            self.layouts)
        if moving and not self.ring.reads_legacy:
            if not self.store.legacy_state(self.conn).migrated:
                raise_legacy_needs_raw(wrapping_kek(self.store.list_keys(self.conn),
                                                    self.e.keks) or current)
            log.warning("late legacy rows (key id NULL) stay under the old KEK: this ring "
                        "does not read them (docs/hsm.md: sweep --legacy-kek)")
            moving = False
        if moving:
            log.info("moving legacy rows onto DEK v%s before the KEK changes",
                     self.ring.active_version)
            with self.conn.transaction():
                claim = self._claim_sweep(legacy=LEGACY_ONLY)
            self.claim = dataclasses.replace(claim, announced=self.store.announce(
                self.conn, claim.record_id, claim.fence))
            self._passes(legacy=LEGACY_ONLY, after_handover=False)
            self._finish(legacy=LEGACY_ONLY)
        faults.point("rekey-after-legacy")
        with self.conn.transaction():
            # Disabled keys too: enabling one later must not need the old KEK.
            every = self.e.load_ring(self.conn, disabled=True)
            done = self.store.rewrap(self.conn, every, current, self.e.actor)
            if done:
                audit.append(self.conn, self.e.cfg, "kek_rotated", actor=self.e.actor,
                             detail={"kek_fingerprint": current.fingerprint,
                                     "rewrapped": done})
            faults.point("rekey-before-commit")
        log.info("rewrapped DEKs %s under the KEK %s", done, current.fingerprint)
        self.ring = self.e.load_ring(self.conn)
        self.moves_legacy = self.ring.reads_legacy
        self.sweeps_legacy = sweeps_legacy(self.conn, self.store, self.ring)
        return tuple(done)

    # -- moving rows ---------------------------------------------------------------------
    def _work(self, layout: Layout, heap_index: int, legacy: Scope, fenced: bool
              ) -> mover.Work:
        claim = self.claim
        assert claim is not None
        return mover.Work(layout, layout.heaps[heap_index],
                          mover.Fence(claim.record_id, claim.fence, claim.to_version)
                          if fenced else None, legacy, self.options.effective_batch_size,
                          self.options.max_batch_bytes,
                          count_blocked=fenced and self.options.max_blocked_sessions is not None)

    def _pass(self, *, legacy: Scope) -> tuple[int, int]:
        """One pass over every heap of every target; returns (rows moved, rows read)."""
        before_done, read = self.counter.done, [0]

        def on_batch(moved: int, legacy_moved: int, rows_read: int, blocked: int) -> None:
            self.counter.done += moved
            self.counter.legacy += legacy_moved
            read[0] += rows_read
            self.throttle.moved(moved, blocked)
            self.report()

        gate = self.throttle.wait if self.throttle.active else None

        for layout in self.layouts:
            for i in range(len(layout.heaps)):
                work = self._work(layout, i, legacy, fenced=True)
                pl = mover.plan(self.conn, work)
                if pl.blocks > 16 * pl.step and self.options.workers > 1:
                    mover.run_parallel(self.e.dsn, self.e.cfg, work, self.ring, pl,
                                       self.options.workers, self.timeouts, on_batch,
                                       self.checkpoint, gate)
                    continue
                batch = mover.BatchMover(work, self.ring, self.store)
                for lo, hi in pl.ranges():
                    self.checkpoint()
                    self.throttle.wait()
                    batch.move_range(self.conn, pl, lo, hi, own_tx=True, on_batch=on_batch)
        return self.counter.done - before_done, read[0]

    def _passes(self, *, legacy: Scope, after_handover: bool) -> int:
        """Pass until a count finds no row left; returns the rows these passes moved.

        A pass that moves nothing while rows remain counts as a strike (a trigger
        suppressing the UPDATE, a row the role cannot write); rows that keep arriving under
        old keys pass after pass mean an application keeps writing with a stale key.
        Either stops the rotation with :class:`RotationStuck`, naming a row.
        """
        moved_total, strikes = 0, 0
        if after_handover:
            # The pass before the handover moved every row it saw: count first, since
            # the usual answer is that none arrived since, and a count is one scan where
            # a pass is a scan plus its workers.
            left = self.store.count_stale(self.conn, self.layouts, self.ring.active_version,
                                          legacy=legacy)
            if not left:
                return 0
            self._left(left)
        for number in range(1, MAX_FINAL_PASSES + 1):
            moved, _ = self._pass(legacy=legacy)
            moved_total += moved
            left = self.store.count_stale(self.conn, self.layouts, self.ring.active_version,
                                          legacy=legacy)
            if not left:
                return moved_total
            self._left(left)
            strikes = strikes + 1 if moved == 0 else 0
            if strikes >= STUCK_PASSES:
                raise self._stuck(legacy, f"{STUCK_PASSES} passes moved none of the {left} "
                                          "rows left")
            log.info("pass %d: %d rows still under old keys; passing again", number, left)
            self.sleep(0.2 * strikes)
        raise self._stuck(legacy, f"rows kept arriving under old keys in each of "
                                  f"{MAX_FINAL_PASSES} passes (an application writes with a "
                                  "stale key ring)" if after_handover else "too many passes")

    def _left(self, left: int) -> None:
        """A count found ``left`` rows still to move: the total is the rows moved and
        those left, in this run's progress and in the record (rows, not passes: a row a
        pass could not move counts once, however many passes try it)."""
        self.counter.total = self.counter.done + left
        claim = self.claim
        assert claim is not None
        with self.conn.transaction():
            self.store.set_left(self.conn, claim.record_id, left)

    def _stuck(self, legacy: Scope, why: str) -> RotationStuck:
        active = self.ring.active_version
        for layout in self.layouts:
            for heap in layout.heaps:
                row_id = self.store.example_stale(self.conn, layout, heap, active, legacy)
                if row_id is not None:
                    triggers = heap.before_update_triggers
                    hint = (f"; BEFORE UPDATE triggers on it: {', '.join(triggers)} (one that "
                            "returns NULL suppresses the rotation's UPDATE)") if triggers else ""
                    return RotationStuck(f"rotation to DEK v{active} is stuck: {why}, e.g. "
                                         f"row {row_id!r} of {heap.display}{hint}")
        return RotationStuck(f"rotation to DEK v{active} is stuck: {why}")

    # -- the handover --------------------------------------------------------------------
    def _handover(self) -> dict[str, Any]:
        """Wait until ``grace`` has passed since the key's announcement, then for every
        transaction open in this database at that moment to end (bounded by
        ``handover_timeout``).

        "Every transaction" is every virtual transaction id held then (``pg_locks``, the
        same wait ``CREATE INDEX CONCURRENTLY`` does), written or not yet, plus prepared
        transactions; ``pg_locks`` and the ``datid`` of ``pg_stat_activity`` need no
        privilege.  After it, a row under an old key can come only from a writer that held
        a ciphertext made before its ring saw the new key across transactions; the final
        passes and the sweeps take care of those.
        """
        claim = self.claim
        assert claim is not None
        elapsed = seconds_since(self.conn, claim.announced)
        waited = max(0.0, self.options.grace - elapsed)
        self.sleep(waited)
        vxids, xids = self._in_flight()
        total = len(vxids) + len(xids)
        open_now = total
        deadline = time.monotonic() + self.options.handover_timeout
        started = time.monotonic()
        while open_now:
            open_now = self._still_open(vxids, xids)
            if not open_now or time.monotonic() >= deadline:
                break
            self.sleep(0.05)
        report = {"graceSeconds": round(waited, 3), "transactions": total,
                  "waitedSeconds": round(time.monotonic() - started, 3),
                  "timedOut": bool(open_now), "stillOpen": open_now}
        if open_now:
            log.warning("%d transactions open since before the handover are still running "
                        "after %ss; finishing without them: rows they commit under an old key "
                        "are swept", open_now, self.options.handover_timeout)
        with self.conn.transaction():
            self.store.add_report(self.conn, claim.record_id, {"handover": report})
        return report

    def _in_flight(self) -> InFlight:
        return in_flight(self.conn, self.lock.backend_pid)

    def _still_open(self, vxids: list[tuple[int, str]], xids: list[str]) -> int:
        return still_open(self.conn, (vxids, xids))

    # -- atomic --------------------------------------------------------------------------
    def _atomic(self) -> tuple[int, ...]:
        """Every row in one transaction with the targets locked against writes (readers go
        on).  ``lock_timeout`` bounds the wait for the lock, so a long transaction makes the
        rotation retry instead of queueing every application writer behind it."""
        claim = self.claim
        assert claim is not None
        self.checkpoint()
        with self.conn.transaction():
            for layout in self.layouts:  # the parent's lock covers partitions and children
                lock_against_writes(self.conn, layout)
            self.store.check_fence(self.conn, claim.record_id, claim.fence, claim.to_version,
                                   exclusive=True)

            def on_batch(moved: int, legacy_moved: int, read: int, blocked: int) -> None:
                self.counter.done += moved
                self.counter.legacy += legacy_moved

            for layout in self.layouts:
                for i in range(len(layout.heaps)):
                    work = self._work(layout, i, self.moves_legacy, fenced=False)
                    pl = mover.plan(self.conn, work)
                    batch = mover.BatchMover(work, self.ring, self.store)
                    for lo, hi in pl.ranges():
                        batch.move_range(self.conn, pl, lo, hi, own_tx=False,
                                         on_batch=on_batch)
            left = self.store.count_stale(self.conn, self.layouts, claim.to_version,
                                          legacy=self.moves_legacy)
            if left:
                raise self._stuck(self.moves_legacy, f"{left} rows were not updated inside "
                                                     "the locked transaction")
            self.store.add_progress(self.conn, claim.record_id, self.counter.done)
            faults.point("before-finish")
            retired = self._retire_and_finish(legacy=self.moves_legacy)
        self.report(force=True)
        return retired

    def check_lock_privilege(self) -> None:
        """``LOCK TABLE`` in any mode that blocks writers needs table-level UPDATE (column
        grants do not count), on the target and every partition or child it recurses to."""
        for layout in self.layouts:
            oids = [layout.oid, *[h.oid for h in layout.heaps]]
            row = not_updatable(self.conn, oids)
            if row is not None:
                raise DatabaseForbidden(
                    f"Atomic mode locks {layout.display} against writes, which PostgreSQL "
                    f"allows only with table-level UPDATE: GRANT UPDATE ON {row[0]} TO "
                    f"{row[1]}, or use Online mode (column grants suffice)")

    # -- finishing -----------------------------------------------------------------------
    def _finish(self, *, legacy: Scope) -> tuple[int, ...]:
        claim = self.claim
        assert claim is not None
        with self.conn.transaction():
            self.store.check_fence(self.conn, claim.record_id, claim.fence, claim.to_version,
                                   exclusive=True)
            faults.point("before-finish")
            return self._retire_and_finish(legacy=legacy)

    def _retire_and_finish(self, *, legacy: Scope) -> tuple[int, ...]:
        """Retire, record, audit; and record the legacy rows migrated when this step's
        passes moved them all (``legacy``: they included legacy rows, and the last count
        found none), or a rotation whose ring reads none finds none left."""
        claim = self.claim
        assert claim is not None
        retired = tuple(self.store.retire_retiring(self.conn, self.e.actor)) \
            if claim.kind != "sweep" else ()
        self.store.add_encryptions(self.conn, claim.to_version, self.counter.done)
        self.store.finish_record(self.conn, claim.record_id,
                                 {"legacyMigrated": self.counter.legacy})
        event = "rows_swept" if claim.kind == "sweep" else "rotation_finished"
        detail = {"policy_version": claim.requested, "kind": claim.kind,
                  "re_encrypted": self.counter.done, "legacy_migrated": self.counter.legacy,
                  "retired": list(retired)}
        if self.e.legacy_kek is not None and self.counter.legacy:
            detail["legacy_kek"] = self.e.legacy_kek.fingerprint  # vouched for by the caller
        audit.append(self.conn, self.e.cfg, event, key_version=claim.to_version,
                     actor=self.e.actor, detail=detail)
        if legacy or (claim.kind != "sweep" and not has_legacy_rows(self.conn, self.layouts)):
            self.store.mark_legacy_migrated(self.conn, self.e.actor, claim.record_id)
        return retired

    def _after(self) -> int:
        """Rows committed under a retired key while the final count ran: swept now, in a
        sweep of their own (recorded and audited like any other).  Only while this rotator
        still holds the lock, nothing else runs, and its key is still the active one; the
        rotation itself is done either way (the refresh sweeps what is left)."""
        faults.point("after-finish")
        try:
            self.checkpoint()
        except LockLost:
            log.warning("the rotation lock was lost after the rotation finished; leaving "
                        "rows that arrived under the old key to the next sweep")
            return 0
        # The legacy record as this rotation's finish left it: once closed, a legacy row
        # that arrived meanwhile is a late one (refused, reported), not swept.
        legacy = self.ring.reads_legacy and (
            self.e.legacy_kek is not None or not self.store.legacy_state(self.conn).closed)
        left = self.store.count_stale(self.conn, self.layouts, self.ring.active_version,
                                      legacy=legacy)
        if not left:
            return 0
        done_before = self.counter.done
        with self.conn.transaction():
            if not self._still_ours():
                return 0
            log.warning("%d rows arrived under a retired key as the rotation finished; "
                        "sweeping", left)
            claim = self._claim_sweep(legacy=legacy)
        self.claim = dataclasses.replace(claim, announced=self.store.announce(
            self.conn, claim.record_id, claim.fence))
        self._passes(legacy=legacy, after_handover=True)
        self._finish(legacy=legacy)
        return self.counter.done - done_before

    def _still_ours(self) -> bool:
        """In the caller's transaction: no other rotation runs and our key is active
        (records and key locked, so the answer holds until it commits)."""
        return still_ours(self.conn, self.store.tables, self.ring.active_version)

    # -- plumbing ------------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Between batches: stop if the lock was lost or the caller asks (pause, delete)."""
        self.lock.check()
        if self._control is None:
            return
        desired = self._control()
        claim = self.claim
        if desired is None or claim is None or claim.kind not in ("scheduled", "manual"):
            return
        served = observe(self.conn, self.store, claim.to_version).served
        if adopts(Running(claim.record_id, claim.kind, None, claim.to_version), desired,
                  served):
            with self.conn.transaction():
                self.store.adopt(self.conn, claim.record_id, claim.fence, desired,
                                 self.e.actor)
            self.claim = dataclasses.replace(claim, kind="policy", requested=desired)
            log.info("spec.version %s arrived during a %s rotation to DEK v%s: it serves it",
                     desired, claim.kind, claim.to_version)

    def sleep(self, seconds: float) -> None:
        """Sleep, still checking the lock and the caller's control every 0.2 s."""
        end = time.monotonic() + seconds
        while True:
            self.checkpoint()
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.2, left))

    def report(self, *, force: bool = False) -> None:
        if self._progress is not None:
            self._progress(self.counter.done, max(self.counter.total, self.counter.done))

    def _record_failure(self, exc: RotationOperatorError) -> None:
        claim = self.claim
        try:
            with self.conn.transaction():
                audit.append(self.conn, self.e.cfg, "rotation_failed", actor=self.e.actor,
                             detail={"policy_version": claim.requested if claim else None,
                                     "reason": exc.reason, "message": str(exc)})
        except RotationOperatorError:
            raise
        except Exception:
            log.warning("could not record the failed rotation in the audit log")
