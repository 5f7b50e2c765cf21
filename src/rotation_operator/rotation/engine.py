"""The rotation workflow: prepare a keys table, decide, rotate or sweep, report results.

This is the service layer both the CLI and the operator call; it knows nothing of
Kubernetes.  One request is one pass: **prepare** once (read-only checks of every target,
then create or migrate the own tables, ensure an active key, prove the KEK), **decide**
with :func:`rotation_operator.policy.decisions.decide` (the caller's decision, or this
module's for the CLI), **act**, report.  Nothing here decides: state is gathered by
:func:`observe` through the decision layer's one gatherer, and ``decide`` is called once
more under the rotation lock, on fresh records, before each step acts.

Acting (:class:`~rotation_operator.rotation.run.Run`), under the rotation lock
(:mod:`rotation_operator.store.locks`) and with a fresh look at the records:

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
from collections.abc import Iterable, Sequence
from typing import Any

from rotation_operator import faults
from rotation_operator.crypto.kek import Kek
from rotation_operator.crypto.keyring import KeyRing
from rotation_operator.errors import (
    ConfigError,
    KekMismatchError,
    KeysTableShared,
    LegacyNeedsRawKek,
    RotationOperatorError,
    RowsUnderUnusableKey,
    SchemaError,
)
from rotation_operator.policy.config import RotationOptions, StoreConfig, Target
from rotation_operator.policy.decisions import (
    Action,
    Decision,
    Request,
    State,
    decide,
    step_mode,
)
from rotation_operator.rotation.results import (
    ControlFn,
    InitResult,
    Prepared,
    ProgressFn,
    RotationResult,
)
from rotation_operator.rotation.run import Run, observe, sweeps_legacy
from rotation_operator.rotation.throttle import ThrottleFn
from rotation_operator.store.catalog import Layout, inspect
from rotation_operator.store.database import Conn, Timeouts, check_server, connect, db_errors
from rotation_operator.store.keystore import (
    Coverage,
    KeyStore,
    check_legacy_kek,
    check_no_key_ids,
    has_legacy_rows,
    raise_legacy_needs_raw,
    wrapping_kek,
)
from rotation_operator.store.legacy import Reads
from rotation_operator.store.locks import RotationLock
from rotation_operator.store.targets import (
    count_keyed,
    total_size,
    vacuum_analyze,
)

log = logging.getLogger(__name__)
_ACTS = (Action.ROTATE, Action.RESUME, Action.SWEEP)


class Engine:
    """Key management for one keys table and its targets, given a DSN and the KEKs: the
    current one first, then the previous ones a rekey may still need.

    ``owner`` names who the targets are recorded for (a policy's ``namespace/name``);
    ``None`` (the CLI) may use a keys table only with the targets it already covers.
    ``legacy_reads``: whether rings keep reading legacy rows once every one was migrated
    (``spec.legacy.reads``, ``--legacy-reads``), recorded by :meth:`prepare`; None keeps
    what the database records.  ``legacy_kek``: a KEK the caller vouches the legacy rows
    are under (``sweep --legacy-kek``): this engine's rings read them with its bytes, and
    its sweeps move them, even after legacy reads closed: the way to move a late legacy row
    that was reported by name (``docs/hsm.md``).
    """

    def __init__(self, dsn: str, cfg: StoreConfig, keks: Sequence[Kek], *, actor: str,
                 owner: str | None = None, legacy_reads: Reads | None = None,
                 legacy_kek: Kek | None = None):
        if not keks:
            raise ValueError("an Engine needs the current KEK (keks[0])")
        if legacy_kek is not None and not legacy_kek.extractable:
            raise ConfigError(f"the legacy KEK ({legacy_kek.describe()}) must give its bytes: "
                              "legacy rows are values under the KEK itself, and a PKCS#11 "
                              "key never lets its bytes out")
        self.legacy_reads = legacy_reads
        self.legacy_kek = legacy_kek
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

    def load_ring(self, conn: Conn, *, disabled: bool = False) -> KeyRing:
        """The ring of the presented KEKs (and the vouched legacy KEK, if any)."""
        return self.store.load_ring(conn, self.keks, disabled=disabled,
                                    vouched=self.legacy_kek)

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
                if self.store.list_keys(conn):  # prove the keyset before writing to it
                    self.store.load_ring(conn, self.keks)
                self.store.record_coverage(conn, layouts, self.owner, self.actor)
            if self.legacy_reads is not None:
                with conn.transaction():
                    self.store.set_legacy_reads(conn, self.legacy_reads, self.actor)
            created = self.store.ensure_active_key(conn, first or self._kek, self.actor,
                                                   policy_version, layouts)
            ring = self.load_ring(conn)
            # Before the first rotation moved them, legacy rows need the bytes of the KEK
            # they are under; after it, one is a late legacy row: reported, never blocking.
            if ring.legacy_key is None and not self.store.legacy_state(conn).migrated and \
                    has_legacy_rows(conn, layouts):
                raise_legacy_needs_raw(
                    wrapping_kek(self.store.list_keys(conn), self.keks) or self._kek)
            baseline = policy_version is not None and self.store.record_baseline(
                conn, policy_version, ring.active_version, self.actor)
            state = observe(conn, self.store, ring.active_version, self._kek.fingerprint,
                            usage=request, targets=layouts, estimate=True)
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

        ``prepared``: this pass's :meth:`prepare`, when the caller already ran it;
        ``decision``: what the caller decided to report (else it is decided here first, on
        the prepared state).
        ``throttled``: told when the rotation waits for its limits, and when it stops.
        """
        options = options or RotationOptions()
        started = time.monotonic()
        if prepared is None:  # a rotation request records no baseline: it rotates
            prepared = self.prepare()
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
                            self._kek.fingerprint, counted, request, prepared.layouts,
                            sweeps_legacy=sweeps_legacy(conn, self.store, prepared.ring))
            decision = decide(request, state)
            if decision.action is Action.REKEY:  # first the KEK, then whatever else is due
                run = Run(self, conn, lock, prepared, options, timeouts, progress, control,
                           throttled)
                rekeyed = run.rekey()
                prepared = dataclasses.replace(prepared, ring=run.ring)
                state = observe(conn, self.store, run.ring.active_version,
                                self._kek.fingerprint, counted, request, prepared.layouts,
                                sweeps_legacy=run.sweeps_legacy)
                decision = decide(request, state)
            if decision.action not in _ACTS:
                return dataclasses.replace(_nothing(request, options, state, decision),
                                           rekeyed=rekeyed, performed=bool(rekeyed))
            self._check_usable(conn, prepared.layouts)
            if options.vacuum:
                sizes = _sizes(conn, prepared.layouts)
            run = Run(self, conn, lock, prepared, options, timeouts, progress, control,
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
              throttled: ThrottleFn | None = None,
              decision: Decision | None = None) -> RotationResult:
        """Move rows under retired keys onto the active key (no new key); ``decision``: the
        caller's, to report (decided again under the lock before anything moves)."""
        return self.execute(Request("sweep"), options, prepared=prepared, progress=progress,
                            control=control, lock_wait=lock_wait, throttled=throttled,
                            decision=decision)

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
