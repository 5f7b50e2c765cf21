"""Advisory-lock keys of a keys table, and the short locks taken with them.

Why: two initialisers must make one key v1, two migrators one set of tables, and two
rotators must never interleave (:mod:`.locks`).  Each purpose locks one 64-bit key derived
from the keys table's name *as PostgreSQL resolves it*, so ``encryption_keys`` found through
the search_path and ``public.encryption_keys`` are one table, hence one lock.
"""

from __future__ import annotations

import hashlib

from rotation_operator.store.database import Conn
from rotation_operator.store.names import Tables


def lock_id(name: str, purpose: str) -> int:
    """A stable 64-bit advisory-lock key for the keys table ``name`` (schema-qualified as
    PostgreSQL resolves it) and purpose."""
    digest = hashlib.sha256(f"rotation-operator:{purpose}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def resolved_name(conn: Conn, tables: Tables) -> str:
    """``schema.table`` of the keys table as PostgreSQL resolves it (also before it
    exists: the first schema of the search_path that it would be created in)."""
    if tables.schema:
        return tables.qualified_keys
    row = conn.execute(
        "SELECT coalesce((SELECT n.nspname FROM pg_class c JOIN pg_namespace n "
        "ON n.oid = c.relnamespace WHERE c.oid = to_regclass(quote_ident(%s))), "
        "current_schema())", (tables.keys_table,)).fetchone()
    schema = row[0] if row else None
    return f"{schema}.{tables.keys_table}" if schema else tables.keys_table


def lock_key(conn: Conn, tables: Tables, purpose: str) -> int:
    """The advisory-lock key of this keys table for ``purpose``."""
    return lock_id(resolved_name(conn, tables), purpose)


def lock_xact(conn: Conn, tables: Tables, purpose: str) -> None:
    """Take the lock for ``purpose`` until the caller's transaction ends."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)",
                 (lock_key(conn, tables, purpose),))


def lock_session(conn: Conn, key: int) -> None:
    """Wait for the session lock ``key`` (release it with :func:`unlock_session`)."""
    conn.execute("SELECT pg_advisory_lock(%s)", (key,))


def unlock_session(conn: Conn, key: int) -> None:
    conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
