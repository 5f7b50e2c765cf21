"""Whether legacy rows may still be read: the meta table's legacy record.

Legacy rows (key id NULL) are format-v1 values under the KEK itself, from before envelope
encryption.  The first rotation moves every one of them onto a DEK and records it here
(``legacy_migrated_at``); from then on a row with key id NULL is either a rollback (an old
ciphertext put back by a database writer) or an application still writing without DEKs,
and key rings refuse it unless the policy keeps legacy reads open (``legacy_reads``,
written from ``spec.legacy.reads`` or the CLI's ``--legacy-reads``).  The operator, the CLI
and the application library all read this one record when they load a ring
(``docs/format.md`` §8).

Tables from before schema version 4 have no record: legacy reads stay open there.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from psycopg import sql

from rotation_operator.store import audit
from rotation_operator.store.database import Conn
from rotation_operator.store.names import Tables
from rotation_operator.store.schema import schema_version

#: The schema version that added the legacy record.
SINCE = 4
Reads = Literal["open", "closed"]


@dataclass(frozen=True)
class LegacyState:
    """The legacy record: when every legacy row was migrated (None: not yet), and whether
    rings keep reading legacy rows after that."""

    migrated_at: datetime | None = None
    reads: Reads = "closed"

    @property
    def migrated(self) -> bool:
        return self.migrated_at is not None

    @property
    def closed(self) -> bool:
        """Rings refuse key id NULL: every legacy row was migrated and reads are closed."""
        return self.migrated and self.reads == "closed"

    @property
    def open_after_migration(self) -> bool:
        """Migrated, but the policy keeps legacy reads open (the warning's case)."""
        return self.migrated and self.reads == "open"


#: Before the record exists (older tables): nothing migrated, reads open.
UNRECORDED = LegacyState(None, "open")


def state(conn: Conn, tables: Tables) -> LegacyState:
    """The legacy record (needs SELECT on the meta table: the library has it)."""
    if (schema_version(conn, tables) or 0) < SINCE:
        return UNRECORDED
    row = conn.execute(sql.SQL("SELECT legacy_migrated_at, legacy_reads FROM {}").format(
        tables.meta)).fetchone()
    if row is None:
        return UNRECORDED
    return LegacyState(row[0], "open" if row[1] == "open" else "closed")


def set_reads(conn: Conn, tables: Tables, reads: Reads, actor: str) -> bool:
    """Record whether rings keep reading legacy rows after migration; True if it changed
    (audited)."""
    row = conn.execute(sql.SQL(
        "UPDATE {} SET legacy_reads = %s, updated_at = now() "
        "WHERE legacy_reads IS DISTINCT FROM %s RETURNING legacy_migrated_at").format(
            tables.meta), (reads, reads)).fetchone()
    if row is None:
        return False
    audit.append(conn, tables, "legacy_reads_set", actor=actor,
                 detail={"reads": reads, "migrated": row[0] is not None})
    return True


def mark_migrated(conn: Conn, tables: Tables, actor: str, record_id: int) -> bool:
    """Record, once, that every legacy row has been moved onto a DEK (by rotation record
    ``record_id``); True the first time (audited)."""
    row = conn.execute(sql.SQL(
        "UPDATE {} SET legacy_migrated_at = now(), updated_at = now() "
        "WHERE legacy_migrated_at IS NULL RETURNING legacy_reads").format(tables.meta)
    ).fetchone()
    if row is None:
        return False
    audit.append(conn, tables, "legacy_migrated", actor=actor,
                 detail={"record": record_id, "reads": row[0]})
    return True
