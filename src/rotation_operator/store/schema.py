"""The operator's own tables: created and migrated here, idempotently.

Tables of one keys table ``K`` (names from :mod:`.names`):

* ``K``: one row per DEK (version, wrapped DEK, KEK fingerprint, state).  A partial unique
  index allows one ``active`` key (:mod:`.keys`).
* ``K_rotations``: one row per rotation or sweep, with its **fence** token; a partial
  unique index allows one ``running`` rotation (:mod:`.rotations`).
* ``K_meta``: the schema version, which targets this keys table covers and for whom
  (:mod:`.coverage`), and the legacy record (:mod:`.legacy`).
* ``K_audit``: the hash chain (:mod:`.audit`).

Fresh tables are created in their first shape and then migrated like old ones, so there is
one path for both.
"""

from __future__ import annotations

from psycopg import sql

from rotation_operator.store import audit
from rotation_operator.store.advisory import lock_key, lock_session, unlock_session
from rotation_operator.store.catalog import REGCLASS, regclass_arg
from rotation_operator.store.database import Conn
from rotation_operator.store.names import Tables

#: Version of the operator's own tables; :func:`migrate` brings older ones here.
SCHEMA_VERSION = 4


def exists(conn: Conn, tables: Tables) -> bool:
    """Whether the keys table exists."""
    return _exists(conn, tables, tables.keys_table)


def _exists(conn: Conn, tables: Tables, name: str) -> bool:
    row = conn.execute(sql.SQL("SELECT {} IS NOT NULL").format(REGCLASS),
                       regclass_arg(tables.schema, name)).fetchone()
    return bool(row and row[0])


def search_path_schemas(conn: Conn, tables: Tables) -> list[str]:
    """The schemas of the search path (in its order) that hold a table named like the keys
    table: where an unqualified name could resolve, now or after a ``CREATE TABLE``."""
    rows = conn.execute(
        "SELECT s.name FROM unnest(current_schemas(false)) WITH ORDINALITY AS s(name, pos) "
        "JOIN pg_namespace n ON n.nspname = s.name "
        "JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = %s "
        "AND c.relkind IN ('r', 'p') ORDER BY s.pos", (tables.keys_table,)).fetchall()
    return [str(r[0]) for r in rows]


def schema_version(conn: Conn, tables: Tables) -> int | None:
    """0 for tables from before versioning, None when there are none at all."""
    if not exists(conn, tables):
        return None
    if not _exists(conn, tables, tables.meta_table):
        return 1
    row = conn.execute(sql.SQL("SELECT schema_version FROM {}").format(tables.meta)
                       ).fetchone()
    return int(row[0]) if row else 1


def migrate(conn: Conn, tables: Tables) -> None:
    """Create or upgrade the operator's own tables; idempotent, safe concurrently.

    Nothing is created or locked when the schema is current (a reconcile then needs no
    CREATE privilege at all).
    """
    if schema_version(conn, tables) == SCHEMA_VERSION:
        return
    # A session lock taken *before* the transaction: the transaction then starts after
    # a concurrent migrator committed, so its catalog lookups see that migrator's tables
    # (an advisory lock taken inside a transaction does not refresh the catalog cache,
    # and CREATE TABLE would then collide with a table it did not see).
    key = lock_key(conn, tables, "migrate")
    lock_session(conn, key)
    try:
        with conn.transaction():
            version = schema_version(conn, tables)
            if version is None:
                _create_v1(conn, tables)
                version = 1
            if version < 2:
                _migrate_v2(conn, tables)
            if version < 3:
                _migrate_v3(conn, tables)
            if version < 4:
                _migrate_v4(conn, tables)
            if version < SCHEMA_VERSION:
                conn.execute(sql.SQL("UPDATE {} SET schema_version = %s, updated_at = now()"
                                     ).format(tables.meta), (SCHEMA_VERSION,))
    finally:
        unlock_session(conn, key)


def _create_v1(conn: Conn, tables: Tables) -> None:
    # CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when the schema
    # exists; a least-privilege role is usually given a schema, not that.
    if tables.schema and conn.execute("SELECT to_regnamespace(quote_ident(%s)) IS NULL",
                                      (tables.schema,)).fetchone() == (True,):
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(tables.schema)))
    conn.execute(sql.SQL(
        """CREATE TABLE {keys} (
            version integer PRIMARY KEY CHECK (version > 0),
            wrapped_dek bytea NOT NULL,
            kek_fingerprint text NOT NULL,
            state text NOT NULL CHECK (state IN ('active', 'retiring', 'retired')),
            active boolean GENERATED ALWAYS AS (state = 'active') STORED,
            rotated_by text NOT NULL,
            policy_version bigint,
            created_at timestamptz NOT NULL DEFAULT now(),
            retired_at timestamptz
        )""").format(keys=tables.keys))
    conn.execute(sql.SQL("CREATE UNIQUE INDEX {idx} ON {keys} (active) WHERE active").format(
        idx=tables.index(f"{tables.keys_table}_one_active"), keys=tables.keys))
    conn.execute(sql.SQL(
        """CREATE TABLE {rot} (
            requested_version bigint PRIMARY KEY,
            phase text NOT NULL
                CHECK (phase IN ('baseline', 'running', 'done', 'superseded')),
            mode text,
            from_version integer,
            to_version integer NOT NULL,
            requested_by text NOT NULL,
            started_at timestamptz NOT NULL DEFAULT now(),
            finished_at timestamptz,
            re_encrypted bigint NOT NULL DEFAULT 0,
            total bigint NOT NULL DEFAULT 0
        )""").format(rot=tables.rotations))
    conn.execute(audit.create_sql(tables))


def _migrate_v2(conn: Conn, tables: Tables) -> None:
    """Rotation records keyed by an id (manual rotations and sweeps serve no policy
    version), fences, at most one running rotation; the meta table."""
    base = tables.keys_table
    conn.execute(sql.SQL(
        """CREATE TABLE IF NOT EXISTS {meta} (
            singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
            schema_version integer NOT NULL,
            owner text,
            targets jsonb,
            updated_at timestamptz NOT NULL DEFAULT now()
        )""").format(meta=tables.meta))
    conn.execute(sql.SQL("INSERT INTO {} (schema_version) VALUES (1) ON CONFLICT DO NOTHING"
                         ).format(tables.meta))
    pkey = conn.execute(
        sql.SQL("SELECT conname FROM pg_constraint WHERE contype = 'p' AND conrelid = {}"
                ).format(REGCLASS), regclass_arg(tables.schema, tables.rotations_table)
    ).fetchone()
    rot = tables.rotations
    conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN id bigint GENERATED BY DEFAULT AS "
                         "IDENTITY").format(rot))
    if pkey:
        conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
            rot, tables.index(pkey[0])))
    for statement in (
            sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (id)"),
            sql.SQL("ALTER TABLE {} ALTER COLUMN requested_version DROP NOT NULL"),
            sql.SQL("ALTER TABLE {} ADD COLUMN kind text NOT NULL DEFAULT 'policy' "
                    "CHECK (kind IN ('policy', 'manual', 'sweep'))"),
            sql.SQL("ALTER TABLE {} ADD COLUMN fence bigint NOT NULL DEFAULT 0"),
            sql.SQL("ALTER TABLE {} ADD COLUMN announced_at timestamptz"),
            sql.SQL("ALTER TABLE {} ADD COLUMN report jsonb NOT NULL DEFAULT '{{}}'::jsonb")):
        conn.execute(statement.format(rot))
    conn.execute(sql.SQL("CREATE UNIQUE INDEX {} ON {} ((true)) WHERE phase = 'running'"
                         ).format(tables.index(f"{base}_rot_running"), rot))
    conn.execute(sql.SQL(
        "CREATE UNIQUE INDEX {} ON {} (requested_version) WHERE requested_version IS NOT "
        "NULL AND phase <> 'superseded'").format(tables.index(f"{base}_rot_policy"), rot))


def _migrate_v3(conn: Conn, tables: Tables) -> None:
    """The end of a key's life (disabled, destroyed), its census and usage, and
    scheduled rotations."""
    base = tables.keys_table
    _replace_check(conn, tables, base, "state", f"{base}_state",
                   sql.SQL("state IN ('active', 'retiring', 'retired', 'disabled', "
                           "'destroyed')"))
    _replace_check(conn, tables, tables.rotations_table, "kind", f"{base}_rot_kind",
                   sql.SQL("kind IN ('policy', 'manual', 'sweep', 'scheduled')"))
    conn.execute(sql.SQL(
        "ALTER TABLE {} ADD COLUMN zero_rows_since timestamptz, "
        "ADD COLUMN disabled_at timestamptz, ADD COLUMN destroy_after timestamptz, "
        "ADD COLUMN destroyed_at timestamptz, "
        "ADD COLUMN encryptions bigint NOT NULL DEFAULT 0, "
        "ADD COLUMN writes_at_mint bigint").format(tables.keys))


def _migrate_v4(conn: Conn, tables: Tables) -> None:
    """The legacy record (:mod:`.legacy`): when every legacy row was migrated, and
    whether rings keep reading legacy rows after that.  A keys table whose first rotation
    finished under an older release migrated them then: recorded from its records."""
    # IF NOT EXISTS: a meta table may outlive the keys table it served (dropped by hand);
    # the record is then computed anew from this keys table's own rotations, below.
    conn.execute(sql.SQL(
        "ALTER TABLE {} ADD COLUMN IF NOT EXISTS legacy_migrated_at timestamptz, "
        "ADD COLUMN IF NOT EXISTS legacy_reads text NOT NULL DEFAULT 'closed' "
        "CHECK (legacy_reads IN ('open', 'closed'))").format(tables.meta))
    conn.execute(sql.SQL(
        "UPDATE {meta} SET legacy_migrated_at = (SELECT min(finished_at) FROM {rot} "
        "WHERE phase = 'done' AND kind IN ('policy', 'manual', 'scheduled'))").format(
            meta=tables.meta, rot=tables.rotations))


def _replace_check(conn: Conn, tables: Tables, table: str, column: str, name: str,
                   rule: sql.SQL) -> None:
    rows = conn.execute(sql.SQL(
        "SELECT conname FROM pg_constraint WHERE conrelid = {} AND contype = 'c' "
        "AND pg_get_constraintdef(oid) LIKE %s").format(REGCLASS),
        (*regclass_arg(tables.schema, table), f"%({column}%")).fetchall()
    ident = tables.table(table)
    for (conname,) in rows:
        conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
            ident, tables.index(conname)))
    conn.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK ({})").format(
        ident, tables.index(name), rule))
