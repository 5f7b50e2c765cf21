"""The end of a key's life: census, disable, enable, destroy.

Why a module of its own: these steps touch only the keys table (no KEK, no row of a
target), and they are the one kind of change nobody can undo (a destroyed DEK is gone, and
with it every value still under it, in the database or in any backup).  So each step is
explicit, previewable (:func:`~rotation_operator.policy.decisions.retention_plan` is the dry run),
audited, taken under the rotation lock, and refused while any row of any target names the
key: checked in the transaction that takes the step, with the key row locked, before and
after every transaction in flight at the first look has ended.

* **disable**: the key stays, wrapped, but no ring unwraps it; reversible (**enable**).
* **destroy**: the wrapped DEK is erased; the row and its version stay, so a value that
  still names the key says which key it needed.  Only a disabled key, only after its
  waiting period.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import psycopg

from rotation_operator import faults
from rotation_operator.errors import KeyInUse, KeyStateError
from rotation_operator.policy.config import MIN_RETENTION_DAYS, StoreConfig
from rotation_operator.policy.decisions import (
    KeyView,
    Retention,
    Step,
    destroy_from,
    retention_plan,
    zero_rows_clock,
)
from rotation_operator.store.catalog import Layout, inspect
from rotation_operator.store.database import Conn, check_server, connect, db_errors
from rotation_operator.store.keys import KeyRecord, vacuum_full
from rotation_operator.store.keystore import KeyStore
from rotation_operator.store.locks import RotationLock, in_flight, wait_for

log = logging.getLogger(__name__)
#: The shortest waiting periods: early destruction is the one failure nobody can recover.
MIN_DAYS = MIN_RETENTION_DAYS
#: Seconds a step waits for transactions in flight at its check before it is refused.
BARRIER_SECONDS = 60.0


@dataclass(frozen=True)
class Outcome:
    """What a lifecycle pass found (the plan, the dry run) and did."""

    plan: tuple[Step, ...]
    done: tuple[Step, ...]
    refused: tuple[str, ...] = ()
    #: The census changed a key's record (zero rows since, usage).
    changed: bool = False


def views(keys: Sequence[KeyRecord], rows: Mapping[int | None, int]) -> list[KeyView]:
    return [KeyView(k.version, k.state, rows.get(k.version, 0), k.zero_rows_since,
                    k.disabled_at, k.destroy_after) for k in keys]


class Lifecycle:
    """Key lifecycle operations on one keys table (no KEK needed).

    ``owner``: the policy's ``namespace/name`` (the operator); ``None`` (the CLI) must
    name exactly the targets the keys table covers, so no step misses a target's rows.
    """

    def __init__(self, dsn: str, cfg: StoreConfig, *, actor: str, owner: str | None = None
                 ) -> None:
        self.dsn = dsn
        self.cfg = cfg
        self.store = KeyStore(cfg)
        self.actor = actor
        self.owner = owner

    def run(self, retention: Retention | None, now: datetime,
            rows: Mapping[int | None, int] | None = None, *, apply: bool = True,
            lock_wait: float = 0.0, exact: bool = True, record: bool = True) -> Outcome:
        """Census from ``rows`` (counted here when None), then every retention step that
        is due, when ``apply``; returns the plan either way.  ``record=False`` (a dry run
        at another time) writes nothing: the census is applied to the plan only."""
        with db_errors(), connect(self.dsn) as conn:
            check_server(conn)
            layouts = self._layouts(conn)
            if rows is None:
                rows = self._count(conn, layouts)
            changed = False
            if record:
                with conn.transaction():
                    changed = self.store.census(conn, rows, now,
                                                self.store.writes(conn, layouts), exact=exact)
            keys = self.store.list_keys(conn)
            if not record:
                keys = [_censused(k, rows, now, exact) for k in keys]
            plan = tuple(retention_plan(views(keys, rows), retention, now))
            due = [s for s in plan if s.ready]
            if not apply or not record or not due:
                return Outcome(plan, (), changed=changed)
        done, refused = [], []
        with db_errors(), RotationLock(self.dsn, self.cfg, wait=lock_wait) as lock, \
                connect(self.dsn) as conn:
            for step in due:
                try:
                    with conn.transaction():
                        if step.action == "disable":
                            assert retention is not None
                            self._disable(conn, layouts, step.version, now,
                                          now + retention.destroy_after, lock.backend_pid)
                        else:
                            self._destroy(conn, layouts, step.version, now, lock.backend_pid)
                    done.append(step)
                except (KeyInUse, KeyStateError) as exc:
                    refused.append(str(exc))
            if any(s.action == "destroy" for s in done):
                self._vacuum(conn)
        return Outcome(plan, tuple(done), tuple(refused), changed)

    def disable(self, version: int, now: datetime, *, destroy_after: timedelta | None = None
                ) -> None:
        """Break-glass: disable a retired key now.  Nothing destroys it later but an
        explicit ``destroy`` (after ``destroy_after``, at least the waiting period) or a
        policy's ``spec.retention``."""
        self._one(lambda conn, layouts, pid: self._disable(
            conn, layouts, version, now, now + destroy_after if destroy_after else None, pid))

    def enable(self, version: int) -> None:
        """Undo a disable; the key's zero-rows clock starts again (a retention policy
        disables it once more only after its full period)."""
        def step(conn: Conn, layouts: list[Layout], pid: int) -> None:
            key = self.store.key_for_update(conn, version)
            if key.state != "disabled":
                raise KeyStateError(f"DEK v{version} is {key.state}; only a disabled key can "
                                    "be enabled")
            self.store.enable(conn, version, self.actor)
        self._one(step)

    def destroy(self, version: int, now: datetime) -> None:
        self._one(lambda conn, layouts, pid: self._destroy(conn, layouts, version, now, pid))
        with db_errors(), connect(self.dsn) as conn:
            self._vacuum(conn)

    # -- the steps, each in the caller's transaction -------------------------------------
    def _disable(self, conn: Conn, layouts: Sequence[Layout], version: int, now: datetime,
                 destroy_after: datetime | None, lock_pid: int) -> None:
        key = self.store.key_for_update(conn, version)
        if key.state != "retired":
            raise KeyStateError(f"DEK v{version} is {key.state}; only a retired key can be "
                                "disabled")
        self._unused(conn, layouts, version, "disable", lock_pid)
        self.store.disable(conn, version, now, destroy_after, self.actor)

    def _destroy(self, conn: Conn, layouts: Sequence[Layout], version: int,
                 now: datetime, lock_pid: int) -> None:
        key = self.store.key_for_update(conn, version)
        if key.state != "disabled" or key.disabled_at is None:
            raise KeyStateError(f"DEK v{version} is {key.state}; a key is destroyed only "
                                "once it is disabled (keys disable), after a waiting period")
        earliest = destroy_from(key.disabled_at, key.destroy_after, timedelta(days=MIN_DAYS))
        if now < earliest:
            raise KeyStateError(f"DEK v{version} may be destroyed from {earliest.isoformat()} "
                                "on (the waiting period after it was disabled)")
        self._unused(conn, layouts, version, "destroy", lock_pid)
        faults.point("before-destroy")
        self.store.destroy(conn, version, now, self.actor)

    def _unused(self, conn: Conn, layouts: Sequence[Layout], version: int, what: str,
                lock_pid: int) -> None:
        """No row of any target names the key, including rows written by transactions in
        flight now: look, wait for every transaction open at that moment to end (their
        writes become visible), and look again.  A writer that starts later cannot copy a
        ciphertext under the key from the table: none is there."""
        self._refuse_if_referenced(conn, layouts, version, what)
        left = wait_for(conn, in_flight(conn, lock_pid), BARRIER_SECONDS)
        if left:
            raise KeyInUse(f"refusing to {what} DEK v{version} now: {left} transactions open "
                           f"since the check are still running after {BARRIER_SECONDS:g}s "
                           "(one may be writing a row under it); retried later")
        self._refuse_if_referenced(conn, layouts, version, what)

    def _refuse_if_referenced(self, conn: Conn, layouts: Sequence[Layout], version: int,
                              what: str) -> None:
        where = self.store.referenced(conn, layouts, version)
        if where is not None:
            table, row_id = where
            raise KeyInUse(f"refusing to {what} DEK v{version}: row {row_id!r} of {table} "
                           "still references it (rotate or sweep first)")

    def _layouts(self, conn: Conn) -> list[Layout]:
        layouts = [inspect(conn, t, writes=False) for t in self.cfg.targets]
        if self.store.exists(conn):
            self.store.check_coverage(conn, layouts, self.owner)
        return layouts

    def _one(self, step: object) -> None:
        with db_errors(), RotationLock(self.dsn, self.cfg) as lock, connect(self.dsn) as conn:
            layouts = self._layouts(conn)
            with conn.transaction():
                step(conn, layouts, lock.backend_pid)  # type: ignore[operator]

    def _vacuum(self, conn: Conn) -> None:
        """Rewrite the keys table so no page of it still holds an erased DEK's bytes (a
        plain VACUUM frees the old row version's space but leaves its bytes in the page).
        The table is a few rows: the exclusive lock lasts milliseconds, and waits at most
        ``lock_timeout`` behind a reader.  WAL, archives, replicas and backups keep their
        copies: see the README."""
        try:
            vacuum_full(conn, self.store.tables)
        except psycopg.Error as exc:
            log.warning("VACUUM FULL of the keys table after a destroy failed (%s): the "
                        "erased DEK's old row version stays in its pages until they are "
                        "reused", type(exc).__name__)

    def _count(self, conn: Conn, layouts: Sequence[Layout]) -> dict[int | None, int]:
        rows: dict[int | None, int] = {}
        for layout in layouts:
            for kid, n in self.store.key_counts(conn, layout).items():
                rows[kid] = rows.get(kid, 0) + n
        return rows


def _censused(key: KeyRecord, rows: Mapping[int | None, int], now: datetime, exact: bool
              ) -> KeyRecord:
    """The key as :meth:`KeyStore.census` would leave its zero-rows clock (dry runs)."""
    since = zero_rows_clock(key.state, key.zero_rows_since, rows.get(key.version, 0), now, exact)
    return dataclasses.replace(key, zero_rows_since=since)
