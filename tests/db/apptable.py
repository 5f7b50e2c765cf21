"""An application's side of the database, for the engine tests.

The engine never creates target tables; an application does.  This module plays that
application: it creates ``secrets(id bigint primary key, value bytea not null, key_id int)``
(or a table with other names), fills it with rows whose plaintexts it remembers (some of
them legacy rows, ``key_id`` NULL, encrypted under the KEK directly), and afterwards reads
everything back with its own key ring to check that nothing was lost.

It also has the checks every test repeats: a dump of all tables (to prove "nothing
changed"), the keys table, the CLI as a subprocess, and :func:`assert_rotated`, which is
invariants 1, 3 and 4 of the brief in one call.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from rotation_operator.crypto import codec as crypto
from rotation_operator.crypto.keyring import KeyRing
from rotation_operator.policy.config import RotationOptions, StoreConfig, Target
from rotation_operator.rotation.engine import Engine
from rotation_operator.store import audit
from rotation_operator.store.keystore import KeyStore
from tests.fixtures.keks import keks
from tests.fixtures.roles import APP_ROLE, OPERATOR_ROLE, admin_dsn, app_dsn, grant_target

Plaintexts = dict[Any, bytes]
#: Text that marks every plaintext so leak checks can also search for the prefix.
PLAINTEXT_PREFIX = "app-secret-"


def new_kek() -> bytes:
    return os.urandom(32)


def plaintext_for(row_id: object) -> bytes:
    """A distinctive plaintext: searchable in logs, unique per row and per run."""
    return f"{PLAINTEXT_PREFIX}{row_id}-{secrets.token_hex(6)}".encode()


def tname(target: Target) -> sql.Composable:
    return sql.Identifier(target.schema, target.table) if target.schema else sql.Identifier(
        target.table)


DEFAULT_TARGET = Target("secrets")
#: Small batches so a few hundred rows make several; no grace wait unless a test needs it.
ONLINE = RotationOptions(mode="Online", batch_size=100, vacuum=False, grace=0.0)
ATOMIC = RotationOptions(mode="Atomic", batch_size=100, vacuum=False)


def create_table(dsn: str, target: Target = DEFAULT_TARGET, *,
                 key_type: str = "integer", id_type: str = "bigint") -> None:
    """The application's table (and its schema), as its own migration would create it:
    owned by the application role, with the documented grants to the operator role."""
    with psycopg.connect(app_dsn(dsn), autocommit=True) as conn:
        if target.schema:
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
                sql.Identifier(target.schema)))
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
                sql.Identifier(target.schema), sql.Identifier(OPERATOR_ROLE)))
        conn.execute(sql.SQL(
            "CREATE TABLE {t} ({id} " + id_type + " PRIMARY KEY, {val} bytea NOT NULL, "
            "{kid} " + key_type + ")").format(
                t=tname(target), id=sql.Identifier(target.id_column),
                val=sql.Identifier(target.value_column),
                kid=sql.Identifier(target.key_id_column)))
        grant_target(conn, tname(target), target.id_column, target.value_column,
                     target.key_id_column)


def keys_schema(dsn: str, schema: str) -> None:
    """A schema for the operator's own tables, as a DBA sets it up once (as the superuser:
    default privileges for another role need it): the operator may create tables in it,
    and the application may read what it creates."""
    with psycopg.connect(admin_dsn(dsn), autocommit=True) as conn:
        names = {"s": sql.Identifier(schema), "op": sql.Identifier(OPERATOR_ROLE),
                 "app": sql.Identifier(APP_ROLE)}
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {s}").format(**names))
        conn.execute(sql.SQL("GRANT USAGE, CREATE ON SCHEMA {s} TO {op}").format(**names))
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {s} TO {app}").format(**names))
        conn.execute(sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {op} IN SCHEMA {s} "
                             "GRANT SELECT ON TABLES TO {app}").format(**names))


def load_ring(dsn: str, cfg: StoreConfig, kek: bytes) -> KeyRing:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return KeyStore(cfg).load_ring(conn, keks(kek))


def fill(dsn: str, target: Target, kek: bytes, n: int, *, ring: KeyRing | None = None,
         legacy_every: int = 4, start: int = 1) -> Plaintexts:
    """Insert ``n`` rows with ids ``start..start+n-1``; every ``legacy_every``-th row (all
    rows when ``ring`` is None) is a legacy row under the KEK, the rest are under the ring's
    active key.  Returns id -> plaintext."""
    expected: Plaintexts = {}
    rows: list[tuple[int, bytes, int | None]] = []
    for row_id in range(start, start + n):
        pt = plaintext_for(row_id)
        expected[row_id] = pt
        if ring is None or (legacy_every and row_id % legacy_every == 0):
            rows.append((row_id, crypto.encrypt(kek, pt), None))
        else:
            value, key_id = ring.encrypt(pt)
            rows.append((row_id, value, key_id))
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in (
        target.id_column, target.value_column, target.key_id_column))
    with psycopg.connect(app_dsn(dsn)) as conn, conn.cursor() as cur, cur.copy(
            sql.SQL("COPY {} ({}) FROM STDIN").format(tname(target), cols)) as copy:
        for row in rows:
            copy.write_row(row)
    return expected


def read_rows(dsn: str, target: Target) -> dict[Any, tuple[bytes, int | None]]:
    """id -> (stored value, key id), exactly as stored (read as the application)."""
    q = sql.SQL("SELECT {id}, {val}, {kid} FROM {t}").format(
        id=sql.Identifier(target.id_column), val=sql.Identifier(target.value_column),
        kid=sql.Identifier(target.key_id_column), t=tname(target))
    with psycopg.connect(app_dsn(dsn)) as conn:
        return {r[0]: (bytes(r[1]), r[2]) for r in conn.execute(q).fetchall()}


def decrypt_all(dsn: str, cfg: StoreConfig, kek: bytes, target: Target) -> Plaintexts:
    """id -> plaintext, decrypting each row with whichever key it names (the library's
    view: this is what an application reads back)."""
    ring = load_ring(dsn, cfg, kek)
    return {i: ring.decrypt(v, k) for i, (v, k) in read_rows(dsn, target).items()}


def keys(dsn: str, cfg: StoreConfig) -> list[tuple[int, str, int | None]]:
    """(version, state, policy_version) of every stored key, by version."""
    with psycopg.connect(dsn) as conn:
        return [(k.version, k.state, k.policy_version)
                for k in KeyStore(cfg).list_keys(conn)]


def active_version(dsn: str, cfg: StoreConfig) -> int:
    states = keys(dsn, cfg)
    active = [v for v, s, _ in states if s == "active"]
    assert len(active) == 1, f"exactly one active key expected, found {states}"
    return active[0]


def not_under_active(dsn: str, cfg: StoreConfig) -> int:
    """Rows of all targets not under the active key (legacy included)."""
    active = active_version(dsn, cfg)
    total = 0
    with psycopg.connect(dsn) as conn:
        for t in cfg.targets:
            row = conn.execute(sql.SQL(
                "SELECT count(*) FROM {t} WHERE {kid} IS DISTINCT FROM %s").format(
                    t=tname(t), kid=sql.Identifier(t.key_id_column)), (active,)).fetchone()
            total += row[0] if row else 0
    return total


def verify_audit(dsn: str, cfg: StoreConfig) -> audit.ChainReport:
    with psycopg.connect(dsn) as conn:
        return audit.verify(conn, cfg)


def audit_events(dsn: str, cfg: StoreConfig) -> list[tuple[str, int | None, dict[str, Any]]]:
    with psycopg.connect(dsn) as conn:
        return [(r[0], r[1], r[2]) for r in conn.execute(sql.SQL(
            "SELECT event, key_version, detail FROM {} ORDER BY seq").format(
                audit.table(cfg))).fetchall()]


def assert_rotated(dsn: str, cfg: StoreConfig, kek: bytes,
                   expected: Mapping[Target, Plaintexts], *,
                   keys_for_policy: Iterable[tuple[int, int]] = ()) -> None:
    """The state a finished rotation must leave: every plaintext identical (1), exactly one
    active key and no key lost (3), zero rows under a non-active key (4), no retiring key,
    an intact audit chain, and for each ``(policy_version, n)`` exactly ``n`` keys minted
    for that policy version (5)."""
    for target, plaintexts in expected.items():
        got = decrypt_all(dsn, cfg, kek, target)
        assert got.keys() == plaintexts.keys(), f"{target.name}: rows lost or added"
        wrong = [i for i in plaintexts if got[i] != plaintexts[i]]
        assert not wrong, f"{target.name}: {len(wrong)} plaintexts changed, e.g. id {wrong[:5]}"
    states = keys(dsn, cfg)
    assert [v for v, _, _ in states] == list(range(1, len(states) + 1)), states
    assert [s for _, s, _ in states].count("active") == 1, states
    assert "retiring" not in [s for _, s, _ in states], states
    assert not_under_active(dsn, cfg) == 0
    for policy_version, n in keys_for_policy:
        assert [p for _, _, p in states].count(policy_version) == n, states
    verify_audit(dsn, cfg)


def dump(dsn: str) -> dict[str, Any]:
    """Every relation of the database and every row of every table, with each row's
    ``ctid`` and ``xmin``: equal dumps mean not one tuple was written, not even rewritten
    with the same content.  Read as the superuser: it must see every table."""
    out: dict[str, Any] = {}
    with psycopg.connect(admin_dsn(dsn)) as conn:
        rels = conn.execute(
            "SELECT n.nspname, c.relname, c.relkind FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') "
            "ORDER BY 1, 2").fetchall()
        out["relations"] = rels
        for schema, name, kind in rels:
            if kind != "r":
                continue
            out[f"{schema}.{name}"] = conn.execute(sql.SQL(
                "SELECT ctid::text, xmin::text, t::text FROM {} AS t ORDER BY ctid").format(
                    sql.Identifier(schema, name))).fetchall()
    return out


@dataclass
class App:
    """One test's database: config, KEK, engine and what each target should hold."""

    dsn: str
    cfg: StoreConfig
    kek: bytes
    expected: dict[Target, Plaintexts]

    @property
    def target(self) -> Target:
        return self.cfg.targets[0]

    def engine(self, kek: bytes | None = None, actor: str = "test") -> Engine:
        return Engine(self.dsn, self.cfg, keks(self.kek if kek is None else kek), actor=actor)

    def ring(self) -> KeyRing:
        return load_ring(self.dsn, self.cfg, self.kek)

    def assert_rotated(self, **kw: Any) -> None:
        assert_rotated(self.dsn, self.cfg, self.kek, self.expected, **kw)

    def allow_atomic(self) -> App:
        """The extra grant Atomic mode needs (its LOCK TABLE wants table-level UPDATE)."""
        for target in self.cfg.targets:
            grant_atomic(self.dsn, target)
        return self


def grant_atomic(dsn: str, target: Target) -> None:
    with psycopg.connect(app_dsn(dsn), autocommit=True) as conn:
        conn.execute(sql.SQL("GRANT UPDATE ON {} TO {}").format(
            tname(target), sql.Identifier(OPERATOR_ROLE)))


def make_app(dsn: str, n: int = 1000, *, targets: Iterable[Target] = (Target("secrets"),),
             keys_table: str = "encryption_keys", schema: str | None = None,
             legacy_every: int = 4, kek: bytes | None = None, atomic: bool = False) -> App:
    """Create the targets, initialise (key v1), fill each with ``n`` rows (a quarter legacy
    by default); ``atomic``: also the grant Atomic mode needs."""
    targets = list(targets)
    for t in targets:
        create_table(dsn, t)
    cfg = StoreConfig(targets, keys_table, schema)
    app = App(dsn, cfg, kek or new_kek(), {})
    app.engine().initialise()
    ring = app.ring()
    for t in targets:
        app.expected[t] = fill(dsn, t, app.kek, n, ring=ring, legacy_every=legacy_every)
    return app.allow_atomic() if atomic else app


class Gate:
    """A progress callback that parks the rotation the ``at``-th time it is called, until
    released (the engine calls it between transactions only)."""

    def __init__(self, at: int = 1) -> None:
        self.at = at
        self.calls = 0
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, done: int, total: int) -> None:
        self.calls += 1
        if self.calls == self.at:
            self.entered.set()
            assert self.release.wait(120), "gate never released"


def in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``fn`` in a daemon thread; its result or exception lands in the dict."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except BaseException as exc:  # reported by the test
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


# -- the CLI as a subprocess --------------------------------------------------------------
DSN_ENV, KEK_ENV = "RO_TEST_DSN", "RO_TEST_KEK"


def run_cli(*args: str, dsn: str, kek: bytes | None, fault: str | None = None,
            timeout: float = 120, kek_form: str = "hex",
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m rotation_operator.cli <args>`` with the DSN and KEK in environment
    variables named by ``--dsn-env``/``--kek-env`` (passed here only for commands that
    take them), and ``ROTATION_OPERATOR_FAULT`` set to ``fault``."""
    extra = dict(env or {})
    env = {k: v for k, v in os.environ.items() if k != "ROTATION_OPERATOR_FAULT"}
    env.update(extra)
    env[DSN_ENV] = dsn
    if kek is not None:
        env[KEK_ENV] = kek.hex() if kek_form == "hex" else (
            __import__("base64").b64encode(kek).decode())
    if fault:
        env["ROTATION_OPERATOR_FAULT"] = fault
    command, *rest = args
    if command == "keys":  # keys ACTION [options]: the options follow the action
        command, rest = f"keys {rest[0]}", rest[1:]
    argv = [sys.executable, "-m", "rotation_operator.cli", *command.split(), "--dsn-env",
            DSN_ENV]
    if command in ("init", "rotate", "verify", "sweep", "rekey"):
        argv += ["--kek-env", KEK_ENV]
    return subprocess.run([*argv, *rest], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False, stdin=subprocess.DEVNULL)
