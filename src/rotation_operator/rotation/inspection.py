"""Read-only views of a keys table: the status snapshot and the full ``verify``.

Separate from the engine because both are safe at any time (no lock, no writes) and the
operator refreshes the snapshot on a timer while applications write.  Both check the
targets first (a missing table or column is a ``TargetInvalid`` error, not a traceback) and
say so when the keys table does not exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from rotation_operator.crypto import codec
from rotation_operator.crypto.kek import Kek
from rotation_operator.crypto.keyring import legacy_cipher
from rotation_operator.errors import (
    AuditChainError,
    InvalidToken,
    NotInitialised,
    Superseded,
    UnknownKeyError,
)
from rotation_operator.policy.config import StoreConfig
from rotation_operator.policy.decisions import (
    Running,
    State,
    encryptions,
    gather,
    running_record,
    served_version,
)
from rotation_operator.store import audit
from rotation_operator.store.catalog import Layout, inspect
from rotation_operator.store.database import (
    Conn,
    connect,
    db_errors,
    read_only_snapshot,
    transaction_time,
)
from rotation_operator.store.keys import KeyRecord
from rotation_operator.store.keystore import KeyStore
from rotation_operator.store.legacy import LegacyState
from rotation_operator.store.locks import rotation_lock_held
from rotation_operator.store.rotations import RotationRecord
from rotation_operator.store.targets import legacy_ids, scan

#: Late legacy rows named in the status (and the Degraded condition), per snapshot.
LATE_LEGACY_SHOWN = 5


@dataclass(frozen=True)
class KeyStatus:
    version: int
    state: str
    created_at: datetime
    retired_at: datetime | None
    rotated_by: str
    rows: int
    #: The stored fingerprint of the KEK that wraps it (not part of :meth:`Snapshot.summary`:
    #: the operator names only fingerprints of KEKs it was given).
    kek_fingerprint: str = ""
    zero_rows_since: datetime | None = None
    disabled_at: datetime | None = None
    destroy_after: datetime | None = None
    destroyed_at: datetime | None = None
    encryptions: int = 0


@dataclass(frozen=True)
class TargetCounts:
    table: str
    kind: str
    rows: int
    legacy: int
    stale: int
    #: Rows under a retired key (or a retiring one with no rotation running), and legacy
    #: rows once a rotation has moved them while legacy reads stay open: what the refresh
    #: sweeps.
    retired: int
    #: Some ids of legacy rows written after every legacy row was migrated (late ones).
    late_legacy_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class Snapshot:
    active_version: int | None
    served_version: int | None
    keys: list[KeyStatus]
    targets: list[TargetCounts]
    last_rotation: RotationRecord | None
    running: RotationRecord | None
    last_sweep: RotationRecord | None = None
    audit_events: int = 0
    #: Whether every count is exact (else some come from the planner's statistics).
    exact: bool = True
    counted_at: datetime | None = None
    #: The legacy record (every legacy row migrated? legacy reads open?).
    legacy: LegacyState = field(default_factory=LegacyState)

    @property
    def late_legacy_count(self) -> int:
        """Legacy rows after every legacy row was migrated: refused while reads are closed,
        reported by name (:attr:`late_legacy`), never moved by the refresh's sweep."""
        return self.legacy_count if self.legacy.migrated else 0

    @property
    def late_legacy(self) -> list[tuple[str, str]]:
        """(target, id) of some late legacy rows."""
        return [(t.table, i) for t in self.targets for i in t.late_legacy_ids]

    @property
    def secret_count(self) -> int:
        return sum(t.rows for t in self.targets)

    @property
    def legacy_count(self) -> int:
        return sum(t.legacy for t in self.targets)

    @property
    def stale_count(self) -> int:
        return sum(t.stale for t in self.targets)

    def rows_per_key(self) -> dict[int | None, int]:
        """Rows per key version (``None``: legacy), from this snapshot's counts."""
        rows: dict[int | None, int] = {k.version: k.rows for k in self.keys}
        rows[None] = self.legacy_count
        return rows

    @property
    def active_key(self) -> KeyStatus | None:
        return next((k for k in self.keys if k.state == "active"), None)

    @property
    def retired_count(self) -> int:
        """Rows under a retired key: what invariant 4 forbids once a rotation is done."""
        return sum(t.retired for t in self.targets)

    def state(self) -> State:
        """The decision layer's view of this snapshot (no rekey check: a snapshot reads
        no KEK)."""
        return gather(self.keys, self.served_version, Running.of(self.running),
                      retired_rows=self.retired_count, rows=self.secret_count,
                      key_rows={k.version: k.rows for k in self.keys})

    def summary(self) -> dict[str, Any]:
        """The camelCase fields shared by the CR's status and ``status -o json``."""
        return {
            "observedVersion": self.served_version,
            "activeKeyVersion": self.active_version,
            "secretCount": self.secret_count,
            "legacyCount": self.legacy_count,
            "staleCount": self.stale_count,
            "retiredKeyRows": self.retired_count,
            "auditEvents": self.audit_events,
            "counts": {"kind": "Exact" if self.exact else "Estimated",
                       "countedAt": rfc3339(self.counted_at),
                       "lastExactAt": rfc3339(self.counted_at) if self.exact else None},
            "keys": [{"version": k.version, "state": k.state, "createdAt": rfc3339(k.created_at),
                      "retiredAt": rfc3339(k.retired_at), "rotatedBy": k.rotated_by,
                      "rows": k.rows, "encryptions": encryptions(k.encryptions, k.rows),
                      "zeroRowsSince": rfc3339(k.zero_rows_since),
                      "disabledAt": rfc3339(k.disabled_at),
                      "destroyAfter": rfc3339(k.destroy_after),
                      "destroyedAt": rfc3339(k.destroyed_at)} for k in self.keys],
            "sweep": None if self.last_sweep is None else {
                "rows": self.last_sweep.re_encrypted,
                "finishedAt": rfc3339(self.last_sweep.finished_at)},
            "legacy": {"reads": "Closed" if self.legacy.reads == "closed" else "Open",
                       "migratedAt": rfc3339(self.legacy.migrated_at),
                       "lateRows": self.late_legacy_count,
                       "lateRowIds": [{"table": t, "id": i} for t, i in self.late_legacy]},
        }


def rfc3339(value: datetime | None) -> str | None:
    """UTC, second precision, ``Z``: the form Kubernetes uses for timestamps."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if value is not None else None


def _layouts(conn: Conn, cfg: StoreConfig, store: KeyStore) -> list[Layout]:
    """Targets checked for reading, and the keys table found (else :class:`NotInitialised`)."""
    layouts = [inspect(conn, t, writes=False) for t in cfg.targets]
    if not store.exists(conn):
        raise NotInitialised(f"keys table {cfg.qualified_keys} does not exist in this "
                             "database: nothing was initialised here yet (run `init`, or "
                             "create the EncryptionPolicy)")
    return layouts


def _stale_keys(keys: list[KeyRecord], records: list[RotationRecord], legacy: LegacyState
                ) -> set[int | None]:
    """Key ids no row may stay under: retired keys, retiring ones when no rotation is moving
    rows off them, and the KEK itself (legacy, ``None``) once a rotation has moved the legacy
    rows while legacy reads stay open (one written after that is an application still
    writing without a DEK, swept like a row under a retired key; with reads closed it is a
    late legacy row instead, refused and never swept)."""
    running = next((r for r in records if r.phase == "running"), None)
    stale: set[int | None] = {
        k.version for k in keys
        if k.state == "retired" or (k.state == "retiring" and running is None)}
    if legacy.open_after_migration:
        stale.add(None)
    return stale


def migrated(records: list[RotationRecord]) -> bool:
    """Whether a rotation has finished on this keys table (legacy rows were moved then):
    what the legacy record is filled from on tables of older releases."""
    return any(r.phase == "done" and r.kind in ("policy", "manual", "scheduled")
               for r in records)


#: Heaps up to this many rows are counted exactly even when estimates are asked for: a
#: count that small costs less than a round trip's worth of planning.
EXACT_BELOW = 100_000


def snapshot(dsn: str, cfg: StoreConfig, *, exact: bool = True,
             exact_below: int = EXACT_BELOW) -> Snapshot:
    """Keys with row counts, totals, the last and any running rotation (no KEK needed).

    ``exact=False``: counts from the statistics for heaps over ``exact_below`` rows (see
    :func:`rotation_operator.store.targets.key_estimates`): no scan of a large table, no
    long snapshot holding back VACUUM.  What a periodic status needs; ``verify`` and
    ``status --exact`` count.
    """
    store = KeyStore(cfg)
    with db_errors(), connect(dsn) as conn:
        layouts = _layouts(conn, cfg, store)
        with conn.transaction():
            read_only_snapshot(conn)
            keys = store.list_keys(conn)
            records = store.rotation_records(conn)
            running = running_record(records)
            active = next((k.version for k in keys if k.state == "active"), None)
            legacy = store.legacy_state(conn)
            stale_keys = _stale_keys(keys, records, legacy)
            per_key: dict[int | None, int] = {}
            targets = []
            all_exact = True
            counted_at = transaction_time(conn)
            for layout in layouts:
                if exact:
                    counts = store.key_counts(conn, layout)
                else:
                    counts, was_exact = store.key_estimates(conn, layout, active, exact_below)
                    all_exact = all_exact and was_exact
                for kid, n in counts.items():
                    per_key[kid] = per_key.get(kid, 0) + n
                rows = sum(counts.values())
                late = legacy_ids(conn, layout, LATE_LEGACY_SHOWN) \
                    if legacy.migrated and counts.get(None) else []
                targets.append(TargetCounts(
                    layout.target.name, layout.kind, rows, counts.get(None, 0),
                    rows - counts.get(active, 0) if active else rows,
                    sum(n for kid, n in counts.items() if kid in stale_keys),
                    tuple(str(i) for i in late)))
            events = audit.count(conn, cfg)
    finished = [r for r in records if r.phase == "done" and r.kind != "sweep"]
    sweeps = [r for r in records if r.phase == "done" and r.kind == "sweep"]
    return Snapshot(
        active_version=active,
        served_version=served_version(records),
        keys=[KeyStatus(k.version, k.state, k.created_at, k.retired_at, k.rotated_by,
                        per_key.get(k.version, 0), k.kek_fingerprint, k.zero_rows_since,
                        k.disabled_at, k.destroy_after, k.destroyed_at, k.encryptions)
              for k in keys],
        targets=targets,
        last_rotation=finished[-1] if finished else None,
        running=running,
        last_sweep=sweeps[-1] if sweeps else None,
        audit_events=events,
        exact=all_exact,
        counted_at=counted_at,
        legacy=legacy,
    )


@dataclass
class VerifyReport:
    rows: int = 0
    legacy: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    per_key: dict[str, int] = field(default_factory=dict)
    #: Rows under a retired key (or a retiring one while no rotation runs), by key.
    retired: dict[str, int] = field(default_factory=dict)
    #: Rows the unfinished rotation has yet to move off a non-active key (its retiring
    #: keys; legacy rows too while no rotation has finished), by key.
    pending: dict[str, int] = field(default_factory=dict)
    #: The unfinished rotation record, when rows are pending: kind, toVersion,
    #: reEncrypted, total, and ``inProgress`` (a rotator holds its lock) or not (it
    #: stopped: stuck, paused, interrupted).
    rotation: dict[str, Any] | None = None
    #: Rows under a disabled or destroyed key, which no ring reads: key -> state, rows.
    unusable: dict[str, dict[str, Any]] = field(default_factory=dict)
    audit_events: int = 0
    audit_head: str = ""
    audit_error: str | None = None
    #: Legacy rows written after every legacy row was migrated, by name: ``table``, ``id``
    #: and ``readableWith``, the fingerprint of a presented KEK that opens it (None: none).
    late_legacy: list[dict[str, Any]] = field(default_factory=list)
    late_legacy_count: int = 0
    #: Legacy rows the ring does not read but a presented KEK opens (a previous KEK after a
    #: switch to PKCS#11, or legacy reads closed), by that KEK's fingerprint: not failures.
    legacy_readable: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (not self.failures and self.audit_error is None and not self.retired
                and not self.pending and not self.unusable and not self.late_legacy_count)

    @property
    def in_progress(self) -> bool:
        """Whether the only thing wrong is rows a running rotation is still moving (verify
        again once it finishes)."""
        return bool(self.pending and self.rotation and self.rotation["inProgress"]
                    and not self.failures and self.audit_error is None and not self.retired
                    and not self.unusable and not self.late_legacy_count)


def verify(dsn: str, cfg: StoreConfig, keks: Sequence[Kek], *,
           max_failures: int = 100) -> VerifyReport:
    """Decrypt every row of every target, find rows under retired keys, under keys an
    unfinished rotation has yet to move them off and under disabled or destroyed keys,
    and check the audit chain; writes nothing.

    A keys table whose wrapped DEK does not unwrap under the KEK its fingerprint names
    raises :class:`~rotation_operator.errors.KeysetTampered` (fail closed: no row is
    read under an altered keyset)."""
    store = KeyStore(cfg)
    report = VerifyReport()
    with db_errors(), connect(dsn) as conn:
        layouts = _layouts(conn, cfg, store)
        with conn.transaction():
            read_only_snapshot(conn)
            ring = store.load_ring(conn, keks)
            records = store.rotation_records(conn)
            keys = store.list_keys(conn)
            legacy = store.legacy_state(conn)
            stale_keys = _stale_keys(keys, records, legacy)
            running = running_record(records)
            pending_keys = _pending_keys(keys, records) if running is not None else set()
            unusable = {k.version: k.state for k in keys
                        if k.state in ("disabled", "destroyed")}
            openers = [(k.fingerprint, c) for k in keks if (c := legacy_cipher(k)) is not None]
            check = _Check(ring.decrypt, stale_keys, pending_keys, unusable, max_failures,
                           late=legacy.migrated, openers=openers)
            for layout in layouts:
                check.target(conn, layout, report)
            try:
                chain = audit.verify(conn, cfg)
                report.audit_events, report.audit_head = chain.events, chain.head
            except AuditChainError as exc:
                report.audit_error = str(exc)
        if running is not None and report.pending:
            report.rotation = _unfinished(conn, cfg, store, running)
    return report


def _pending_keys(keys: list[KeyRecord], records: list[RotationRecord]) -> set[int | None]:
    """Key ids an unfinished rotation moves rows off: its retiring keys, and the KEK
    itself (legacy rows) until a rotation has finished."""
    pending: set[int | None] = {k.version for k in keys if k.state == "retiring"}
    if not migrated(records):
        pending.add(None)
    return pending


def _unfinished(conn: Conn, cfg: StoreConfig, store: KeyStore, running: RotationRecord
                ) -> dict[str, Any]:
    """The unfinished rotation as verify saw it, and whether it is moving now: a rotator
    holds the lock, or the record is no longer running (it finished since the snapshot).
    Looked at after the snapshot, the lock before the record, so a rotation that ran all
    along is never called stopped."""
    # The lock first: a rotator finishes its record before it lets the lock go.
    held = rotation_lock_held(conn, cfg)
    try:
        phase = store.record(conn, running.id).phase
    except Superseded:  # the record is gone: whatever it was, it is not stopped there
        phase = "gone"
    moving = held or phase != "running"
    return {"kind": running.kind, "toVersion": running.to_version,
            "reEncrypted": running.re_encrypted, "total": running.total,
            "inProgress": moving}


@dataclass
class _Check:
    """What verify checks of each row."""

    decrypt: Any
    stale_keys: set[int | None]
    pending_keys: set[int | None]
    unusable: dict[int, str]
    max_failures: int
    #: Every legacy row was migrated: one found is a late one (named; verify fails).
    late: bool = False
    #: The presented KEKs with bytes, tried on a legacy row the ring does not read.
    openers: Sequence[tuple[str, Any]] = ()

    def target(self, conn: Conn, layout: Layout, report: VerifyReport) -> None:
        t = layout.target
        for row_id, key_id, value in scan(conn, layout):
            report.rows += 1
            report.legacy += key_id is None
            name = "legacy" if key_id is None else f"v{key_id}"
            report.per_key[name] = report.per_key.get(name, 0) + 1
            if key_id in self.stale_keys:
                report.retired[name] = report.retired.get(name, 0) + 1
            elif key_id in self.pending_keys:
                report.pending[name] = report.pending.get(name, 0) + 1
            if key_id is not None and key_id in self.unusable:
                entry = report.unusable.setdefault(
                    name, {"state": self.unusable[key_id], "rows": 0})
                entry["rows"] += 1
                continue
            late = key_id is None and self.late
            opened = _opener(bytes(value), self.openers) if late else None
            if late:
                report.late_legacy_count += 1
                if len(report.late_legacy) < self.max_failures:
                    report.late_legacy.append({"table": t.name, "id": str(row_id),
                                               "readableWith": opened})
            try:
                self.decrypt(value, key_id)
            except (InvalidToken, UnknownKeyError):
                if key_id is None and not self.late:
                    opened = _opener(bytes(value), self.openers)
                if opened is not None:  # legacy, readable with a presented KEK: no failure
                    report.legacy_readable[opened] = report.legacy_readable.get(opened, 0) + 1
                    continue
                if len(report.failures) < self.max_failures:
                    report.failures.append({"table": t.name, "id": str(row_id),
                                            "key_id": key_id})
                else:
                    report.failures[-1]["more"] = True


def _opener(value: bytes, openers: Sequence[tuple[str, Any]]) -> str | None:
    """The fingerprint of the first presented KEK whose own bytes open a legacy value."""
    for fingerprint, cipher in openers:
        try:
            codec.decrypt(cipher, value)
            return fingerprint
        except InvalidToken:
            continue
    return None
