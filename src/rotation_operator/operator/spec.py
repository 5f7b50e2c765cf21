"""An EncryptionPolicy's spec, read once: what the workflow, the status and the engine use.

:class:`Policy` wraps the object Kopf hands over (or the API returns) and turns its spec
into the package's typed configuration: the request for the decision layer, the store
configuration, the rotation options and the retention policy.  Every spec error is a
specific :class:`~rotation_operator.errors.ConfigError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from rotation_operator.errors import ConfigError
from rotation_operator.policy.config import (
    MIN_RETENTION_DAYS,
    RotationOptions,
    StoreConfig,
    Target,
    key_age,
    parse_duration,
    retention_from_days,
)
from rotation_operator.policy.decisions import Request, RequestKind, Retention
from rotation_operator.store.legacy import Reads

#: maxEncryptionsPerKey by default: 2^30, a quarter of NIST SP 800-38D's 2^32 bound for
#: random 96-bit nonces under one key.
DEFAULT_MAX_ENCRYPTIONS = 1 << 30


@dataclass(frozen=True)
class Policy:
    """The parts of an EncryptionPolicy object the workflow reads."""

    namespace: str
    name: str
    generation: int
    spec: Mapping[str, Any]
    status: Mapping[str, Any]
    uid: str = ""

    @classmethod
    def from_object(cls, obj: Mapping[str, Any], namespace: str | None = None,
                    name: str | None = None) -> Policy:
        """From the object Kopf hands over or the API returns (``namespace``/``name``:
        when the caller knows them already)."""
        meta = obj.get("metadata") or {}
        return cls(namespace=namespace or meta["namespace"], name=name or meta["name"],
                   generation=int(meta.get("generation") or 0), spec=obj.get("spec") or {},
                   status=obj.get("status") or {}, uid=str(meta.get("uid") or ""))

    @property
    def version(self) -> int | None:
        """``spec.version`` if it is an integer (else None; :attr:`desired` says why)."""
        version = self.spec.get("version")
        return version if isinstance(version, int) and not isinstance(version, bool) else None

    @property
    def desired(self) -> int:
        version = self.spec.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ConfigError("spec.version must be a positive integer")
        return version

    @property
    def actor(self) -> str:
        return f"EncryptionPolicy {self.namespace}/{self.name} version={self.spec.get('version')}"

    @property
    def owner(self) -> str:
        """Whom the keys table's targets are recorded for."""
        return f"EncryptionPolicy {self.namespace}/{self.name}"

    @property
    def legacy_reads(self) -> Reads:
        """``spec.legacy.reads``: ``Closed`` (default) refuses legacy rows once every one
        was migrated; ``Open`` keeps reading and sweeping them (with a warning)."""
        legacy = self.spec.get("legacy") or {}
        if not isinstance(legacy, Mapping):
            raise ConfigError("spec.legacy must be an object")
        reads = legacy.get("reads", "Closed")
        if reads not in ("Open", "Closed"):
            raise ConfigError(f"spec.legacy.reads {reads!r} is not Open or Closed")
        return "open" if reads == "Open" else "closed"

    @property
    def paused(self) -> bool:
        return bool((self.spec.get("rotation") or {}).get("paused", False))

    def request(self, now: datetime | None = None, kind: RequestKind = "policy") -> Request:
        """What this policy asks of the database now: its version, and what it wants done
        by itself (a maximum key age, a usage bound).  ``kind``: ``refresh`` for the timer
        (a sweep or a scheduled rotation, nothing else)."""
        r = self.spec.get("rotation") or {}
        age = r.get("maxKeyAge")
        limit = r.get("maxEncryptionsPerKey", DEFAULT_MAX_ENCRYPTIONS)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ConfigError(f"maxEncryptionsPerKey {limit!r} is not a positive integer")
        return Request(kind, self.desired, self.paused, now or datetime.now(UTC),
                       key_age(age) if age else None, limit,
                       bool(r.get("rotateOnUsage", False)))

    def retention(self) -> Retention | None:
        ret = self.spec.get("retention")
        if not ret:
            return None
        return retention_from_days(ret.get("disableAfterDays", MIN_RETENTION_DAYS),
                                   ret.get("destroyAfterDays", MIN_RETENTION_DAYS))

    def store_config(self) -> StoreConfig:
        db = self.spec.get("database") or {}
        targets = [Target.from_spec(t) for t in self.spec.get("targets") or []]
        return StoreConfig(targets, db.get("keysTable", "encryption_keys"), db.get("schema"))

    def options(self) -> RotationOptions:
        r = self.spec.get("rotation") or {}
        defaults = RotationOptions()
        return RotationOptions(
            mode=r.get("mode", defaults.mode),
            batch_size=r.get("batchSize", defaults.batch_size),
            vacuum=r.get("vacuum", defaults.vacuum), workers=r.get("workers", defaults.workers),
            grace=r.get("graceSeconds", defaults.grace),
            max_batch_bytes=r.get("maxBatchBytes", defaults.max_batch_bytes),
            lock_timeout=r.get("lockTimeoutSeconds", defaults.lock_timeout),
            statement_timeout=r.get("statementTimeoutSeconds", defaults.statement_timeout),
            handover_timeout=r.get("handoverTimeoutSeconds", defaults.handover_timeout),
            max_rows_per_second=r.get("maxRowsPerSecond", defaults.max_rows_per_second),
            max_replication_lag=None if r.get("maxReplicationLag") is None else parse_duration(
                r["maxReplicationLag"], "maxReplicationLag").total_seconds(),
            max_blocked_sessions=r.get("maxBlockedSessions", defaults.max_blocked_sessions))

    def conditions(self) -> list[dict[str, Any]]:
        return [dict(c) for c in self.status.get("conditions") or []]
