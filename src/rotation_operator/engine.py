"""The rotation workflow: initialise a keys table, rotate to a new DEK, report results.

This is the service layer both the CLI and the operator call; it knows nothing of
Kubernetes.  The shape of one rotation:

1. take the session-level advisory lock of the keys table (one rotator at a time);
2. decide from the rotation records what the request means: already served (no-op),
   an interrupted rotation to resume, or a new one;
3. **Online**: commit the new DEK as active and the old one as retiring in one short
   transaction, then move rows in batches (:mod:`.mover`: a heap block range read by TID,
   decrypt-check-encrypt in Python, one set-based ``UPDATE … FROM unnest`` guarded by
   ctid and xmin), each batch its own transaction, in ``workers`` processes for big
   tables; wait ``grace`` seconds after minting and for older transactions to end
   (:meth:`Engine._settle`), and pass again until no row is under a non-active key; then
   retire the old keys and mark the rotation done in one transaction.  Progress lives in
   the rows, so a crash anywhere resumes where it stopped.
   **Atomic**: the same steps inside one transaction with the targets locked against
   writes: all or nothing.
4. optionally ``VACUUM (ANALYZE)`` the targets (every row was rewritten).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from . import audit, faults, mover
from .config import RotationOptions, StoreConfig, Target
from .errors import (
    RotationOperatorError,
    RowDecryptError,
)
from .keyring import KeyRing
from .keystore import Conn, KeyStore, connect, db_errors, ident, rotation_lock

log = logging.getLogger(__name__)
ProgressFn = Callable[[int, int], None]
_BATCH_RETRIES = 5


@dataclass(frozen=True)
class InitResult:
    active_version: int
    created_key: bool
    baseline_recorded: bool
    served_version: int | None


@dataclass(frozen=True)
class RotationResult:
    requested_version: int
    performed: bool  # False: this version was already served, nothing was done
    resumed: bool
    mode: str
    from_version: int | None
    to_version: int
    re_encrypted: int = 0
    legacy_migrated: int = 0
    retired: tuple[int, ...] = ()
    seconds: float = 0.0
    #: table -> (bytes before rotation, bytes after VACUUM); empty when vacuum is off.
    table_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass
class _Counter:
    done: int = 0
    total: int = 0
    legacy: int = 0


class Engine:
    """Key management for one keys table and its targets, given a DSN and the KEK."""

    def __init__(self, dsn: str, cfg: StoreConfig, kek: bytes, *, actor: str):
        self.dsn = dsn
        self.cfg = cfg
        self.store = KeyStore(cfg)
        self._kek = kek
        self.actor = actor

    def __repr__(self) -> str:  # never show the DSN (password) or the KEK
        return f"Engine(keys={self.cfg.qualified_keys!r}, actor={self.actor!r})"

    # -- initialise ----------------------------------------------------------------------
    def initialise(self, policy_version: int | None = None) -> InitResult:
        """Create own tables, check targets, ensure an active key, prove the KEK (fail
        closed), and record ``policy_version`` as served if nothing was recorded yet."""
        with db_errors(), connect(self.dsn) as conn:
            created = self._prepare(conn, policy_version)
            ring = self.store.load_ring(conn, self._kek)
            conn.commit()
            baseline = False
            if policy_version is not None:
                baseline = self.store.record_baseline(conn, policy_version, ring.active_version,
                                                      self.actor)
            served = self.store.served_version(conn)
            conn.commit()
            return InitResult(ring.active_version, created, baseline, served)

    def _prepare(self, conn: Conn, policy_version: int | None) -> bool:
        """Read-only checks first (targets; the KEK against legacy rows while no key
        exists), then create/migrate own tables and ensure an active key.  A bad target or
        a KEK that opens no legacy row stops here, before the database is touched."""
        for target in self.cfg.targets:
            self.store.check_target(conn, target)
        if not self.store.has_keys(conn):
            self.store.check_legacy_kek(conn, self._kek)
        self.store.migrate(conn)
        return self.store.ensure_active_key(conn, self._kek, self.actor, policy_version)

    # -- rotate --------------------------------------------------------------------------
    def rotate(self, requested_version: int | None = None,
               options: RotationOptions | None = None, *,
               progress: ProgressFn | None = None, lock_wait: float = 0.0) -> RotationResult:
        """Rotate to a new DEK for ``requested_version`` (default: the next one).

        Idempotent per requested version; resumes an interrupted rotation; raises
        :class:`LockHeld` if another rotator runs.
        """
        options = options or RotationOptions()
        started = time.monotonic()
        with db_errors(), rotation_lock(self.dsn, self.cfg, lock_wait), \
                connect(self.dsn) as conn:
            self._prepare(conn, None)
            ring = self.store.load_ring(conn, self._kek)  # fail closed before any write
            records = self.store.rotation_records(conn)
            conn.commit()
            running = next((r for r in records if r.phase == "running"), None)
            served = max((r.requested_version for r in records
                          if r.phase in ("baseline", "done")), default=None)
            if requested_version is None:
                requested_version = running.requested_version if running else (served or 0) + 1
            if served is not None and requested_version <= served:
                return RotationResult(requested_version, False, False, options.mode,
                                      ring.active_version, ring.active_version)
            sizes = self._sizes(conn)
            conn.commit()
            # An interrupted rotation of this version is finished, in either mode, under
            # the key it minted: a second key for one version would break invariant 5.
            resume = (running is not None and running.requested_version == requested_version
                      and running.to_version == ring.active_version)
            counter = _Counter()
            try:
                if options.mode == "Atomic":
                    result = self._rotate_atomic(conn, requested_version, ring, options,
                                                 counter, progress, resume)
                else:
                    result = self._rotate_online(conn, requested_version, ring, options,
                                                 counter, progress, resume)
            except RowDecryptError as exc:
                conn.rollback()
                self._record_failure(conn, requested_version, exc)
                raise
        faults.point("before-vacuum")
        table_sizes = self._vacuum(sizes) if options.vacuum else {}
        return RotationResult(
            requested_version, True, resume, options.mode, result[0], result[1],
            re_encrypted=counter.done, legacy_migrated=counter.legacy, retired=result[2],
            seconds=time.monotonic() - started, table_sizes=table_sizes)

    def _rotate_online(self, conn: Conn, requested: int, ring: KeyRing,
                       options: RotationOptions, counter: _Counter,
                       progress: ProgressFn | None, resume: bool
                       ) -> tuple[int | None, int, tuple[int, ...]]:
        from_version: int | None
        if resume:
            from_version = next(r.from_version for r in self.store.rotation_records(conn)
                                if r.requested_version == requested)
            counter.done = 0
            counter.total = sum(self.store.count_not_under(conn, t, ring.active_version)
                                for t in self.cfg.targets)
            log.info("resuming rotation to policy version %s (DEK v%s)", requested,
                     ring.active_version)
        else:
            from_version = ring.active_version
            with conn.transaction():
                ring = self._mint(conn, requested, ring, "Online", counter)
            faults.point("after-start")
        to_version = ring.active_version
        if progress:
            progress(0, counter.total)
        settled = False
        while True:
            for target in self.cfg.targets:
                self._move_target(conn, target, ring, options, counter, progress,
                                  requested=requested)
            if not settled:
                self._settle(conn, to_version, options.grace)
                settled = True
                continue  # one more pass for what arrived while settling
            with conn.transaction():
                left = sum(self.store.count_not_under(conn, t, to_version)
                           for t in self.cfg.targets)
                if left:  # written under an old key while we moved: another pass
                    log.info("%d rows arrived under old keys during the pass; moving them",
                             left)
                    counter.total += left
                    continue
                faults.point("before-finish")
                retired = self._finish(conn, requested, to_version, counter)
            return from_version, to_version, retired

    def _settle(self, conn: Conn, to_version: int, grace: float) -> None:
        """Make sure no writer can still be encrypting under an old key before the last
        pass and the retirement (invariant 4 with applications writing concurrently).

        Two gaps close here: an application's key ring may not have noticed the new
        active key yet (the library re-checks every ``max_age`` seconds, so we wait until
        ``grace`` seconds have passed since the key was minted), and a transaction that
        encrypted under the old key may not have committed yet (we wait, bounded, for every
        transaction older than the new key to end).
        """
        row = conn.execute(sql.SQL(
            "SELECT extract(epoch FROM clock_timestamp() - created_at)::float8, created_at "
            "FROM {} WHERE version = %s").format(self.store.keys), (to_version,)).fetchone()
        if row is None:
            return
        age, minted = row
        if grace > age:
            time.sleep(grace - age)
        deadline = time.monotonic() + max(grace, 1.0) * 15
        while time.monotonic() < deadline:
            older = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND backend_type = 'client backend' "
                "AND xact_start < %s", (minted,)).fetchone()
            if not older or not older[0]:
                return
            time.sleep(0.1)
        log.warning("transactions older than DEK v%s are still open; finishing without "
                    "waiting for them (rows they write under an old key stay readable and "
                    "are counted as stale)", to_version)

    def _rotate_atomic(self, conn: Conn, requested: int, ring: KeyRing,
                       options: RotationOptions, counter: _Counter,
                       progress: ProgressFn | None, resume: bool = False
                       ) -> tuple[int | None, int, tuple[int, ...]]:
        from_version: int | None = ring.active_version
        with conn.transaction():
            for target in self.cfg.targets:  # readers go on; writers wait for the commit
                conn.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(
                    ident(target.schema, target.table)))
            if resume:  # an interrupted (online) rotation of this version: no new key
                from_version = next(r.from_version for r in self.store.rotation_records(conn)
                                    if r.requested_version == requested)
                log.info("finishing the interrupted rotation to policy version %s (DEK v%s) "
                         "atomically", requested, ring.active_version)
                counter.total = sum(self.store.count_not_under(conn, t, ring.active_version)
                                    for t in self.cfg.targets)
            else:
                ring = self._mint(conn, requested, ring, "Atomic", counter)
            if progress:
                progress(0, counter.total)
            for target in self.cfg.targets:
                self._move_target(conn, target, ring, options, counter, progress,
                                  requested=None)
            if counter.done:  # status and `status` show how many rows this rotation moved
                self.store.add_progress(conn, requested, counter.done)
            faults.point("before-finish")
            retired = self._finish(conn, requested, ring.active_version, counter)
        return from_version, ring.active_version, retired

    def _mint(self, conn: Conn, requested: int, ring: KeyRing, mode: str,
              counter: _Counter) -> KeyRing:
        """New DEK active, old ones retiring, rotation recorded: one transaction.
        Counts the rows to move into ``counter.total``."""
        versions = [k.version for k in self.store.list_keys(conn)]
        new_version = max(versions) + 1
        self.store.mark_active_retiring(conn)
        self.store.insert_key(conn, self._kek, version=new_version, actor=self.actor,
                              policy_version=requested)
        total = counter.total = sum(self.store.count_not_under(conn, t, new_version)
                                    for t in self.cfg.targets)
        self.store.start_rotation(conn, requested, mode, ring.active_version, new_version,
                                  self.actor, total)
        audit.append(conn, self.cfg, "rotation_started", key_version=new_version,
                     actor=self.actor, detail={"policy_version": requested, "mode": mode,
                                               "from_version": ring.active_version,
                                               "rows": total})
        return self.store.load_ring(conn, self._kek)

    def _finish(self, conn: Conn, requested: int, to_version: int,
                counter: _Counter) -> tuple[int, ...]:
        retired = tuple(self.store.retire_retiring(conn, self.actor))
        self.store.finish_rotation(conn, requested)
        audit.append(conn, self.cfg, "rotation_finished", key_version=to_version,
                     actor=self.actor, detail={"policy_version": requested,
                                               "re_encrypted": counter.done,
                                               "legacy_migrated": counter.legacy,
                                               "retired": list(retired)})
        return retired

    # -- moving rows ---------------------------------------------------------------------
    def _move_target(self, conn: Conn, target: Target, ring: KeyRing,
                     options: RotationOptions, counter: _Counter, progress: ProgressFn | None,
                     *, requested: int | None) -> None:
        """One pass over ``target``; ``requested`` set = online (commit each batch)."""
        pl = mover.plan(conn, target, options.batch_size)

        def on_batch(moved: int, legacy: int) -> None:
            counter.done += moved
            counter.legacy += legacy
            if progress and moved:
                progress(counter.done, max(counter.total, counter.done))

        # Starting a worker costs ~0.3 s: worth it only for tables of many batches.
        if requested is not None and options.workers > 1 and pl.blocks > 16 * pl.step:
            index = list(self.cfg.targets).index(target)
            mover.run_parallel(self.dsn, self.cfg, index, self._kek, pl, options.workers,
                               requested, on_batch)
            return
        batch = mover.BatchMover(target, ring)
        for lo, hi in pl.ranges():
            if requested is None:  # atomic: already inside the one transaction
                on_batch(*batch.run(conn, lo, hi))
            else:
                on_batch(*mover.move_batch(conn, self.store, batch, lo, hi, requested))
            faults.point("after-batch")

    # -- helpers -------------------------------------------------------------------------
    def _record_failure(self, conn: Conn, requested: int, exc: RotationOperatorError) -> None:
        try:
            with conn.transaction():
                audit.append(conn, self.cfg, "rotation_failed", actor=self.actor,
                             detail={"policy_version": requested, "reason": exc.reason,
                                     "message": str(exc)})
        except psycopg.Error:
            log.warning("could not record the failed rotation in the audit log")

    def _sizes(self, conn: Conn) -> dict[str, int]:
        return {t.name: self.store.table_size(conn, t) for t in self.cfg.targets}

    def _vacuum(self, before: dict[str, int]) -> dict[str, tuple[int, int]]:
        """VACUUM (ANALYZE) each target: every row was rewritten, so half the heap is dead."""
        with db_errors(), connect(self.dsn, autocommit=True) as conn:
            for target in self.cfg.targets:
                conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(
                    ident(target.schema, target.table)))
            after = self._sizes(conn)
        return {name: (before[name], after[name]) for name in before}

