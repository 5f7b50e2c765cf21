"""What the engine works on: the keys table and the application's target tables.

Names come from a custom resource or the command line, so they are untrusted.  They are
validated here (a plain SQL identifier: letters, digits, underscore, at most 63 bytes) and
*also* always passed to PostgreSQL through ``psycopg.sql.Identifier``: validation gives a
clear error early, quoting makes injection impossible even if validation had a hole.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

from rotation_operator.errors import ConfigError

if TYPE_CHECKING:
    from rotation_operator.policy.decisions import Retention

IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
#: The keys table name is shorter so derived names (``<keys>_audit``…) still fit 63 bytes.
KEYS_TABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,47}$")
Mode = Literal["Online", "Atomic"]
MODES: tuple[Mode, ...] = ("Online", "Atomic")
MIN_BATCH, MAX_BATCH, DEFAULT_BATCH = 100, 50_000, 5_000
#: The largest rate or session limit a policy may set.
MAX_LIMIT = 10_000_000
#: Column types a key-id column may have.
KEY_INT_TYPES = ("smallint", "integer", "bigint")
MIN_BATCH_BYTES, MAX_BATCH_BYTES, DEFAULT_BATCH_BYTES = 1 << 20, 1 << 30, 8 << 20


def identifier(value: object, what: str, pattern: re.Pattern[str] = IDENTIFIER) -> str:
    """Return ``value`` if it is a plain SQL identifier, else raise a specific ConfigError."""
    if not isinstance(value, str) or not pattern.fullmatch(value):
        limit = 48 if pattern is KEYS_TABLE else 63
        raise ConfigError(
            f"{what} {value!r} is not a plain SQL identifier "
            f"(letters, digits and _, not starting with a digit, at most {limit} characters)"
        )
    return value


@dataclass(frozen=True)
class Target:
    """One application table holding encrypted values."""

    table: str
    id_column: str = "id"
    value_column: str = "value"
    key_id_column: str = "key_id"
    schema: str | None = None

    def __post_init__(self) -> None:
        identifier(self.table, "target table")
        identifier(self.id_column, f"idColumn of table {self.table}")
        identifier(self.value_column, f"valueColumn of table {self.table}")
        identifier(self.key_id_column, f"keyIdColumn of table {self.table}")
        if self.schema is not None:
            identifier(self.schema, f"schema of table {self.table}")
        if len({self.id_column, self.value_column, self.key_id_column}) != 3:
            raise ConfigError(f"table {self.table}: id, value and key-id columns must differ")

    @property
    def name(self) -> str:
        """Display name, e.g. ``public.secrets`` or ``secrets``."""
        return f"{self.schema}.{self.table}" if self.schema else self.table

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Target:
        """Build from a CR ``spec.targets[]`` item (camelCase keys)."""
        if not isinstance(spec, Mapping) or "table" not in spec:
            raise ConfigError("each target needs at least a table")
        return cls(
            table=spec["table"],
            id_column=spec.get("idColumn", "id"),
            value_column=spec.get("valueColumn", "value"),
            key_id_column=spec.get("keyIdColumn", "key_id"),
            schema=spec.get("schema"),
        )

    @classmethod
    def parse(cls, text: str) -> Target:
        """Parse the CLI form ``[schema.]table[:id_col:value_col:key_id_col]``."""
        name, _, cols = text.partition(":")
        schema, _, table = name.rpartition(".")
        parts = cols.split(":") if cols else []
        if parts and len(parts) != 3:
            raise ConfigError(
                f"target {text!r}: expected [schema.]table or [schema.]table:id:value:key_id"
            )
        if parts:
            return cls(table, parts[0], parts[1], parts[2], schema=schema or None)
        return cls(table, schema=schema or None)


@dataclass(frozen=True)
class StoreConfig:
    """The keys table and the targets one policy manages."""

    targets: Sequence[Target]
    keys_table: str = "encryption_keys"
    schema: str | None = None

    def __post_init__(self) -> None:
        identifier(self.keys_table, "keysTable", KEYS_TABLE)
        if self.schema is not None:
            identifier(self.schema, "keys schema")
        if not self.targets:
            raise ConfigError("at least one target table is required")
        names = [(t.schema, t.table) for t in self.targets]
        if len(set(names)) != len(names):
            raise ConfigError("a target table is listed twice")
        own = {self.keys_table, self.audit_table, self.rotations_table}
        for t in self.targets:
            if t.table in own and t.schema == self.schema:
                raise ConfigError(f"target {t.name} is one of the operator's own tables")

    @property
    def audit_table(self) -> str:
        return f"{self.keys_table}_audit"

    @property
    def rotations_table(self) -> str:
        return f"{self.keys_table}_rotations"

    @property
    def qualified_keys(self) -> str:
        return f"{self.schema}.{self.keys_table}" if self.schema else self.keys_table


@dataclass(frozen=True)
class RotationOptions:
    """How to rotate: mode, batch bounds, vacuum afterwards, workers, handover, timeouts."""

    mode: Mode = "Online"
    batch_size: int = DEFAULT_BATCH
    vacuum: bool = True
    #: Processes that re-encrypt in parallel (online mode, tables of more than 16 batches);
    #: 1 = in this process only.
    workers: int = 2
    #: Seconds after the new key's commit before the handover waits for transactions in
    #: flight and the final passes run: more than the application library's ``max_age``
    #: (1 s by default), so every ring has seen the new key.
    grace: float = 2.0
    #: Upper bound on the bytes of values one batch holds (rows are also bounded by
    #: ``batch_size``): keeps memory flat with large values.
    max_batch_bytes: int = DEFAULT_BATCH_BYTES
    #: Seconds a rotation statement may wait for a lock (0 = forever), so an Atomic
    #: ``LOCK TABLE`` behind a long transaction does not queue every application writer.
    lock_timeout: float = 5.0
    #: Seconds one rotation statement may run (0 = no limit).
    statement_timeout: float = 600.0
    #: Seconds the handover waits for transactions that were open after the grace; past
    #: it the rotation finishes and rows they commit later under the old key are swept.
    handover_timeout: float = 300.0
    #: Seconds between checks that the rotation lock's session is alive.
    heartbeat: float = 1.0
    #: Rows per second over all workers (0 = as fast as it goes).
    max_rows_per_second: int = 0
    #: Seconds a streaming replica may replay behind before batches pause (None = no
    #: limit).  Needs ``pg_monitor`` to read ``pg_stat_replication``.
    max_replication_lag: float | None = None
    #: Application sessions a batch may keep waiting on its row locks before the rotation
    #: backs off (None = no limit).
    max_blocked_sessions: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"rotation mode {self.mode!r} is not one of {', '.join(MODES)}")
        # bool is an int to Python; a string or float from a loose spec is not a count.
        for name, value in (("batchSize", self.batch_size), ("workers", self.workers),
                            ("maxBatchBytes", self.max_batch_bytes)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{name} {value!r} is not an integer")
        if not MIN_BATCH <= self.batch_size <= MAX_BATCH:
            raise ConfigError(
                f"batchSize {self.batch_size} is outside {MIN_BATCH}..{MAX_BATCH} "
                "(larger batches flip PostgreSQL to a slower hash-join plan)"
            )
        if not MIN_BATCH_BYTES <= self.max_batch_bytes <= MAX_BATCH_BYTES:
            raise ConfigError(f"maxBatchBytes {self.max_batch_bytes} is outside "
                              f"{MIN_BATCH_BYTES}..{MAX_BATCH_BYTES}")
        limits: tuple[tuple[str, float, int], ...] = (
            ("graceSeconds", self.grace, 3600),
            ("lockTimeoutSeconds", self.lock_timeout, 3600),
            ("statementTimeoutSeconds", self.statement_timeout, 86400),
            ("handoverTimeoutSeconds", self.handover_timeout, 86400),
            ("heartbeat", self.heartbeat, 60))
        for name, seconds, top in limits:
            if isinstance(seconds, bool) or not isinstance(seconds, int | float) or \
                    not 0 <= seconds <= top:
                raise ConfigError(f"{name} {seconds!r} is outside 0..{top} seconds")
        if not 1 <= self.workers <= 8:
            raise ConfigError(f"workers {self.workers} is outside 1..8")
        if self.heartbeat <= 0:
            raise ConfigError("heartbeat must be more than 0 seconds")
        for name, count in (("maxRowsPerSecond", self.max_rows_per_second),
                            ("maxBlockedSessions", self.max_blocked_sessions)):
            if count is not None and (not isinstance(count, int) or isinstance(count, bool)
                                      or not 0 <= count <= MAX_LIMIT):
                raise ConfigError(f"{name} {count!r} is not an integer in 0..{MAX_LIMIT}")
        lag = self.max_replication_lag
        if lag is not None and (isinstance(lag, bool) or not isinstance(lag, int | float)
                                or not 0 < lag <= 86400):
            raise ConfigError(f"maxReplicationLag {lag!r} is outside 0..86400 seconds "
                              "(more than 0)")

    @property
    def effective_batch_size(self) -> int:
        """Rows per batch: with a rate limit, about a quarter second's worth at most, so
        the rate holds smoothly rather than in bursts of whole batches."""
        if not self.max_rows_per_second:
            return self.batch_size
        return max(MIN_BATCH, min(self.batch_size, self.max_rows_per_second // 4))

    def replace(self, **changes: Any) -> RotationOptions:
        return dataclasses.replace(self, **changes)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
#: The longest duration a policy may name (beyond it, date arithmetic overflows).
MAX_DURATION = timedelta(days=36500)
#: The shortest maxKeyAge: shorter would rotate more or less continuously.
MIN_KEY_AGE = timedelta(seconds=10)


def parse_duration(text: object, what: str) -> timedelta:
    """``90d``, ``2160h``, ``1h30m``, ``45s``: a duration, or a specific ConfigError."""
    if not isinstance(text, str) or not text or _DURATION.sub("", text) != "":
        raise ConfigError(f"{what} {text!r} is not a duration like 90d, 2160h or 1h30m")
    seconds = sum(float(n) * _UNITS[u] for n, u in _DURATION.findall(text))
    if seconds > MAX_DURATION.total_seconds():
        raise ConfigError(f"{what} {text!r} is longer than 100 years")
    return timedelta(seconds=seconds)


def key_age(text: object) -> timedelta:
    age = parse_duration(text, "maxKeyAge")
    if age < MIN_KEY_AGE:
        raise ConfigError(f"maxKeyAge {text!r} is shorter than {MIN_KEY_AGE.seconds}s")
    return age


#: The shortest retention period, in days: a key destroyed early cannot be brought back.
MIN_RETENTION_DAYS = 7
#: What :func:`retention_from_days` calls the two periods, unless told otherwise.
RETENTION_FIELDS = ("retention.disableAfterDays", "retention.destroyAfterDays")


def retention_days(value: object, what: str) -> int:
    """A retention period in whole days, ``MIN_RETENTION_DAYS`` to 100 years."""
    if not isinstance(value, int) or isinstance(value, bool) or value < MIN_RETENTION_DAYS:
        raise ConfigError(f"{what} {value!r} is below {MIN_RETENTION_DAYS} days: a key "
                          "destroyed early cannot be brought back")
    if value > MAX_DURATION.days:
        raise ConfigError(f"{what} {value} is more than {MAX_DURATION.days} days")
    return value


def retention_from_days(disable_after: object, destroy_after: object, *,
                        names: tuple[str, str] = RETENTION_FIELDS) -> Retention:
    """The one retention rule (a policy's ``spec.retention``, the CLI's ``keys plan``):
    retired keys with no row for ``disable_after`` days are disabled, and destroyed
    ``destroy_after`` days later; ``names`` say where each number came from."""
    from rotation_operator.policy.decisions import Retention  # decisions imports this module

    disable = retention_days(disable_after, names[0])
    destroy = retention_days(destroy_after, names[1])
    return Retention(timedelta(days=disable), timedelta(days=destroy))


def targets_from_spec(items: Iterable[Mapping[str, Any]]) -> list[Target]:
    return [Target.from_spec(item) for item in items]
