"""The rotation workflow: prepare a keys table, decide, rotate or sweep, report results.

This is the service layer both the CLI and the operator call; it knows nothing of
Kubernetes.  One request is one pass: **prepare** once (read-only checks of every target,
then create or migrate the own tables, ensure an active key, prove the KEK), **decide**
with :func:`rotation_operator.policy.decisions.decide` (the caller's decision, or this
module's for the CLI), **act**, report.  Nothing here decides: state is gathered by
:func:`observe` through the decision layer's one gatherer, and ``decide`` is called once
more under the rotation lock, on fresh records, before each step acts.

Acting, under the rotation lock (:mod:`rotation_operator.store.locks`) and with a fresh look
at the records:

1. **claim**: one short transaction mints the new DEK as active and the old one retiring,
   and records a running rotation with a new *fence* token (or, to resume, moves the
   fence of the running record on, which stops whoever ran it before at its next batch);
2. **announce**: stamp the time the key is known committed;
3. **Online**: move rows in batches (:mod:`.mover`), each its own fenced transaction; then
   the **handover**: wait until ``grace`` seconds have passed since the announcement (every
   library ring has seen the new key) and for every transaction in flight at that moment to
   end (their virtual xids in ``pg_locks``, which need no privilege); then pass again
   until a count finds no row under a non-active key; a watchdog stops passes that move
   nothing.  **Atomic**: after the same handover, one transaction locks the targets against
   writes, moves every row, and finishes: rows move all or nothing;
4. **finish**: retire the old keys and mark the record done (fenced);
5. **after**: count rows under retired keys once more (a row committed while the final
   count ran) and sweep them at once; later ones are swept by the refresh timer.

``VACUUM (ANALYZE)`` of the targets follows (every row was rewritten).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from rotation_operator import faults
from rotation_operator.crypto.kek import Kek
from rotation_operator.crypto.keyring import KeyRing
from rotation_operator.errors import (
    DatabaseForbidden,
    KekMismatchError,
    KeysTableShared,
    LegacyNeedsRawKek,
    LockLost,
    RotationOperatorError,
    RotationStuck,
    RowDecryptError,
    RowsUnderUnusableKey,
    SchemaError,
)
from rotation_operator.policy.config import RotationOptions, StoreConfig, Target
from rotation_operator.policy.decisions import (
    Action,
    Decision,
    Request,
    Running,
    State,
    adopts,
    decide,
    gather,
    running_record,
    served_version,
    step_mode,
    usage_high,
)
from rotation_operator.rotation import mover
from rotation_operator.rotation.inspection import migrated
from rotation_operator.rotation.throttle import Throttle, ThrottleFn
from rotation_operator.store import audit
from rotation_operator.store.catalog import Layout, inspect
from rotation_operator.store.database import Conn, Timeouts, check_server, connect, db_errors
from rotation_operator.store.keystore import (
    Coverage,
    KeyStore,
    check_legacy_kek,
    check_no_key_ids,
    has_legacy_rows,
    raise_legacy_needs_raw,
)
from rotation_operator.store.locks import InFlight, RotationLock, in_flight, still_open
from rotation_operator.store.rotations import seconds_since, still_ours
from rotation_operator.store.targets import (
    count_keyed,
    lock_against_writes,
    not_updatable,
    total_size,
    vacuum_analyze,
)

log = logging.getLogger(__name__)
ProgressFn = Callable[[int, int], None]
#: Raises (RotationPaused, RotationCancelled) to stop between batches; called often.
#: Returns the policy version the caller now asks for, if it knows one (a bump that arrives
#: during a scheduled rotation is served by it).
ControlFn = Callable[[], int | None]
#: Passes in a row that move nothing while rows remain before a rotation is called stuck.
STUCK_PASSES = 3
#: Passes after the handover in which rows keep arriving under old keys before stopping.
MAX_FINAL_PASSES = 8
_ACTS = (Action.ROTATE, Action.RESUME, Action.SWEEP)
#: Fault points of a rekey (kill -9 tests).
REKEY_FAULTS = ("rekey-after-legacy", "rekey-before-commit")


@dataclass(frozen=True)
class Prepared:
    """What one preparation found: the targets, the key ring, the database's state."""

    layouts: tuple[Layout, ...]
    ring: KeyRing
    state: State
    created_key: bool = False
    baseline_recorded: bool = False


@dataclass(frozen=True)
class InitResult:
    active_version: int
    created_key: bool
    baseline_recorded: bool
    served_version: int | None


@dataclass(frozen=True)
class RotationResult:
    requested_version: int | None
    performed: bool  # False: nothing was done (see ``decision``)
    resumed: bool
    mode: str
    from_version: int | None
    to_version: int
    decision: Decision | None = None
    kind: str = "policy"
    re_encrypted: int = 0
    legacy_migrated: int = 0
    retired: tuple[int, ...] = ()
    seconds: float = 0.0
    #: What the handover did: grace waited, transactions waited for, timed out.
    handover: dict[str, Any] = field(default_factory=dict)
    #: Rows moved after the handover (written under an old key while the rotation ran).
    caught_in_handover: int = 0
    #: Rows found under a retired key right after the finish, and swept at once.
    swept_after: int = 0
    #: table -> (bytes before rotation, bytes after VACUUM); empty when vacuum is off.
    table_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: Heaps VACUUM skipped because the role may not vacuum them (not the owner).
    vacuum_skipped: tuple[str, ...] = ()
    #: DEK versions rewrapped under the current KEK before anything else (a rekey).
    rekeyed: tuple[int, ...] = ()


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


class Engine:
    """Key management for one keys table and its targets, given a DSN and the KEKs: the
    current one first, then the previous ones a rekey may still need.

    ``owner`` names who the targets are recorded for (a policy's ``namespace/name``);
    ``None`` (the CLI) may use a keys table only with the targets it already covers.
    """

    def __init__(self, dsn: str, cfg: StoreConfig, keks: Sequence[Kek], *, actor: str,
                 owner: str | None = None):
        if not keks:
            raise ValueError("an Engine needs the current KEK (keks[0])")
        self.dsn = dsn
        self.cfg = cfg
        self.store = KeyStore(cfg)
        self._kek = keks[0]
        self._previous = list(keks[1:])
        self.actor = actor
        self.owner = owner

    @property
    def keks(self) -> list[Kek]:
        """The current KEK first, then the previous ones a rekey may still need."""
        return [self._kek, *self._previous]

    def __repr__(self) -> str:  # never show the DSN (password) or the KEK
        return f"Engine(keys={self.cfg.qualified_keys!r}, actor={self.actor!r})"

    # -- prepare -------------------------------------------------------------------------
    def prepare(self, policy_version: int | None = None, request: Request | None = None
                ) -> Prepared:
        """Read-only checks first (server version, every target, the targets the keys table
        already covers, the KEK against legacy rows while no key exists); then create or
        migrate the own tables, ensure an active key, prove the KEK unwraps every DEK (fail
        closed) and record ``policy_version`` as served if no policy version is yet.

        ``request``: what the caller will decide on this state; one that may rotate on
        usage also has the rows counted while the active key is near its bound (a fresh
        key must start well below it)."""
        with db_errors(), connect(self.dsn) as conn:
            check_server(conn)
            layouts = tuple(inspect(conn, t) for t in self.cfg.targets)
            coverage = self.store.check_coverage(conn, layouts, self.owner)
            if coverage is not None:
                self._check_removed(conn, coverage)
            first = None
            if not self.store.exists(conn):
                check_no_key_ids(conn, layouts, self.cfg.qualified_keys)
                first = self._legacy_kek(conn, layouts)
            self.store.migrate(conn)
            if coverage is not None:
                self.store.record_coverage(conn, layouts, self.owner, self.actor)
            created = self.store.ensure_active_key(conn, first or self._kek, self.actor,
                                                   policy_version, layouts)
            ring = self.store.load_ring(conn, self.keks)
            if not ring.reads_legacy and has_legacy_rows(conn, layouts):
                raise_legacy_needs_raw(self._kek)
            baseline = policy_version is not None and self.store.record_baseline(
                conn, policy_version, ring.active_version, self.actor)
            state = observe(conn, self.store, ring.active_version, self._kek.fingerprint,
                            usage=request, targets=layouts)
        return Prepared(layouts, ring, state, created, baseline)

    def _legacy_kek(self, conn: Conn, layouts: Sequence[Layout]) -> Kek:
        """Before key v1 binds the keys table to a KEK: the presented KEK the legacy rows
        were encrypted with (v1 is wrapped by it, so a rekey to the current one moves the
        legacy rows first), or the current KEK when there are none.  Fails closed."""
        failure: RotationOperatorError | None = None
        for kek in self.keks:
            try:
                check_legacy_kek(conn, kek, layouts)
                return kek
            except (KekMismatchError, LegacyNeedsRawKek) as exc:
                failure = failure or exc
        assert failure is not None
        raise failure

    def _check_removed(self, conn: Conn, coverage: Coverage) -> None:
        """A target dropped from the coverage must hold no row under these keys any more:
        its rows would stay under keys that later rotations retire."""
        recorded = self.store.coverage(conn)
        if recorded is None:
            return
        keep = {(t["schema"], t["table"]) for t in coverage.targets}
        for t in recorded.targets:
            if (t["schema"], t["table"]) in keep:
                continue
            try:
                layout = inspect(conn, Target(t["table"], t["idColumn"], t["valueColumn"],
                                              t["keyIdColumn"], t["schema"]), writes=False)
            except SchemaError:
                continue  # dropped or renamed: nothing of it can be read any more
            keyed = count_keyed(conn, layout)
            if keyed:
                raise KeysTableShared(
                    f"{layout.display} still holds {keyed} rows encrypted under keys of "
                    f"{self.cfg.qualified_keys}; keep it among the targets until they are "
                    "gone, or later rotations would retire keys they need")

    def initialise(self, policy_version: int | None = None) -> InitResult:
        """:meth:`prepare`, summarised."""
        p = self.prepare(policy_version)
        return InitResult(p.ring.active_version, p.created_key, p.baseline_recorded,
                          p.state.served)

    # -- act -----------------------------------------------------------------------------
    def execute(self, request: Request, options: RotationOptions | None = None, *,
                prepared: Prepared | None = None, progress: ProgressFn | None = None,
                control: ControlFn | None = None, lock_wait: float = 0.0,
                throttled: ThrottleFn | None = None,
                decision: Decision | None = None) -> RotationResult:
        """Carry out ``request``: decide again, under the lock, on fresh records, and act.

        ``prepared``: this pass's :meth:`prepare`, and ``decision`` what the caller decided
        on it, when the caller already ran them (else both are done here first).
        ``throttled``: told when the rotation waits for its limits, and when it stops.
        """
        options = options or RotationOptions()
        started = time.monotonic()
        if prepared is None:  # a rotation request records no baseline: it rotates
            prepared = self.prepare()
            decision = None
        if decision is None:
            decision = decide(request, prepared.state)
        # A sweep (or a rotation for usage) is decided on counts, which only the look under
        # the lock takes.
        counted_later = request.kind == "sweep" or request.rotate_on_usage
        if not counted_later and decision.action not in (*_ACTS, Action.REKEY):
            return _nothing(request, options, prepared.state, decision)
        timeouts = Timeouts(int(options.lock_timeout * 1000),
                            int(options.statement_timeout * 1000))
        sizes: dict[str, int] = {}
        rekeyed: tuple[int, ...] = ()
        with db_errors(), RotationLock(self.dsn, self.cfg, wait=lock_wait,
                                       heartbeat=options.heartbeat) as lock, \
                connect(self.dsn, timeouts=timeouts) as conn:
            counted = prepared.layouts if request.kind == "sweep" else ()
            state = observe(conn, self.store, prepared.ring.active_version,
                            self._kek.fingerprint, counted, request, prepared.layouts)
            decision = decide(request, state)
            if decision.action is Action.REKEY:  # first the KEK, then whatever else is due
                run = _Run(self, conn, lock, prepared, options, timeouts, progress, control,
                           throttled)
                rekeyed = run.rekey()
                prepared = dataclasses.replace(prepared, ring=run.ring)
                state = observe(conn, self.store, run.ring.active_version,
                                self._kek.fingerprint, counted, request, prepared.layouts)
                decision = decide(request, state)
            if decision.action not in _ACTS:
                return dataclasses.replace(_nothing(request, options, state, decision),
                                           rekeyed=rekeyed, performed=bool(rekeyed))
            self._check_usable(conn, prepared.layouts)
            if options.vacuum:
                sizes = _sizes(conn, prepared.layouts)
            run = _Run(self, conn, lock, prepared, options, timeouts, progress, control,
                       throttled)
            if step_mode(decision, options.mode) == "Atomic":
                run.check_lock_privilege()  # before anything is minted
            result = dataclasses.replace(run.act(decision, request), rekeyed=rekeyed)
        faults.point("before-vacuum")
        if options.vacuum and result.re_encrypted:
            vacuumed, skipped = self._vacuum(prepared.layouts, sizes)
            result = _replace(result, table_sizes=vacuumed, vacuum_skipped=skipped)
        return _replace(result, seconds=time.monotonic() - started)

    def rotate(self, requested_version: int | None = None,
               options: RotationOptions | None = None, *,
               progress: ProgressFn | None = None, control: ControlFn | None = None,
               lock_wait: float = 0.0, throttled: ThrottleFn | None = None) -> RotationResult:
        """Rotate for ``requested_version`` (a policy version), or a manual rotation that
        uses up no policy version when it is ``None``.  Idempotent per policy version;
        resumes an interrupted rotation; raises :class:`LockHeld` if another rotator runs.
        """
        request = Request("policy", requested_version) if requested_version is not None \
            else Request("manual")
        return self.execute(request, options, progress=progress, control=control,
                            lock_wait=lock_wait, throttled=throttled)

    def sweep(self, options: RotationOptions | None = None, *,
              prepared: Prepared | None = None, progress: ProgressFn | None = None,
              control: ControlFn | None = None, lock_wait: float = 0.0,
              throttled: ThrottleFn | None = None) -> RotationResult:
        """Move rows under retired keys onto the active key (no new key)."""
        return self.execute(Request("sweep"), options, prepared=prepared, progress=progress,
                            control=control, lock_wait=lock_wait, throttled=throttled)

    def _check_usable(self, conn: Conn, layouts: Sequence[Layout]) -> None:
        """Refuse before minting when a row names a disabled or destroyed key: no ring
        reads it, so every pass would stop on it."""
        unusable = {k.version: k.state for k in self.store.list_keys(conn)
                    if k.state in ("disabled", "destroyed")}
        if not unusable:
            return
        found = self.store.referenced_any(conn, layouts, sorted(unusable))
        if found is None:
            return
        table, row_id, version = found
        state = unusable[version]
        way_out = ("`keys enable` it, rotate, then disable it again" if state == "disabled"
                   else "its DEK is erased, so the row cannot be decrypted by anyone: delete "
                        "it, or have the application write its value anew")
        raise RowsUnderUnusableKey(
            f"row {row_id!r} of {table} is under DEK v{version}, which is {state} (restored "
            f"from an earlier backup?): no rotation can move it; {way_out}")

    def _vacuum(self, layouts: Iterable[Layout], before: dict[str, int]
                ) -> tuple[dict[str, tuple[int, int]], tuple[str, ...]]:
        """VACUUM (ANALYZE) each heap the role may vacuum: every row was rewritten, so
        half the heap is dead.  Heaps it does not own are left to autovacuum."""
        skipped: list[str] = []
        with db_errors(), connect(self.dsn, timeouts=Timeouts()) as conn:
            for layout in layouts:
                for heap in layout.heaps:
                    if not heap.vacuumable:
                        skipped.append(heap.display)
                        continue
                    vacuum_analyze(conn, heap)
            after = _sizes(conn, layouts)
        if skipped:
            log.info("VACUUM skipped %s: the role does not own them (autovacuum reclaims "
                     "the space)", ", ".join(skipped))
        return {name: (before[name], after[name]) for name in before}, tuple(skipped)


def observe(conn: Conn, store: KeyStore, active: int, current_kek: str | None = None,
            count: Iterable[Layout] = (), usage: Request | None = None,
            targets: Sequence[Layout] = ()) -> State:
    """The database's state for :func:`decide` (``current_kek``: the current KEK's
    fingerprint, to see whether a rekey is due; ``count``: also count rows under retired
    keys in these targets, a full scan, so only sweeps ask; ``usage``: a request that may
    rotate on usage, for which the rows of ``targets`` are counted when the active key is
    near its bound, in ``targets``)."""
    records = store.rotation_records(conn)
    layouts = list(count)
    retired = store.count_stale(conn, layouts, active, legacy=migrated(records)) \
        if layouts else None
    state = gather(store.list_keys(conn), served_version(records),
                   Running.of(running_record(records)), current_kek=current_kek,
                   retired_rows=retired)
    if usage is not None and usage.rotate_on_usage and usage_high(usage, state) and targets:
        rows = store.count_stale(conn, targets, 0, legacy=True)  # every row (no key 0)
        state = dataclasses.replace(state, rows=rows)
    return state


class _Run:
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
        #: is under the KEK, not the active key), when the KEK's bytes are at hand.
        self.sweeps_legacy = prepared.ring.reads_legacy and migrated(
            engine.store.rotation_records(conn))

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
        self.ring = self.store.load_ring(self.conn, self.e.keks)
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
                self._pass(legacy=True)
                handover = self._handover()
                caught = self._passes(legacy=True, after_handover=True)
                retired = self._finish(legacy=True)
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
        total = self.store.count_stale(self.conn, self.layouts, new_version, legacy=True)
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
        self.counter.total = self.store.count_stale(self.conn, self.layouts,
                                                    record.to_version, legacy=True)
        audit.append(self.conn, self.e.cfg, "rotation_resumed", key_version=record.to_version,
                     actor=self.e.actor, detail={"policy_version": record.requested_version,
                                                 "kind": record.kind, "mode": mode,
                                                 "fence": fence})
        log.info("resuming the %s rotation to DEK v%s", record.kind, record.to_version)
        return _Claim(record.id, fence, record.kind, record.requested_version,
                      record.from_version, record.to_version, True, datetime.min)

    def _claim_sweep(self, legacy: bool = False) -> _Claim:
        active = self.ring.active_version
        total = self.store.count_stale(self.conn, self.layouts, active, legacy=legacy)
        record_id, fence = self.store.claim_new(
            self.conn, kind="sweep", requested=None, mode="Online", from_version=None,
            to_version=active, actor=self.e.actor, total=total)
        self.counter.total = total
        return _Claim(record_id, fence, "sweep", None, None, active, False, datetime.min)

    # -- rekey -----------------------------------------------------------------------------
    def rekey(self) -> tuple[int, ...]:
        """Wrap every DEK under the current KEK, unwrapping each with the previous KEK that
        wrapped it.  Legacy rows go first (they are under the old KEK itself): a sweep that
        moves them onto the active DEK.  Then one transaction rewraps every key, each new
        wrap checked before it is written.  Idempotent and crash-safe: the stored
        fingerprints say what is left."""
        current = self.e._kek
        if not self.ring.reads_legacy_as(current) and has_legacy_rows(self.conn,
                                                                      self.layouts):
            if not self.ring.reads_legacy:
                raise_legacy_needs_raw(current)
            log.info("moving legacy rows onto DEK v%s before the KEK changes",
                     self.ring.active_version)
            with self.conn.transaction():
                claim = self._claim_sweep(legacy=True)
            self.claim = dataclasses.replace(claim, announced=self.store.announce(
                self.conn, claim.record_id, claim.fence))
            self._passes(legacy=True, after_handover=False)
            self._finish(legacy=True)
        faults.point("rekey-after-legacy")
        with self.conn.transaction():
            # Disabled keys too: enabling one later must not need the old KEK.
            every = self.store.load_ring(self.conn, self.e.keks, disabled=True)
            done = self.store.rewrap(self.conn, every, current, self.e.actor)
            if done:
                audit.append(self.conn, self.e.cfg, "kek_rotated", actor=self.e.actor,
                             detail={"kek_fingerprint": current.fingerprint,
                                     "rewrapped": done})
            faults.point("rekey-before-commit")
        log.info("rewrapped DEKs %s under the KEK %s", done, current.fingerprint)
        self.ring = self.store.load_ring(self.conn, self.e.keks)
        return tuple(done)

    # -- moving rows ---------------------------------------------------------------------
    def _work(self, layout: Layout, heap_index: int, legacy: bool, fenced: bool
              ) -> mover.Work:
        claim = self.claim
        assert claim is not None
        return mover.Work(layout, layout.heaps[heap_index],
                          mover.Fence(claim.record_id, claim.fence, claim.to_version)
                          if fenced else None, legacy, self.options.effective_batch_size,
                          self.options.max_batch_bytes,
                          count_blocked=fenced and self.options.max_blocked_sessions is not None)

    def _pass(self, *, legacy: bool) -> tuple[int, int]:
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

    def _passes(self, *, legacy: bool, after_handover: bool) -> int:
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
            self._add_total(left)
        for number in range(1, MAX_FINAL_PASSES + 1):
            moved, _ = self._pass(legacy=legacy)
            moved_total += moved
            left = self.store.count_stale(self.conn, self.layouts, self.ring.active_version,
                                          legacy=legacy)
            if not left:
                return moved_total
            self._add_total(left)
            strikes = strikes + 1 if moved == 0 else 0
            if strikes >= STUCK_PASSES:
                raise self._stuck(legacy, f"{STUCK_PASSES} passes moved none of the {left} "
                                          "rows left")
            log.info("pass %d: %d rows still under old keys; passing again", number, left)
            self.sleep(0.2 * strikes)
        raise self._stuck(legacy, f"rows kept arriving under old keys in each of "
                                  f"{MAX_FINAL_PASSES} passes (an application writes with a "
                                  "stale key ring)" if after_handover else "too many passes")

    def _add_total(self, left: int) -> None:
        """Rows found still to move: the rotation's total grows by them (recorded)."""
        self.counter.total += left
        claim = self.claim
        assert claim is not None
        with self.conn.transaction():
            self.store.add_progress(self.conn, claim.record_id, 0, left)

    def _stuck(self, legacy: bool, why: str) -> RotationStuck:
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
                    work = self._work(layout, i, True, fenced=False)
                    pl = mover.plan(self.conn, work)
                    batch = mover.BatchMover(work, self.ring, self.store)
                    for lo, hi in pl.ranges():
                        batch.move_range(self.conn, pl, lo, hi, own_tx=False,
                                         on_batch=on_batch)
            left = self.store.count_stale(self.conn, self.layouts, claim.to_version,
                                          legacy=True)
            if left:
                raise self._stuck(True, f"{left} rows were not updated inside the locked "
                                        "transaction")
            self.store.add_progress(self.conn, claim.record_id, self.counter.done)
            faults.point("before-finish")
            retired = self._retire_and_finish()
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
    def _finish(self, *, legacy: bool) -> tuple[int, ...]:
        claim = self.claim
        assert claim is not None
        with self.conn.transaction():
            self.store.check_fence(self.conn, claim.record_id, claim.fence, claim.to_version,
                                   exclusive=True)
            faults.point("before-finish")
            return self._retire_and_finish()

    def _retire_and_finish(self) -> tuple[int, ...]:
        claim = self.claim
        assert claim is not None
        retired = tuple(self.store.retire_retiring(self.conn, self.e.actor)) \
            if claim.kind != "sweep" else ()
        self.store.add_encryptions(self.conn, claim.to_version, self.counter.done)
        self.store.finish_record(self.conn, claim.record_id,
                                 {"legacyMigrated": self.counter.legacy})
        event = "rows_swept" if claim.kind == "sweep" else "rotation_finished"
        audit.append(self.conn, self.e.cfg, event, key_version=claim.to_version,
                     actor=self.e.actor, detail={"policy_version": claim.requested,
                                                 "kind": claim.kind,
                                                 "re_encrypted": self.counter.done,
                                                 "legacy_migrated": self.counter.legacy,
                                                 "retired": list(retired)})
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
        legacy = self.ring.reads_legacy
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


def _nothing(request: Request, options: RotationOptions, state: State, decision: Decision
             ) -> RotationResult:
    return RotationResult(request.version, False, False, options.mode, state.active,
                          state.active, decision, request.kind)


def _replace(result: RotationResult, **changes: Any) -> RotationResult:
    return dataclasses.replace(result, **changes)


def _sizes(conn: Conn, layouts: Iterable[Layout]) -> dict[str, int]:
    out = {}
    for layout in layouts:
        out[layout.target.name] = total_size(conn, layout)
    return out
