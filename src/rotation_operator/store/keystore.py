"""The operator's own tables: keys, rotation records, coverage, and counts over targets.

Tables of one keys table ``K`` (all created and migrated here, idempotently):

* ``K``: one row per DEK (version, wrapped DEK, KEK fingerprint, state).  A partial unique
  index allows one ``active`` key.
* ``K_rotations``: one row per rotation or sweep: what asked for it (a policy version, a
  manual CLI call, a sweep), its phase, its **fence** token and its progress.  Served
  policy versions are read from here, which makes a bump idempotent; a partial unique
  index allows one ``running`` rotation.
* ``K_meta``: the schema version, and which targets this keys table covers and for whom
  (a second application's policy naming other targets is refused before any write).
* ``K_audit``: the hash chain (:mod:`.audit`).

Every name from a spec goes through ``psycopg.sql.Identifier`` (and was validated by
:mod:`.config`); every value is a query parameter.  Functions run in the caller's
transaction unless they say otherwise, so the engine decides what commits together.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from psycopg import sql
from psycopg.types.json import Jsonb

from rotation_operator.crypto import codec
from rotation_operator.crypto import kek as kek_mod
from rotation_operator.crypto.kek import Kek
from rotation_operator.crypto.keyring import KeyRing, legacy_cipher
from rotation_operator.errors import (
    ForeignKeyIds,
    InvalidToken,
    KekMismatchError,
    KeysTableShared,
    KeyStateError,
    LegacyNeedsRawKek,
    RotationOperatorError,
    Superseded,
)
from rotation_operator.policy.config import StoreConfig
from rotation_operator.policy.decisions import zero_rows_clock
from rotation_operator.store import audit
from rotation_operator.store.catalog import REGCLASS, Heap, Layout, regclass_arg
from rotation_operator.store.database import Conn

#: Version of the operator's own tables; :meth:`KeyStore.migrate` brings older ones here.
SCHEMA_VERSION = 3
#: Key states in which a DEK can still be unwrapped into a ring.
READABLE = ("active", "retiring", "retired")
#: Rows sampled per target to prove the KEK before key v1 binds the keys table to it.
LEGACY_SAMPLE = 20


def lock_id(name: str, purpose: str) -> int:
    """A stable 64-bit advisory-lock key for the keys table ``name`` (schema-qualified as
    PostgreSQL resolves it) and purpose."""
    digest = hashlib.sha256(f"rotation-operator:{purpose}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@dataclass(frozen=True)
class KeyRecord:
    version: int
    wrapped_dek: bytes = field(repr=False)
    kek_fingerprint: str
    state: str  # active | retiring | retired | disabled | destroyed
    rotated_by: str
    policy_version: int | None
    created_at: datetime
    retired_at: datetime | None
    zero_rows_since: datetime | None = None
    disabled_at: datetime | None = None
    destroy_after: datetime | None = None
    destroyed_at: datetime | None = None
    encryptions: int = 0
    #: The targets' rows inserted and updated (statistics) when the key was minted.
    writes_at_mint: int | None = None


@dataclass(frozen=True)
class RotationRecord:
    id: int
    kind: str  # policy | manual | sweep
    requested_version: int | None  # the policy version served (policy kind only)
    phase: str  # baseline | running | done | superseded
    mode: str | None
    from_version: int | None
    to_version: int
    requested_by: str
    started_at: datetime
    announced_at: datetime | None
    finished_at: datetime | None
    re_encrypted: int
    total: int
    fence: int
    report: Mapping[str, Any]


@dataclass(frozen=True)
class Coverage:
    """Which targets a keys table covers, and which policy (or the CLI) recorded them."""

    owner: str | None
    targets: tuple[Mapping[str, str], ...]


_RECORD_COLUMNS = ("id, kind, requested_version, phase, mode, from_version, to_version, "
                   "requested_by, started_at, announced_at, finished_at, re_encrypted, total, "
                   "fence, report")


class KeyStore:
    """The tables of one keys table: keys, rotations, meta, audit."""

    def __init__(self, cfg: StoreConfig):
        self.cfg = cfg
        schema, base = cfg.schema, cfg.keys_table
        self.keys = _ident(schema, base)
        self.rotations = _ident(schema, cfg.rotations_table)
        self.meta = _ident(schema, f"{base}_meta")

    # -- naming and locks ----------------------------------------------------------------
    def resolved_name(self, conn: Conn) -> str:
        """``schema.table`` of the keys table as PostgreSQL resolves it (also before it
        exists: the first schema of the search_path that it would be created in)."""
        if self.cfg.schema:
            return self.cfg.qualified_keys
        row = conn.execute(
            "SELECT coalesce((SELECT n.nspname FROM pg_class c JOIN pg_namespace n "
            "ON n.oid = c.relnamespace WHERE c.oid = to_regclass(quote_ident(%s))), "
            "current_schema())", (self.cfg.keys_table,)).fetchone()
        schema = row[0] if row else None
        return f"{schema}.{self.cfg.keys_table}" if schema else self.cfg.keys_table

    def lock_key(self, conn: Conn, purpose: str) -> int:
        """The advisory-lock key of this keys table: ``encryption_keys`` found through the
        search_path and ``public.encryption_keys`` are one table, hence one lock."""
        return lock_id(self.resolved_name(conn), purpose)

    # -- schema --------------------------------------------------------------------------
    def exists(self, conn: Conn) -> bool:
        row = conn.execute(f"SELECT {REGCLASS} IS NOT NULL",
                           regclass_arg(self.cfg.schema, self.cfg.keys_table)).fetchone()
        return bool(row and row[0])

    def schema_version(self, conn: Conn) -> int | None:
        """0 for tables from before versioning, None when there are none at all."""
        if not self.exists(conn):
            return None
        meta = conn.execute(f"SELECT {REGCLASS} IS NOT NULL",
                            regclass_arg(self.cfg.schema, f"{self.cfg.keys_table}_meta")
                            ).fetchone()
        if not meta or not meta[0]:
            return 1
        row = conn.execute(sql.SQL("SELECT schema_version FROM {}").format(self.meta)
                           ).fetchone()
        return int(row[0]) if row else 1

    def migrate(self, conn: Conn) -> None:
        """Create or upgrade the operator's own tables; idempotent, safe concurrently.

        Fresh tables are created in their first shape and then migrated like old ones, so
        there is one path for both.  Nothing is created or locked when the schema is
        current (a reconcile then needs no CREATE privilege at all).
        """
        if self.schema_version(conn) == SCHEMA_VERSION:
            return
        # A session lock taken *before* the transaction: the transaction then starts after
        # a concurrent migrator committed, so its catalog lookups see that migrator's tables
        # (an advisory lock taken inside a transaction does not refresh the catalog cache,
        # and CREATE TABLE would then collide with a table it did not see).
        key = self.lock_key(conn, "migrate")
        conn.execute("SELECT pg_advisory_lock(%s)", (key,))
        try:
            with conn.transaction():
                version = self.schema_version(conn)
                if version is None:
                    self._create_v1(conn)
                    version = 1
                if version < 2:
                    self._migrate_v2(conn)
                if version < 3:
                    self._migrate_v3(conn)
                if version < SCHEMA_VERSION:
                    conn.execute(sql.SQL("UPDATE {} SET schema_version = %s, updated_at = now()"
                                         ).format(self.meta), (SCHEMA_VERSION,))
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (key,))

    def _create_v1(self, conn: Conn) -> None:
        # CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when the schema
        # exists; a least-privilege role is usually given a schema, not that.
        if self.cfg.schema and conn.execute("SELECT to_regnamespace(quote_ident(%s)) IS NULL",
                                            (self.cfg.schema,)).fetchone() == (True,):
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(self.cfg.schema)))
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
            )""").format(keys=self.keys))
        conn.execute(sql.SQL("CREATE UNIQUE INDEX {idx} ON {keys} (active) WHERE active").format(
            idx=sql.Identifier(f"{self.cfg.keys_table}_one_active"), keys=self.keys))
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
            )""").format(rot=self.rotations))
        conn.execute(audit.create_sql(self.cfg))

    def _migrate_v2(self, conn: Conn) -> None:
        """Rotation records keyed by an id (manual rotations and sweeps serve no policy
        version), fences, at most one running rotation; the meta table."""
        base = self.cfg.keys_table
        conn.execute(sql.SQL(
            """CREATE TABLE IF NOT EXISTS {meta} (
                singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
                schema_version integer NOT NULL,
                owner text,
                targets jsonb,
                updated_at timestamptz NOT NULL DEFAULT now()
            )""").format(meta=self.meta))
        conn.execute(sql.SQL("INSERT INTO {} (schema_version) VALUES (1) ON CONFLICT DO NOTHING"
                             ).format(self.meta))
        pkey = conn.execute(
            "SELECT conname FROM pg_constraint WHERE contype = 'p' AND conrelid = "
            f"{REGCLASS}", regclass_arg(self.cfg.schema, self.cfg.rotations_table)).fetchone()
        rot = self.rotations
        conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN id bigint GENERATED BY DEFAULT AS "
                             "IDENTITY").format(rot))
        if pkey:
            conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                rot, sql.Identifier(pkey[0])))
        for statement in (
                "ALTER TABLE {} ADD PRIMARY KEY (id)",
                "ALTER TABLE {} ALTER COLUMN requested_version DROP NOT NULL",
                "ALTER TABLE {} ADD COLUMN kind text NOT NULL DEFAULT 'policy' "
                "CHECK (kind IN ('policy', 'manual', 'sweep'))",
                "ALTER TABLE {} ADD COLUMN fence bigint NOT NULL DEFAULT 0",
                "ALTER TABLE {} ADD COLUMN announced_at timestamptz",
                "ALTER TABLE {} ADD COLUMN report jsonb NOT NULL DEFAULT '{{}}'::jsonb"):
            conn.execute(sql.SQL(statement).format(rot))
        conn.execute(sql.SQL("CREATE UNIQUE INDEX {} ON {} ((true)) WHERE phase = 'running'"
                             ).format(sql.Identifier(f"{base}_rot_running"), rot))
        conn.execute(sql.SQL(
            "CREATE UNIQUE INDEX {} ON {} (requested_version) WHERE requested_version IS NOT "
            "NULL AND phase <> 'superseded'").format(sql.Identifier(f"{base}_rot_policy"), rot))

    def _migrate_v3(self, conn: Conn) -> None:
        """The end of a key's life (disabled, destroyed), its census and usage, and
        scheduled rotations."""
        base = self.cfg.keys_table
        self._replace_check(conn, base, "state", f"{base}_state",
                            "state IN ('active', 'retiring', 'retired', 'disabled', 'destroyed')")
        self._replace_check(conn, self.cfg.rotations_table, "kind", f"{base}_rot_kind",
                            "kind IN ('policy', 'manual', 'sweep', 'scheduled')")
        conn.execute(sql.SQL(
            "ALTER TABLE {} ADD COLUMN zero_rows_since timestamptz, "
            "ADD COLUMN disabled_at timestamptz, ADD COLUMN destroy_after timestamptz, "
            "ADD COLUMN destroyed_at timestamptz, "
            "ADD COLUMN encryptions bigint NOT NULL DEFAULT 0, "
            "ADD COLUMN writes_at_mint bigint").format(self.keys))

    def _replace_check(self, conn: Conn, table: str, column: str, name: str, rule: str) -> None:
        rows = conn.execute(
            f"SELECT conname FROM pg_constraint WHERE conrelid = {REGCLASS} AND contype = 'c' "
            "AND pg_get_constraintdef(oid) LIKE %s",
            (*regclass_arg(self.cfg.schema, table), f"%({column}%")).fetchall()
        ident = _ident(self.cfg.schema, table)
        for (conname,) in rows:
            conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                ident, sql.Identifier(conname)))
        conn.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK (" + rule + ")").format(
            ident, sql.Identifier(name)))

    # -- coverage: which targets this keys table serves ----------------------------------
    def coverage(self, conn: Conn) -> Coverage | None:
        """The recorded coverage, or None before any is recorded (or before v2 tables)."""
        if (self.schema_version(conn) or 0) < 2:
            return None
        row = conn.execute(sql.SQL("SELECT owner, targets FROM {}").format(self.meta)
                           ).fetchone()
        if row is None or row[1] is None:
            return None
        return Coverage(row[0], tuple(row[1]))

    def check_coverage(self, conn: Conn, layouts: Sequence[Layout], owner: str | None
                       ) -> Coverage | None:
        """Refuse targets that disagree with the recorded ones (read-only).

        The recorded owner (a policy's ``namespace/name``) may change its own targets;
        anyone else must name exactly the recorded ones.  Returns the coverage to record
        (None when nothing changes).
        """
        mine = tuple(sorted((layout.record() for layout in layouts), key=_target_key))
        recorded = self.coverage(conn)
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
            f"keys table {self.cfg.qualified_keys} covers {theirs} for {who}; this request "
            f"names {ours}: give each application its own keysTable, or name the same "
            "targets")

    def record_coverage(self, conn: Conn, layouts: Sequence[Layout], owner: str | None,
                        actor: str) -> None:
        """Check the coverage again and record it, atomically: the meta row is locked, so
        of two policies that raced past the read-only check only one records its targets
        and the other is refused here."""
        with conn.transaction():
            conn.execute(sql.SQL("SELECT 1 FROM {} FOR UPDATE").format(self.meta))
            coverage = self.check_coverage(conn, layouts, owner)
            if coverage is not None:
                self._record_coverage(conn, coverage, actor)

    def _record_coverage(self, conn: Conn, coverage: Coverage, actor: str) -> None:
        conn.execute(sql.SQL("UPDATE {} SET owner = %s, targets = %s, updated_at = now()"
                             ).format(self.meta),
                     (coverage.owner, Jsonb(list(coverage.targets))))
        audit.append(conn, self.cfg, "coverage_recorded", actor=actor, detail={
            "owner": coverage.owner,
            "targets": [f"{t['schema']}.{t['table']}" for t in coverage.targets]})

    # -- keys ----------------------------------------------------------------------------
    def list_keys(self, conn: Conn) -> list[KeyRecord]:
        rows = conn.execute(sql.SQL(
            "SELECT version, wrapped_dek, kek_fingerprint, state, rotated_by, policy_version, "
            "created_at, retired_at, zero_rows_since, disabled_at, destroy_after, destroyed_at, "
            "encryptions, writes_at_mint FROM {keys} ORDER BY version").format(keys=self.keys)
        ).fetchall()
        return [KeyRecord(r[0], bytes(r[1]), *r[2:]) for r in rows]

    def insert_key(self, conn: Conn, kek: Kek, *, version: int, actor: str,
                   policy_version: int | None, writes: int | None = None) -> None:
        """Mint a DEK, wrap it, store it as the active key (caller retires the old one);
        ``writes``: the targets' write statistics now, the base of its usage estimate."""
        wrapped = kek.wrap(codec.new_key(), version)
        conn.execute(sql.SQL(
            "INSERT INTO {keys} (version, wrapped_dek, kek_fingerprint, state, rotated_by, "
            "policy_version, writes_at_mint) VALUES (%s, %s, %s, 'active', %s, %s, %s)").format(
                keys=self.keys),
            (version, wrapped, kek.fingerprint, actor, policy_version, writes))
        audit.append(conn, self.cfg, "key_created", key_version=version, actor=actor,
                     detail={"policy_version": policy_version})

    def mark_active_retiring(self, conn: Conn) -> list[int]:
        """The active key becomes retiring.  ``FOR UPDATE`` first: batches hold the key row
        ``FOR KEY SHARE``, which a plain UPDATE would not wait for."""
        conn.execute(sql.SQL("SELECT version FROM {keys} WHERE state = 'active' FOR UPDATE"
                             ).format(keys=self.keys))
        rows = conn.execute(sql.SQL(
            "UPDATE {keys} SET state = 'retiring' WHERE state = 'active' RETURNING version"
        ).format(keys=self.keys)).fetchall()
        return [r[0] for r in rows]

    def retire_retiring(self, conn: Conn, actor: str) -> list[int]:
        rows = conn.execute(sql.SQL(
            "UPDATE {keys} SET state = 'retired', retired_at = now() WHERE state = 'retiring' "
            "RETURNING version").format(keys=self.keys)).fetchall()
        versions = sorted(r[0] for r in rows)
        for v in versions:
            audit.append(conn, self.cfg, "key_retired", key_version=v, actor=actor)
        return versions

    def ensure_active_key(self, conn: Conn, kek: Kek, actor: str,
                          policy_version: int | None, layouts: Sequence[Layout]) -> bool:
        """Create key v1 when the table has no key at all; True if it did.

        Serialised by a transaction-scoped advisory lock, so two initialisers make one key.
        """
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (self.lock_key(conn, "init"),))
            row = conn.execute(sql.SQL("SELECT count(*), count(*) FILTER (WHERE active) "
                                       "FROM {keys}").format(keys=self.keys)).fetchone()
            total, active = row if row else (0, 0)
            if total == 0:
                check_no_key_ids(conn, layouts, self.cfg.qualified_keys)
                check_legacy_kek(conn, kek, layouts)
                self.insert_key(conn, kek, version=1, actor=actor, policy_version=policy_version,
                                writes=self.writes(conn, layouts))
                return True
            if active == 0:
                raise RotationOperatorError(
                    f"keys table {self.cfg.qualified_keys} has {total} keys but none is active; "
                    "it was edited by hand: restore it from backup")
            return False

    def load_ring(self, conn: Conn, keks: Sequence[Kek], *,
                  disabled: bool = False) -> KeyRing:
        """Unwrap every stored DEK with whichever presented KEK wrapped it (the current
        one, or a previous one during a rekey); fail closed with :class:`KekMismatchError`.

        Every key is checked, not only the active one: rows (and backups) may reference any.
        Messages name only the fingerprints of the KEKs presented, never a stored one (it
        would let a guessed, low-entropy KEK be checked offline).  The ring reads legacy
        rows with the raw bytes of the KEK that wraps the keys, when they can be read.
        """
        presented = list(keks)
        every = self.list_keys(conn)
        # Disabled keys stay out of rings (unless a rekey must rewrap them); destroyed
        # ones have nothing left to unwrap.
        readable = (*READABLE, "disabled") if disabled else READABLE
        keys = [k for k in every if k.state in readable]
        unavailable = {k.version: k.state for k in every if k.state not in readable}
        active = [k.version for k in keys if k.state == "active"]
        if not active:
            raise RotationOperatorError(
                f"keys table {self.cfg.qualified_keys} has no active key")
        deks: dict[int, bytes] = {}
        # The active key first, so the error names the key that matters most.
        for k in sorted(keys, key=lambda k: (k.state != "active", -k.version)):
            kek = kek_mod.find(presented, k.kek_fingerprint)
            if kek is None:
                which = "the KEK presented" if len(presented) == 1 else "none of the KEKs presented"
                raise KekMismatchError(
                    f"{which} (fingerprint {kek_mod.fingerprints(presented)}) is not the one "
                    f"that wrapped DEK v{k.version}")
            try:
                deks[k.version] = kek.unwrap(k.wrapped_dek, k.version)
            except InvalidToken:
                raise KekMismatchError(
                    f"wrapped DEK v{k.version} does not unwrap under the KEK although the "
                    "fingerprints match: the keys table was altered") from None
        return KeyRing.of(active[0], deks, legacy_kek(keys, presented), unavailable)

    def rewrap(self, conn: Conn, ring: KeyRing, current: Kek, actor: str) -> list[int]:
        """Wrap every DEK not yet under ``current`` with it, in the caller's transaction;
        each new wrap is unwrapped and compared before it is written.  Returns the
        versions rewrapped (none when all are under ``current`` already: idempotent)."""
        done = []
        for k in self.list_keys(conn):
            if k.kek_fingerprint == current.fingerprint or k.state == "destroyed":
                continue
            dek = ring.deks[k.version]
            wrapped = current.wrap(dek, k.version)
            if current.unwrap(wrapped, k.version) != dek:
                raise KekMismatchError(f"the new KEK did not give back DEK v{k.version} "
                                       "after wrapping it; nothing was written")
            conn.execute(sql.SQL(
                "UPDATE {keys} SET wrapped_dek = %s, kek_fingerprint = %s "
                "WHERE version = %s AND kek_fingerprint = %s").format(keys=self.keys),
                (wrapped, current.fingerprint, k.version, k.kek_fingerprint))
            audit.append(conn, self.cfg, "key_rewrapped", key_version=k.version, actor=actor,
                         detail={"kek_fingerprint": current.fingerprint})
            done.append(k.version)
        return done

    # -- the end of a key's life --------------------------------------------------------
    def census(self, conn: Conn, rows: Mapping[int | None, int], now: datetime,
               writes: int | None = None, *, exact: bool = True) -> bool:
        """Record, from a fresh count of rows per key, since when each retired or disabled
        key has had no row, and raise the active key's usage estimate: at least its rows,
        and at least the rows the targets' statistics say were inserted or updated since it
        was minted (every such write encrypted a value under it; the library's writes are
        not counted one by one).  Estimated counts (``exact=False``) may stop a key's
        zero-rows clock but never start it.  True if anything changed."""
        changed = False
        for k in self.list_keys(conn):
            n = rows.get(k.version, 0)
            since = zero_rows_clock(k.state, k.zero_rows_since, n, now, exact)
            used, base = n, k.writes_at_mint
            if k.state == "active" and writes is not None:
                if base is None or writes < base:
                    # never based (a key minted before usage was counted), or the statistics
                    # were reset (a failover, pg_stat_reset): count on from what is known
                    base = writes - k.encryptions
                used = max(used, writes - base)
            if since != k.zero_rows_since or used > k.encryptions or base != k.writes_at_mint:
                conn.execute(sql.SQL(
                    "UPDATE {keys} SET zero_rows_since = %s, encryptions = greatest(encryptions, "
                    "%s), writes_at_mint = %s WHERE version = %s").format(keys=self.keys),
                    (since, used, base, k.version))
                changed = True
        return changed

    def add_encryptions(self, conn: Conn, version: int, n: int) -> None:
        conn.execute(sql.SQL("UPDATE {keys} SET encryptions = encryptions + %s "
                             "WHERE version = %s").format(keys=self.keys), (n, version))

    def writes(self, conn: Conn, layouts: Sequence[Layout]) -> int:
        """Rows inserted and updated in every heap of the targets, from the statistics."""
        oids = [h.oid for layout in layouts for h in layout.heaps]
        row = conn.execute("SELECT coalesce(sum(n_tup_ins + n_tup_upd), 0) FROM "
                           "pg_stat_all_tables WHERE relid = ANY(%s)", (oids,)).fetchone()
        return int(row[0]) if row else 0

    def referenced(self, conn: Conn, layouts: Sequence[Layout], version: int
                   ) -> tuple[str, object] | None:
        """(target, an id) of a row under key ``version`` in any target, or None."""
        found = self.referenced_any(conn, layouts, [version])
        return None if found is None else found[:2]

    def referenced_any(self, conn: Conn, layouts: Sequence[Layout], versions: Sequence[int]
                       ) -> tuple[str, object, int] | None:
        """(target, an id, the version) of a row under any of ``versions``, or None: one
        scan of each target at most."""
        for layout in layouts:
            t = layout.target
            row = conn.execute(sql.SQL(
                "SELECT {id}, {kid} FROM {tab} WHERE {kid} = ANY(%s) LIMIT 1").format(
                    id=sql.Identifier(t.id_column), tab=layout.ident,
                    kid=sql.Identifier(t.key_id_column)), (list(versions),)).fetchone()
            if row is not None:
                return layout.display, row[0], int(row[1])
        return None

    def key_for_update(self, conn: Conn, version: int) -> KeyRecord:
        conn.execute(sql.SQL("SELECT 1 FROM {keys} WHERE version = %s FOR UPDATE").format(
            keys=self.keys), (version,))
        key = next((k for k in self.list_keys(conn) if k.version == version), None)
        if key is None:
            raise KeyStateError(f"there is no DEK v{version} in {self.cfg.qualified_keys}")
        return key

    def disable(self, conn: Conn, version: int, now: datetime, destroy_after: datetime | None,
                actor: str) -> None:
        conn.execute(sql.SQL(
            "UPDATE {keys} SET state = 'disabled', disabled_at = %s, destroy_after = %s "
            "WHERE version = %s").format(keys=self.keys), (now, destroy_after, version))
        audit.append(conn, self.cfg, "key_disabled", key_version=version, actor=actor,
                     detail={"destroy_after": destroy_after.isoformat()
                             if destroy_after else None})

    def enable(self, conn: Conn, version: int, actor: str) -> None:
        conn.execute(sql.SQL(
            "UPDATE {keys} SET state = 'retired', disabled_at = NULL, destroy_after = NULL, "
            "zero_rows_since = NULL WHERE version = %s").format(keys=self.keys), (version,))
        audit.append(conn, self.cfg, "key_enabled", key_version=version, actor=actor)

    def destroy(self, conn: Conn, version: int, now: datetime, actor: str) -> None:
        """Erase the wrapped DEK (the row and its version stay, so data names the key it
        needed); the audit chain records it."""
        conn.execute(sql.SQL(
            "UPDATE {keys} SET state = 'destroyed', wrapped_dek = ''::bytea, destroyed_at = %s "
            "WHERE version = %s").format(keys=self.keys), (now, version))
        audit.append(conn, self.cfg, "key_destroyed", key_version=version, actor=actor)

    # -- rotation records ----------------------------------------------------------------
    def rotation_records(self, conn: Conn) -> list[RotationRecord]:
        rows = conn.execute(sql.SQL(f"SELECT {_RECORD_COLUMNS} FROM {{rot}} ORDER BY id"
                                    ).format(rot=self.rotations)).fetchall()
        return [RotationRecord(*r) for r in rows]

    def record(self, conn: Conn, record_id: int) -> RotationRecord:
        row = conn.execute(sql.SQL(f"SELECT {_RECORD_COLUMNS} FROM {{rot}} WHERE id = %s"
                                   ).format(rot=self.rotations), (record_id,)).fetchone()
        if row is None:
            raise Superseded(f"rotation record {record_id} is gone")
        return RotationRecord(*row)

    def record_baseline(self, conn: Conn, policy_version: int, active_version: int,
                        actor: str) -> bool:
        """Record a fresh policy's version without rotating, if no policy version is
        recorded yet (manual rotations and sweeps do not count)."""
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (self.lock_key(conn, "init"),))
            row = conn.execute(sql.SQL(
                "SELECT count(*) FROM {rot} WHERE requested_version IS NOT NULL").format(
                    rot=self.rotations)).fetchone()
            if row and row[0]:
                return False
            conn.execute(sql.SQL(
                "INSERT INTO {rot} (kind, requested_version, phase, to_version, requested_by, "
                "finished_at) VALUES ('policy', %s, 'baseline', %s, %s, now())").format(
                    rot=self.rotations), (policy_version, active_version, actor))
            audit.append(conn, self.cfg, "baseline_recorded", key_version=active_version,
                         actor=actor, detail={"policy_version": policy_version})
            return True

    def claim_new(self, conn: Conn, *, kind: str, requested: int | None, mode: str,
                  from_version: int | None, to_version: int, actor: str, total: int
                  ) -> tuple[int, int]:
        """Record a new running rotation (superseding any other); returns (id, fence).

        Fences only grow, across records, so a rotator that read an older one can never
        mistake a newer claim for its own.  The running record is locked ``FOR UPDATE``
        first, which waits for the batches in flight (they hold it ``FOR KEY SHARE``).
        """
        conn.execute(sql.SQL("SELECT id FROM {rot} WHERE phase = 'running' FOR UPDATE").format(
            rot=self.rotations))
        conn.execute(sql.SQL(
            "UPDATE {rot} SET phase = 'superseded', finished_at = now(), fence = fence + 1 "
            "WHERE phase = 'running'").format(rot=self.rotations))
        row = conn.execute(sql.SQL(
            "INSERT INTO {rot} (kind, requested_version, phase, mode, from_version, to_version, "
            "requested_by, total, fence) SELECT %s, %s, 'running', %s, %s, %s, %s, %s, "
            "coalesce(max(fence), 0) + 1 FROM {rot} RETURNING id, fence").format(
                rot=self.rotations),
            (kind, requested, mode, from_version, to_version, actor, total)).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    def claim_resume(self, conn: Conn, record_id: int, mode: str) -> int:
        """Take over a running rotation: its fence moves on, so whoever ran it before
        stops at its next batch.  Waits for that rotator's batch in flight (it holds the
        record ``FOR KEY SHARE``; only ``FOR UPDATE`` waits for that)."""
        conn.execute(sql.SQL("SELECT id FROM {rot} WHERE id = %s FOR UPDATE").format(
            rot=self.rotations), (record_id,))
        row = conn.execute(sql.SQL(
            "UPDATE {rot} SET fence = (SELECT max(fence) FROM {rot}) + 1, mode = %s "
            "WHERE id = %s AND phase = 'running' RETURNING fence").format(rot=self.rotations),
            (mode, record_id)).fetchone()
        if row is None:
            raise Superseded(f"rotation record {record_id} is no longer running")
        return int(row[0])

    def adopt(self, conn: Conn, record_id: int, fence: int, policy_version: int,
              actor: str) -> None:
        """A running scheduled or manual rotation now serves ``policy_version``."""
        conn.execute(sql.SQL(
            "UPDATE {rot} SET kind = 'policy', requested_version = %s "
            "WHERE id = %s AND fence = %s AND phase = 'running'").format(rot=self.rotations),
            (policy_version, record_id, fence))
        conn.execute(sql.SQL("UPDATE {keys} SET policy_version = %s WHERE version = "
                             "(SELECT to_version FROM {rot} WHERE id = %s)").format(
            keys=self.keys, rot=self.rotations), (policy_version, record_id))
        audit.append(conn, self.cfg, "rotation_adopted", actor=actor, detail={
            "policy_version": policy_version, "record": record_id})

    def announce(self, conn: Conn, record_id: int, fence: int) -> datetime:
        """Stamp when the rotation's key is known committed (the handover's clock)."""
        row = conn.execute(sql.SQL(
            "UPDATE {rot} SET announced_at = coalesce(announced_at, clock_timestamp()) "
            "WHERE id = %s AND fence = %s RETURNING announced_at").format(rot=self.rotations),
            (record_id, fence)).fetchone()
        if row is None:
            raise Superseded(f"rotation {record_id} was taken over by another rotator")
        announced: datetime = row[0]
        return announced

    def check_fence(self, conn: Conn, record_id: int, fence: int, key_version: int, *,
                    exclusive: bool = False) -> None:
        """Prove, inside the caller's transaction, that this rotation is still the running
        one and its key still the active one; lock both rows until it commits, so a takeover
        or a new key waits for this transaction instead of racing it.

        ``FOR KEY SHARE``: batches of several workers hold it at once and still increment
        the record's progress (a non-key UPDATE does not conflict with it); takeovers and
        new keys lock ``FOR UPDATE``, which does.
        """
        mode = sql.SQL("UPDATE" if exclusive else "KEY SHARE")
        row = conn.execute(sql.SQL("SELECT phase, fence FROM {rot} WHERE id = %s FOR {mode}"
                                   ).format(rot=self.rotations, mode=mode),
                           (record_id,)).fetchone()
        if row is None or row[0] != "running" or row[1] != fence:
            why = "it was superseded" if row is not None and row[0] != "running" else \
                "another rotator took it over"
            raise Superseded(f"rotation {record_id} stopped: {why}")
        key = conn.execute(sql.SQL("SELECT state FROM {keys} WHERE version = %s FOR {mode}"
                                   ).format(keys=self.keys, mode=mode), (key_version,)
                           ).fetchone()
        if key is None or key[0] != "active":
            raise Superseded(f"rotation {record_id} stopped: DEK v{key_version} is no "
                             "longer the active key")

    def add_progress(self, conn: Conn, record_id: int, moved: int, more_total: int = 0
                     ) -> None:
        """Count rows a batch moved, in the batch's own transaction (exact across crashes
        and workers); ``more_total``: rows found left by a later pass."""
        conn.execute(sql.SQL(
            "UPDATE {rot} SET re_encrypted = re_encrypted + %s, total = total + %s "
            "WHERE id = %s").format(rot=self.rotations), (moved, more_total, record_id))

    def finish_record(self, conn: Conn, record_id: int, report: Mapping[str, Any]) -> None:
        conn.execute(sql.SQL(
            "UPDATE {rot} SET phase = 'done', finished_at = now(), "
            "total = greatest(total, re_encrypted), report = report || %s WHERE id = %s"
        ).format(rot=self.rotations), (Jsonb(dict(report)), record_id))

    def add_report(self, conn: Conn, record_id: int, report: Mapping[str, Any]) -> None:
        conn.execute(sql.SQL("UPDATE {rot} SET report = report || %s WHERE id = %s").format(
            rot=self.rotations), (Jsonb(dict(report)), record_id))

    # -- counts over targets -------------------------------------------------------------
    def key_counts(self, conn: Conn, layout: Layout) -> dict[int | None, int]:
        """Rows per key id in one target, through its parent (``None`` = legacy)."""
        kid = sql.Identifier(layout.target.key_id_column)
        q = sql.SQL("SELECT {kid}, count(*) FROM {t} GROUP BY {kid}").format(
            kid=kid, t=layout.ident)
        return {r[0]: r[1] for r in conn.execute(q).fetchall()}

    def key_estimates(self, conn: Conn, layout: Layout, active: int | None,
                      exact_below: int) -> tuple[dict[int | None, int], bool]:
        """Rows per key id in one target without scanning it: per heap, the live rows the
        statistics count (``n_live_tup``, kept by every commit) spread over key ids as the
        planner's statistics say (``pg_stats``: the NULL fraction and the most common
        values, which hold every key id the last ANALYZE sampled; the rest of the mass
        goes to the active key).  A heap smaller than ``exact_below`` rows, or one never
        analysed, is counted exactly.  Statistics older than the last rotation or sweep
        (the operator's role may not ANALYZE a table it does not own, and autovacuum
        comes when it likes) describe rows that have moved since: every live row of
        such a heap is taken to be under the active key, where that rotation left it
        (the exact counts, hourly and after each rotation, catch any that is not).
        Returns (counts, all counted exactly)."""
        kid = sql.Identifier(layout.target.key_id_column)
        totals: dict[int | None, float] = {}
        exact = True
        last = conn.execute(sql.SQL("SELECT max(finished_at) FROM {rot} WHERE phase = 'done'")
                            .format(rot=self.rotations)).fetchone()
        moved_at = last[0] if last else None
        for heap in layout.heaps:
            row = conn.execute(
                "SELECT coalesce(s.n_live_tup, greatest(c.reltuples, 0))::float8, "
                "p.null_frac::float8, p.most_common_vals::text, p.most_common_freqs::float8[], "
                "coalesce(greatest(s.last_analyze, s.last_autoanalyze) < %s, false) "
                "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "LEFT JOIN pg_stat_all_tables s ON s.relid = c.oid "
                "LEFT JOIN pg_stats p ON p.schemaname = n.nspname AND p.tablename = c.relname "
                "AND p.attname = %s AND NOT p.inherited WHERE c.oid = %s",
                (moved_at, layout.target.key_id_column, heap.oid)).fetchone()
            live, null_frac, mcv, freqs, outdated = row if row else (
                0.0, None, None, None, False)
            if outdated and null_frac is not None and live > exact_below:
                exact = False
                totals[active] = totals.get(active, 0.0) + live
                continue
            try:
                values = [int(v) for v in str(mcv).strip("{}").split(",") if v] if mcv else []
            except ValueError:  # not an integer column after all: count it
                values, null_frac = [], None
            if live <= exact_below or null_frac is None:  # small, or never analysed
                counted = conn.execute(sql.SQL(
                    "SELECT {kid}, count(*) FROM ONLY {h} GROUP BY {kid}").format(
                        kid=kid, h=heap.ident)).fetchall()
                for k, n in counted:
                    totals[k] = totals.get(k, 0) + n
                continue
            exact = False
            shares: dict[int | None, float] = {None: float(null_frac)}
            for v, f in zip(values, freqs or [], strict=False):
                shares[v] = shares.get(v, 0.0) + float(f)
            rest = max(0.0, 1.0 - sum(shares.values()))
            if rest:
                shares[active] = shares.get(active, 0.0) + rest
            for k, share in shares.items():
                totals[k] = totals.get(k, 0.0) + share * live
        return {k: round(n) for k, n in totals.items() if round(n) > 0}, exact

    def count_stale(self, conn: Conn, layouts: Iterable[Layout], active: int, *,
                    legacy: bool = True) -> int:
        """Rows of all targets not under ``active`` (``legacy=False``: under a non-active
        DEK only)."""
        total = 0
        for layout in layouts:
            row = conn.execute(sql.SQL("SELECT count(*) FROM {t} WHERE {cond}").format(
                t=layout.ident, cond=stale_condition(layout, legacy)), {"active": active}
            ).fetchone()
            total += int(row[0]) if row else 0
        return total

    def example_stale(self, conn: Conn, layout: Layout, heap: Heap, active: int,
                      legacy: bool) -> object:
        """The id of one row of ``heap`` not under ``active``, to name it in an error."""
        row = conn.execute(sql.SQL("SELECT {id} FROM ONLY {h} WHERE {cond} LIMIT 1").format(
            id=sql.Identifier(layout.target.id_column), h=heap.ident,
            cond=stale_condition(layout, legacy)), {"active": active}).fetchone()
        return row[0] if row else None


def stale_condition(layout: Layout, legacy: bool) -> sql.Composed:
    """``key_id`` not the active key (``%(active)s``); legacy rows included if asked."""
    kid = sql.Identifier(layout.target.key_id_column)
    if legacy:
        return sql.SQL("({kid} IS NULL OR {kid} <> %(active)s)").format(kid=kid)
    return sql.SQL("{kid} <> %(active)s").format(kid=kid)


def legacy_kek(keys: Sequence[KeyRecord], presented: Sequence[Kek]) -> Kek | None:
    """The KEK legacy rows are under: the one that wraps the keys (legacy rows are moved
    onto a DEK before a rekey changes that), if its bytes can be read."""
    wrapping = {k.kek_fingerprint for k in keys}
    for kek in presented:
        if kek.fingerprint in wrapping and kek.extractable:
            return kek
    return None


def check_no_key_ids(conn: Conn, layouts: Sequence[Layout], keys_table: str) -> None:
    """Refuse to start a keys table over rows that already carry key ids: they were written
    under another keys table (a changed keysTable, another application's), and a new v1
    here would make their ids mean other keys; a rotation would then move nothing and
    retire keys that nothing can replace."""
    for layout in layouts:
        kid = sql.Identifier(layout.target.key_id_column)
        row = conn.execute(sql.SQL(
            "SELECT {kid} FROM {t} WHERE {kid} IS NOT NULL LIMIT 1").format(
                kid=kid, t=layout.ident)).fetchone()
        if row is not None:
            raise ForeignKeyIds(
                f"{layout.display} has rows under key id {row[0]}, but keys table {keys_table} "
                "holds no key: those rows were written under another keys table (was "
                "spec.database.keysTable changed?); point the policy at that keys table, or "
                "rotate there first")


def has_legacy_rows(conn: Conn, layouts: Sequence[Layout]) -> bool:
    """Whether any target holds a legacy row (key id NULL)."""
    for layout in layouts:
        row = conn.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {t} WHERE {kid} IS NULL)").format(
            t=layout.ident, kid=sql.Identifier(layout.target.key_id_column))).fetchone()
        if row and row[0]:
            return True
    return False


def check_legacy_kek(conn: Conn, kek: Kek, layouts: Sequence[Layout],
                     sample: int = LEGACY_SAMPLE) -> None:
    """Before key v1 binds the keys table to ``kek``, prove it is the KEK the legacy rows
    were encrypted with: one sampled row that decrypts is proof (a corrupt row among the
    sample is a bad row, reported when the rotation reaches it, not a wrong KEK); none
    that decrypts fails closed.

    Without this, a wrong KEK on a database of only legacy rows would mint v1 under the
    wrong key, and the right KEK would be refused from then on.
    """
    tried: list[str] = []
    cipher = legacy_cipher(kek)
    if cipher is None:
        if has_legacy_rows(conn, layouts):
            raise_legacy_needs_raw(kek)
        return
    for layout in layouts:
        t = layout.target
        q = sql.SQL("SELECT {id}, {val} FROM {t} WHERE {kid} IS NULL LIMIT %s").format(
            id=sql.Identifier(t.id_column), val=sql.Identifier(t.value_column),
            kid=sql.Identifier(t.key_id_column), t=layout.ident)
        for row_id, value in conn.execute(q, (sample,)).fetchall():
            try:
                codec.decrypt(cipher, bytes(value))
                return
            except InvalidToken:
                tried.append(f"{t.name}:{row_id}")
    if tried:
        shown = ", ".join(tried[:5]) + (", ..." if len(tried) > 5 else "")
        raise KekMismatchError(
            f"the KEK presented (fingerprint {kek.fingerprint}) decrypts none of "
            f"the {len(tried)} legacy rows sampled (legacy row {shown}); refusing to create "
            "DEK v1 under it")


def raise_legacy_needs_raw(kek: Kek) -> None:
    raise LegacyNeedsRawKek(
        f"legacy rows (key id NULL) are encrypted with the KEK itself, and {kek.describe()} "
        "does not let its bytes out: move them onto a DEK first with the KEK in a Secret "
        "(spec.kek, or among spec.previousKeks while it rekeys), then use the HSM key")


def _ident(schema: str | None, name: str) -> sql.Identifier:
    return sql.Identifier(schema, name) if schema else sql.Identifier(name)


def _target_key(t: Mapping[str, str]) -> tuple[str, str]:
    return (t["schema"], t["table"])


def _canonical(targets: Iterable[Mapping[str, str]]) -> str:
    return json.dumps(sorted((dict(t) for t in targets), key=_target_key), sort_keys=True)
