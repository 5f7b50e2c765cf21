"""The end of a key's life: census, disable, enable, destroy.

Why a module of its own: these steps touch only the keys table (no KEK, no row of a
target), and they are the one kind of change nobody can undo (a destroyed DEK is gone, and
with it every value still under it, in the database or in any backup).  So each step is
explicit, previewable (:func:`~rotation_operator.decisions.retention_plan` is the dry run),
audited, taken under the rotation lock, and refused while any row of any target names the
key, checked in the same transaction that takes the step, with the key row locked.

* **disable**: the key stays, wrapped, but no ring unwraps it; reversible (**enable**).
* **destroy**: the wrapped DEK is erased; the row and its version stay, so a value that
  still names the key says which key it needed.  Only a disabled key, only after its
  waiting period.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from . import faults
from .config import StoreConfig
from .database import Conn, check_server, connect, db_errors
from .decisions import KeyView, Retention, Step, retention_plan
from .errors import KeyInUse, KeyStateError
from .keystore import KeyRecord, KeyStore
from .locks import RotationLock
from .tables import Layout, inspect

#: The shortest waiting periods: early destruction is the one failure nobody can recover.
MIN_DAYS = 7


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
    """Key lifecycle operations on one keys table (no KEK needed)."""

    def __init__(self, dsn: str, cfg: StoreConfig, *, actor: str) -> None:
        self.dsn = dsn
        self.cfg = cfg
        self.store = KeyStore(cfg)
        self.actor = actor

    def run(self, retention: Retention | None, now: datetime,
            rows: Mapping[int | None, int] | None = None, *, apply: bool = True,
            lock_wait: float = 0.0) -> Outcome:
        """Census from ``rows`` (counted here when None), then every retention step that
        is due, when ``apply``; returns the plan either way."""
        with db_errors(), connect(self.dsn) as conn:
            check_server(conn)
            layouts = [inspect(conn, t, writes=False) for t in self.cfg.targets]
            if rows is None:
                rows = self._count(conn, layouts)
            with conn.transaction():
                changed = self.store.census(conn, rows, now, self.store.writes(conn, layouts))
            plan = tuple(retention_plan(views(self.store.list_keys(conn), rows), retention,
                                        now))
            due = [s for s in plan if s.ready]
            if not apply or not due:
                return Outcome(plan, (), changed=changed)
        done, refused = [], []
        with db_errors(), RotationLock(self.dsn, self.cfg, wait=lock_wait), \
                connect(self.dsn) as conn:
            for step in due:
                try:
                    with conn.transaction():
                        if step.action == "disable":
                            assert retention is not None
                            self._disable(conn, layouts, step.version, now,
                                          now + retention.destroy_after)
                        else:
                            self._destroy(conn, layouts, step.version, now)
                    done.append(step)
                except KeyInUse as exc:
                    refused.append(str(exc))
        return Outcome(plan, tuple(done), tuple(refused), changed)

    def disable(self, version: int, now: datetime, *, destroy_after: timedelta | None = None
                ) -> None:
        """Break-glass: disable a retired key now (a destroy may follow after the waiting
        period)."""
        self._one(lambda conn, layouts: self._disable(
            conn, layouts, version, now, now + destroy_after if destroy_after else None))

    def enable(self, version: int) -> None:
        def step(conn: Conn, layouts: list[Layout]) -> None:
            key = self.store.key_for_update(conn, version)
            if key.state != "disabled":
                raise KeyStateError(f"DEK v{version} is {key.state}; only a disabled key can "
                                    "be enabled")
            self.store.enable(conn, version, self.actor)
        self._one(step)

    def destroy(self, version: int, now: datetime) -> None:
        self._one(lambda conn, layouts: self._destroy(conn, layouts, version, now))

    # -- the steps, each in the caller's transaction -------------------------------------
    def _disable(self, conn: Conn, layouts: Sequence[Layout], version: int, now: datetime,
                 destroy_after: datetime | None) -> None:
        key = self.store.key_for_update(conn, version)
        if key.state != "retired":
            raise KeyStateError(f"DEK v{version} is {key.state}; only a retired key can be "
                                "disabled")
        self._unused(conn, layouts, version, "disable")
        self.store.disable(conn, version, now, destroy_after, self.actor)

    def _destroy(self, conn: Conn, layouts: Sequence[Layout], version: int,
                 now: datetime) -> None:
        key = self.store.key_for_update(conn, version)
        if key.state != "disabled" or key.disabled_at is None:
            raise KeyStateError(f"DEK v{version} is {key.state}; a key is destroyed only "
                                "once it is disabled (keys disable), after a waiting period")
        earliest = key.destroy_after or key.disabled_at + timedelta(days=MIN_DAYS)
        if now < earliest:
            raise KeyStateError(f"DEK v{version} may be destroyed from {earliest.isoformat()} "
                                "on (the waiting period after it was disabled)")
        self._unused(conn, layouts, version, "destroy")
        faults.point("before-destroy")
        self.store.destroy(conn, version, now, self.actor)

    def _unused(self, conn: Conn, layouts: Sequence[Layout], version: int, what: str) -> None:
        where = self.store.referenced(conn, layouts, version)
        if where is not None:
            table, row_id = where
            raise KeyInUse(f"refusing to {what} DEK v{version}: row {row_id!r} of {table} "
                           "still references it (rotate or sweep first)")

    def _one(self, step: object) -> None:
        with db_errors(), RotationLock(self.dsn, self.cfg), connect(self.dsn) as conn:
            layouts = [inspect(conn, t, writes=False) for t in self.cfg.targets]
            with conn.transaction():
                step(conn, layouts)  # type: ignore[operator]

    def _count(self, conn: Conn, layouts: Sequence[Layout]) -> dict[int | None, int]:
        rows: dict[int | None, int] = {}
        for layout in layouts:
            for kid, n in self.store.key_counts(conn, layout).items():
                rows[kid] = rows.get(kid, 0) + n
        return rows
