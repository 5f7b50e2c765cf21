"""Which targets a keys table covers, and for whom: the meta table's coverage.

Why: two applications pointed at one keys table would retire each other's keys (a rotation
moves only the rows of its own targets).  So the first policy (or CLI call) records the
targets it serves, and a request naming other targets is refused before any write; the
recorded owner (a policy's ``namespace/name``) may change its own targets.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from psycopg import sql
from psycopg.types.json import Jsonb

from rotation_operator.errors import KeysTableShared
from rotation_operator.store import audit
from rotation_operator.store.catalog import Layout
from rotation_operator.store.database import Conn
from rotation_operator.store.names import Tables
from rotation_operator.store.schema import schema_version


@dataclass(frozen=True)
class Coverage:
    """Which targets a keys table covers, and which policy (or the CLI) recorded them."""

    owner: str | None
    targets: tuple[Mapping[str, str], ...]


def coverage(conn: Conn, tables: Tables) -> Coverage | None:
    """The recorded coverage, or None before any is recorded (or before v2 tables)."""
    if (schema_version(conn, tables) or 0) < 2:
        return None
    row = conn.execute(sql.SQL("SELECT owner, targets FROM {}").format(tables.meta)
                       ).fetchone()
    if row is None or row[1] is None:
        return None
    return Coverage(row[0], tuple(row[1]))


def check_coverage(conn: Conn, tables: Tables, layouts: Sequence[Layout], owner: str | None
                   ) -> Coverage | None:
    """Refuse targets that disagree with the recorded ones (read-only).

    The recorded owner (a policy's ``namespace/name``) may change its own targets;
    anyone else must name exactly the recorded ones.  Returns the coverage to record
    (None when nothing changes).
    """
    mine = tuple(sorted((layout.record() for layout in layouts), key=_target_key))
    recorded = coverage(conn, tables)
    if recorded is None:
        return Coverage(owner, mine)
    if _canonical(recorded.targets) == _canonical(mine):
        return None if recorded.owner or not owner else Coverage(owner, mine)
    if owner is not None and owner == recorded.owner:
        return Coverage(owner, mine)
    theirs = ", ".join(sorted(f"{t['schema']}.{t['table']}" for t in recorded.targets))
    ours = ", ".join(sorted(f"{t['schema']}.{t['table']}" for t in mine))
    who = recorded.owner or "an earlier caller"
    raise KeysTableShared(
        f"keys table {tables.qualified_keys} covers {theirs} for {who}; this request "
        f"names {ours}: give each application its own keysTable, or name the same "
        "targets")


def record_coverage(conn: Conn, tables: Tables, layouts: Sequence[Layout], owner: str | None,
                    actor: str) -> None:
    """Check the coverage again and record it, atomically: the meta row is locked, so
    of two policies that raced past the read-only check only one records its targets
    and the other is refused here."""
    with conn.transaction():
        conn.execute(sql.SQL("SELECT 1 FROM {} FOR UPDATE").format(tables.meta))
        found = check_coverage(conn, tables, layouts, owner)
        if found is not None:
            _record(conn, tables, found, actor)


def _record(conn: Conn, tables: Tables, found: Coverage, actor: str) -> None:
    conn.execute(sql.SQL("UPDATE {} SET owner = %s, targets = %s, updated_at = now()"
                         ).format(tables.meta),
                 (found.owner, Jsonb(list(found.targets))))
    audit.append(conn, tables, "coverage_recorded", actor=actor, detail={
        "owner": found.owner,
        "targets": [f"{t['schema']}.{t['table']}" for t in found.targets]})


def _target_key(t: Mapping[str, str]) -> tuple[str, str]:
    return (t["schema"], t["table"])


def _canonical(targets: Iterable[Mapping[str, str]]) -> str:
    return json.dumps(sorted((dict(t) for t in targets), key=_target_key), sort_keys=True)
