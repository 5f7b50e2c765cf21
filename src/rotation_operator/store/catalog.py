"""What a target table is made of, read from the catalog before anything is written.

Why: a rotation walks heaps by block range and updates rows by ``ctid`` and ``xmin``, which
are unique only within one heap.  A partitioned table has no heap of its own (its
``pg_relation_size`` is 0, so it offers no block range at all), and an UPDATE on an
inheritance parent also matches its children's rows unless it says ``ONLY``.  So every
target is resolved here to the heaps that hold its rows (leaf partitions, or the parent and
its inheritance children), and each heap is rotated on its own, always with ``ONLY``.

The same pass finds what would make a rotation lie or loop, and refuses it by name:
row-level security that hides rows from the operator's role (they would stay under the old
key while the count says zero), UPDATE rules, foreign-table partitions, missing column
grants.  BEFORE UPDATE row triggers are allowed, but marked: the mover then checks that
each row it wrote holds exactly its value and key id (a trigger that changes the row rolls
the batch back), and the progress watchdog stops a rotation that a trigger suppresses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from psycopg import sql

from rotation_operator.errors import (
    DatabaseForbidden,
    RowSecurityError,
    SchemaError,
    TargetUnsupported,
)
from rotation_operator.policy.config import KEY_INT_TYPES, Target
from rotation_operator.store.database import Conn
from rotation_operator.store.names import ident

Kind = Literal["table", "partitioned", "inherited"]
_RELKIND = {"v": "a view", "m": "a materialized view", "f": "a foreign table",
            "S": "a sequence", "c": "a composite type", "i": "an index", "I": "an index",
            "t": "a TOAST table"}
#: pg_trigger.tgtype bits (src/include/catalog/pg_trigger.h)
_ROW, _BEFORE, _UPDATE = 1, 2, 16


@dataclass(frozen=True)
class Heap:
    """One relation with storage that holds rows of a target."""

    oid: int
    schema: str
    name: str
    #: Enabled BEFORE UPDATE row triggers: the mover verifies what it wrote.
    before_update_triggers: tuple[str, ...] = ()
    #: Enabled AFTER UPDATE row triggers (they see the rotation's updates; reported only).
    after_update_triggers: tuple[str, ...] = ()
    #: The role may VACUUM it (owner, database owner or superuser).
    vacuumable: bool = True

    @property
    def ident(self) -> sql.Identifier:
        return ident(self.schema, self.name)

    @property
    def display(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True)
class Layout:
    """A target as the catalog describes it."""

    target: Target
    oid: int
    schema: str
    kind: Kind
    heaps: tuple[Heap, ...]

    @property
    def display(self) -> str:
        return f"{self.schema}.{self.target.table}"

    @property
    def ident(self) -> sql.Identifier:
        return ident(self.schema, self.target.table)

    def record(self) -> dict[str, str]:
        """The canonical form stored as the keys table's coverage (schema resolved)."""
        t = self.target
        return {"schema": self.schema, "table": t.table, "idColumn": t.id_column,
                "valueColumn": t.value_column, "keyIdColumn": t.key_id_column}


def regclass_arg(schema: str | None, table: str) -> tuple[str | None, str, str | None, str]:
    """Parameters for the ``to_regclass`` expression of :data:`REGCLASS`."""
    return (schema, table, schema, table)


#: A relation's oid from its (optionally schema-qualified) name, quoting each part (the
#: parameters: :func:`regclass_arg`).
REGCLASS = sql.SQL("to_regclass(CASE WHEN %s::text IS NULL THEN quote_ident(%s) "
                   "ELSE quote_ident(%s) || '.' || quote_ident(%s) END)")


def inspect(conn: Conn, target: Target, *, writes: bool = True) -> Layout:
    """Resolve ``target`` to its heaps and check everything a rotation relies on.

    ``writes=False`` (status, verify) checks only what reading through the parent needs.
    Raises :class:`SchemaError` (and subclasses) or :class:`DatabaseForbidden` by name.
    """
    row = conn.execute(sql.SQL(
        "SELECT c.oid, n.nspname, c.relkind FROM pg_class c JOIN pg_namespace n "
        "ON n.oid = c.relnamespace WHERE c.oid = {}").format(REGCLASS),
        regclass_arg(target.schema, target.table)).fetchone()
    if row is None:
        raise SchemaError(f"target table {target.name} does not exist")
    oid, schema, relkind = int(row[0]), str(row[1]), str(row[2])
    if relkind not in ("r", "p"):
        raise TargetUnsupported(f"target {target.name} is {_RELKIND.get(relkind, relkind)}, "
                                "not a table")
    _check_columns(conn, oid, target)
    members = _members(conn, oid, relkind, target)
    kind: Kind = "partitioned" if relkind == "p" else (
        "inherited" if len(members) > 1 else "table")
    rels = [oid, *[m[0] for m in members if m[0] != oid]]
    _check_row_security(conn, rels, target)
    _check_privileges(conn, oid, members, target, writes)
    heaps = _heaps(conn, members, target) if writes else tuple(
        Heap(m[0], m[1], m[2]) for m in members)
    return Layout(target, oid, schema, kind, heaps)


def _check_columns(conn: Conn, oid: int, target: Target) -> None:
    cols = dict(conn.execute(
        "SELECT attname, atttypid::regtype::text FROM pg_attribute "
        "WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped", (oid,)).fetchall())
    for col in (target.id_column, target.value_column, target.key_id_column):
        if col not in cols:
            raise SchemaError(f"table {target.name} has no column {col}")
    if cols[target.value_column] != "bytea":
        raise SchemaError(f"value column {target.name}.{target.value_column} is "
                          f"{cols[target.value_column]}; it must be bytea")
    if cols[target.key_id_column] not in KEY_INT_TYPES:
        raise SchemaError(f"key-id column {target.name}.{target.key_id_column} is "
                          f"{cols[target.key_id_column]}; it must be an integer type")


def _members(conn: Conn, oid: int, relkind: str, target: Target
             ) -> list[tuple[int, str, str]]:
    """(oid, schema, name) of every relation with storage holding the target's rows."""
    if relkind == "p":
        rows = conn.execute(
            "SELECT c.oid, n.nspname, c.relname, c.relkind FROM pg_partition_tree(%s) p "
            "JOIN pg_class c ON c.oid = p.relid JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE p.isleaf ORDER BY c.oid", (oid,)).fetchall()
    else:
        rows = conn.execute(
            "WITH RECURSIVE tree(oid) AS (SELECT %s::oid UNION "
            "SELECT i.inhrelid FROM pg_inherits i JOIN tree t ON i.inhparent = t.oid) "
            "SELECT c.oid, n.nspname, c.relname, c.relkind FROM tree JOIN pg_class c "
            "ON c.oid = tree.oid JOIN pg_namespace n ON n.oid = c.relnamespace "
            "ORDER BY c.oid = %s DESC, c.oid", (oid, oid)).fetchall()
    members = []
    for member_oid, schema, name, kind in rows:
        if kind == "p":  # a partitioned leaf without partitions holds nothing
            continue
        if kind != "r":
            raise TargetUnsupported(
                f"target {target.name}: {schema}.{name} is {_RELKIND.get(kind, kind)}; "
                "its rows cannot be rotated in place (detach it or exclude it)")
        members.append((int(member_oid), str(schema), str(name)))
    return members


def _check_row_security(conn: Conn, rels: list[int], target: Target) -> None:
    """Refuse relations whose row-level security would hide rows from this role.

    Reading through the parent applies the parent's policies; updating a partition
    directly applies the partition's own.  Safe: RLS off, a role that bypasses it (superuser,
    BYPASSRLS, or the owner of a table without FORCE), or one permissive policy for the role
    that shows and accepts every row and no restrictive policy for it.
    """
    role = conn.execute("SELECT rolsuper OR rolbypassrls, current_user FROM pg_roles "
                        "WHERE rolname = current_user").fetchone()
    if role is None or role[0]:
        return
    subject = conn.execute(
        "SELECT c.oid, n.nspname || '.' || c.relname FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = ANY(%s) "
        "AND c.relrowsecurity AND (c.relforcerowsecurity OR NOT pg_has_role(c.relowner, "
        "'USAGE'))", (rels,)).fetchall()
    for oid, name in subject:
        policies = conn.execute(
            "SELECT polpermissive, polcmd, pg_get_expr(polqual, polrelid), "
            "pg_get_expr(polwithcheck, polrelid) FROM pg_policy WHERE polrelid = %s AND "
            "EXISTS (SELECT 1 FROM unnest(polroles) r WHERE r = 0 OR pg_has_role(r, 'USAGE'))",
            (oid,)).fetchall()
        everything = any(p and cmd == "*" and qual == "true" and check in (None, "true")
                         for p, cmd, qual, check in policies)
        restricted = any(not p and cmd in ("*", "r", "w") and (
            qual not in (None, "true") or check not in (None, "true"))
            for p, cmd, qual, check in policies)
        if everything and not restricted:
            continue
        raise RowSecurityError(
            f"target {target.name}: table {name} has row-level security and role {role[1]} "
            "is subject to it, so rows it cannot see would stay under the old key; give the "
            f"role a policy that sees every row (CREATE POLICY rotation_operator ON {name} "
            f"FOR ALL TO {role[1]} USING (true) WITH CHECK (true)) or BYPASSRLS")


def _check_privileges(conn: Conn, parent: int, members: list[tuple[int, str, str]],
                      target: Target, writes: bool) -> None:
    """Name the first missing grant, with the statement that fixes it."""
    schemas = sorted({schema for _, schema, _ in members} if writes else set())
    if schemas:
        row = conn.execute(
            "SELECT s, current_user FROM unnest(%s::text[]) AS s "
            "WHERE NOT has_schema_privilege(s, 'USAGE') LIMIT 1", (schemas,)).fetchone()
        if row is not None:
            raise DatabaseForbidden(f"role {row[1]} lacks USAGE on schema {row[0]}, which holds "
                                    f"rows of {target.name}: GRANT USAGE ON SCHEMA {row[0]} "
                                    f"TO {row[1]}")
    t = target
    read = (t.id_column, t.value_column, t.key_id_column)
    checks: list[tuple[int, str, str, str]] = [
        (parent, f"{t.name}", col, "SELECT") for col in read]
    if writes:
        for oid, schema, name in members:
            checks += [(oid, f"{schema}.{name}", col, "SELECT")
                       for col in (*read, "ctid", "xmin")]
            checks += [(oid, f"{schema}.{name}", col, "UPDATE")
                       for col in (t.value_column, t.key_id_column)]
    row = conn.execute(
        "SELECT x.n, x.c, x.p, current_user FROM unnest(%s::oid[], %s::text[], %s::text[], "
        "%s::text[]) AS x(o, n, c, p) WHERE NOT has_column_privilege(x.o, x.c, x.p) LIMIT 1",
        ([c[0] for c in checks], [c[1] for c in checks], [c[2] for c in checks],
         [c[3] for c in checks])).fetchone()
    if row is not None:
        name, col, privilege, role = row
        grant = f"GRANT SELECT ({', '.join(read)}) ON {name} TO {role}" if not writes else (
            f"GRANT SELECT ({', '.join(read)}, ctid, xmin), UPDATE ({t.value_column}, "
            f"{t.key_id_column}) ON {name} TO {role}")
        raise DatabaseForbidden(f"role {role} lacks {privilege} on {name}.{col}: {grant}")


def _heaps(conn: Conn, members: list[tuple[int, str, str]], target: Target
           ) -> tuple[Heap, ...]:
    oids = [m[0] for m in members]
    rules = conn.execute(
        "SELECT n.nspname || '.' || c.relname, r.rulename FROM pg_rewrite r "
        "JOIN pg_class c ON c.oid = r.ev_class JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE r.ev_class = ANY(%s) AND r.ev_type = '2'", (oids,)).fetchall()
    if rules:
        raise TargetUnsupported(f"target {target.name}: {rules[0][0]} has an UPDATE rule "
                                f"({rules[0][1]}) that would rewrite the rotation's UPDATE")
    triggers: dict[int, tuple[list[str], list[str]]] = {oid: ([], []) for oid in oids}
    for oid, name, before in conn.execute(
            "SELECT tgrelid, tgname, (tgtype & %s) <> 0 FROM pg_trigger "
            "WHERE tgrelid = ANY(%s) AND NOT tgisinternal AND tgenabled IN ('O', 'A') "
            "AND (tgtype & %s) <> 0 AND (tgtype & %s) <> 0 ORDER BY tgname",
            (_BEFORE, oids, _ROW, _UPDATE)).fetchall():
        triggers[oid][0 if before else 1].append(name)
    owners: dict[int, Any] = dict(conn.execute(
        "SELECT c.oid, pg_has_role(c.relowner, 'USAGE') OR (SELECT pg_has_role(datdba, "
        "'USAGE') FROM pg_database WHERE datname = current_database()) FROM pg_class c "
        "WHERE c.oid = ANY(%s)", (oids,)).fetchall())
    return tuple(Heap(oid, schema, name, tuple(triggers[oid][0]), tuple(triggers[oid][1]),
                      bool(owners.get(oid))) for oid, schema, name in members)
