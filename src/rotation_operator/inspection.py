"""Read-only views of a keys table: the status snapshot and the full ``verify``.

Separate from the engine because both are safe at any time (no lock, no writes) and the
operator refreshes the snapshot on a timer while applications write.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from psycopg import sql

from . import audit
from .config import StoreConfig
from .errors import InvalidToken, UnknownKeyError
from .keystore import KeyStore, RotationRecord, connect, db_errors, ident


@dataclass(frozen=True)
class KeyStatus:
    version: int
    state: str
    created_at: datetime
    retired_at: datetime | None
    rotated_by: str
    rows: int


@dataclass(frozen=True)
class TargetCounts:
    table: str
    rows: int
    legacy: int
    stale: int


@dataclass(frozen=True)
class Snapshot:
    active_version: int | None
    served_version: int | None
    keys: list[KeyStatus]
    targets: list[TargetCounts]
    last_rotation: RotationRecord | None
    running: RotationRecord | None
    audit_events: int = 0

    @property
    def secret_count(self) -> int:
        return sum(t.rows for t in self.targets)

    @property
    def legacy_count(self) -> int:
        return sum(t.legacy for t in self.targets)

    @property
    def stale_count(self) -> int:
        return sum(t.stale for t in self.targets)

    def summary(self) -> dict[str, Any]:
        """The camelCase fields shared by the CR's status and ``status -o json``."""
        return {
            "observedVersion": self.served_version,
            "activeKeyVersion": self.active_version,
            "secretCount": self.secret_count,
            "legacyCount": self.legacy_count,
            "staleCount": self.stale_count,
            "auditEvents": self.audit_events,
            "keys": [{"version": k.version, "state": k.state, "createdAt": rfc3339(k.created_at),
                      "retiredAt": rfc3339(k.retired_at), "rotatedBy": k.rotated_by,
                      "rows": k.rows} for k in self.keys],
        }


def rfc3339(value: datetime | None) -> str | None:
    """UTC, second precision, ``Z``: the form Kubernetes uses for timestamps."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if value is not None else None


def snapshot(dsn: str, cfg: StoreConfig) -> Snapshot:
    """Keys with row counts, totals, the last and any running rotation (no KEK needed)."""
    store = KeyStore(cfg)
    with db_errors(), connect(dsn) as conn, conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        keys = store.list_keys(conn)
        active = next((k.version for k in keys if k.state == "active"), None)
        per_key: dict[int | None, int] = {}
        targets = []
        for target in cfg.targets:
            counts = store.key_counts(conn, target)
            for kid, n in counts.items():
                per_key[kid] = per_key.get(kid, 0) + n
            rows = sum(counts.values())
            targets.append(TargetCounts(target.name, rows, counts.get(None, 0),
                                        rows - counts.get(active, 0) if active else rows))
        records = store.rotation_records(conn)
        events = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
            audit.table(cfg))).fetchone()
    finished = [r for r in records if r.phase == "done"]
    return Snapshot(
        active_version=active,
        served_version=max((r.requested_version for r in records
                            if r.phase in ("baseline", "done")), default=None),
        keys=[KeyStatus(k.version, k.state, k.created_at, k.retired_at, k.rotated_by,
                        per_key.get(k.version, 0)) for k in keys],
        targets=targets,
        last_rotation=finished[-1] if finished else None,
        running=next((r for r in records if r.phase == "running"), None),
        audit_events=int(events[0]) if events else 0,
    )


@dataclass
class VerifyReport:
    rows: int = 0
    legacy: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    per_key: dict[str, int] = field(default_factory=dict)
    audit_events: int = 0
    audit_head: str = ""
    audit_error: str | None = None

    @property
    def ok(self) -> bool:
        return not self.failures and self.audit_error is None


def verify(dsn: str, cfg: StoreConfig, kek: bytes, *, max_failures: int = 100) -> VerifyReport:
    """Decrypt every row of every target and check the audit chain; writes nothing."""
    from .errors import AuditChainError

    store = KeyStore(cfg)
    report = VerifyReport()
    with db_errors(), connect(dsn) as conn, conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        ring = store.load_ring(conn, kek)
        for target in cfg.targets:
            q = sql.SQL("SELECT {id}, {kid}, {val} FROM {t}").format(
                id=sql.Identifier(target.id_column), kid=sql.Identifier(target.key_id_column),
                val=sql.Identifier(target.value_column), t=ident(target.schema, target.table))
            with conn.cursor(name="verify", binary=True) as cur:
                cur.itersize = 10_000
                for row_id, key_id, value in cur.execute(q):
                    report.rows += 1
                    report.legacy += key_id is None
                    name = "legacy" if key_id is None else f"v{key_id}"
                    report.per_key[name] = report.per_key.get(name, 0) + 1
                    try:
                        ring.decrypt(value, key_id)
                    except (InvalidToken, UnknownKeyError):
                        if len(report.failures) < max_failures:
                            report.failures.append({"table": target.name, "id": str(row_id),
                                                    "key_id": key_id})
                        else:
                            report.failures[-1]["more"] = True
        try:
            chain = audit.verify(conn, cfg)
            report.audit_events, report.audit_head = chain.events, chain.head
        except AuditChainError as exc:
            report.audit_error = str(exc)
    return report
