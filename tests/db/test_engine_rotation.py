"""The engine's normal path on a real PostgreSQL: legacy migration, idempotence, several
targets, status counts, exactly one active key."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql

from rotation_operator.crypto import codec as crypto
from rotation_operator.library import Encryptor
from rotation_operator.policy.config import RotationOptions, StoreConfig, Target
from rotation_operator.rotation import inspection
from rotation_operator.rotation.engine import Engine
from tests.fixtures.fix_app import (
    ATOMIC,
    ONLINE,
    active_version,
    audit_events,
    create_table,
    decrypt_all,
    fill,
    grant_atomic,
    keys,
    keys_schema,
    load_ring,
    make_app,
    read_rows,
    verify_audit,
)
from tests.fixtures.keks import keks
from tests.fixtures.roles import admin_dsn, app_dsn


@pytest.mark.parametrize("options", [ONLINE, ATOMIC], ids=["online", "atomic"])
def test_legacy_rows_migrate_and_read_back_identical(dsn: str,
                                                     options: RotationOptions) -> None:
    app = make_app(dsn, 1000, legacy_every=3, atomic=options.mode == "Atomic")
    legacy = [i for i, (_, k) in read_rows(dsn, app.target).items() if k is None]
    assert len(legacy) == 333
    before = read_rows(dsn, app.target)

    res = app.engine().rotate(2, options)

    assert res.performed and not res.resumed and res.mode == options.mode
    assert (res.from_version, res.to_version, res.retired) == (1, 2, (1,))
    assert res.re_encrypted == 1000 and res.legacy_migrated == 333
    after = read_rows(dsn, app.target)
    assert all(after[i][1] == 2 for i in after)
    assert all(after[i][0] != before[i][0] for i in after)  # every value rewritten
    app.assert_rotated(keys_for_policy=[(2, 1)])
    assert keys(dsn, app.cfg) == [(1, "retired", None), (2, "active", 2)]
    # the old key stays (old backups must stay readable) and still unwraps
    ring = app.ring()
    assert ring.versions == (1, 2)
    value, _ = before[1]
    assert ring.decrypt(value, 1) == app.expected[app.target][1]


def test_only_legacy_rows_and_no_init(dsn: str) -> None:
    """An application that only ever had legacy rows: the first rotate creates the tables
    and key v1 itself, then moves every row onto a fresh DEK."""
    create_table(dsn)
    kek = crypto.new_key()
    expected = fill(dsn, Target("secrets"), kek, 500, ring=None)
    cfg = StoreConfig([Target("secrets")])
    res = Engine(dsn, cfg, keks(kek), actor="test").rotate(options=ONLINE)
    assert res.performed and res.kind == "manual" and res.requested_version is None
    assert res.legacy_migrated == 500 and res.to_version == 2
    assert decrypt_all(dsn, cfg, kek, Target("secrets")) == expected
    assert all(k == res.to_version for _, k in read_rows(dsn, Target("secrets")).values())


def test_rotate_twice_for_the_same_version_rotates_once(dsn: str) -> None:
    app = make_app(dsn, 300, atomic=True)
    first = app.engine().rotate(5, ONLINE)
    snapshot = read_rows(dsn, app.target)
    second = app.engine().rotate(5, ONLINE)
    third = app.engine().rotate(5, ATOMIC)
    older = app.engine().rotate(3, ONLINE)
    assert first.performed and not second.performed and not third.performed
    assert not older.performed
    assert second.to_version == third.to_version == first.to_version == 2
    assert read_rows(dsn, app.target) == snapshot  # not one row rewritten
    assert len(keys(dsn, app.cfg)) == 2
    app.assert_rotated(keys_for_policy=[(5, 1)])
    assert [e for e, _, _ in audit_events(dsn, app.cfg)].count("rotation_started") == 1


def test_initialise_records_a_fresh_policy_version_without_rotating(dsn: str) -> None:
    create_table(dsn)
    cfg = StoreConfig([Target("secrets")])
    kek = crypto.new_key()
    eng = Engine(dsn, cfg, keks(kek), actor="EncryptionPolicy ns/p version=4")
    init = eng.initialise(policy_version=4)
    assert (init.active_version, init.created_key, init.baseline_recorded,
            init.served_version) == (1, True, True, 4)
    expected = fill(dsn, Target("secrets"), kek, 200, ring=load_ring(dsn, cfg, kek))
    again = eng.initialise(policy_version=7)  # re-delivery / operator restart
    assert (again.created_key, again.baseline_recorded, again.served_version) == (
        False, False, 4)
    assert not eng.rotate(4, ONLINE).performed
    assert keys(dsn, cfg) == [(1, "active", 4)]
    res = eng.rotate(5, ONLINE)
    assert res.performed and res.to_version == 2
    assert not eng.rotate(5, ONLINE).performed
    assert decrypt_all(dsn, cfg, kek, Target("secrets")) == expected
    events = [e for e, _, _ in audit_events(dsn, cfg)]
    assert events == ["coverage_recorded", "key_created", "baseline_recorded", "key_created",
                      "rotation_started", "key_retired", "rotation_finished",
                      "legacy_migrated"]


def test_a_manual_rotation_uses_up_no_policy_version(dsn: str) -> None:
    """Finding 9: a CLI ``rotate`` without ``--policy-version`` is a manual rotation; the
    next spec.version bump still rotates (``kubectl wait ...observedVersion=N`` returns)."""
    app = make_app(dsn, 100, atomic=True)
    assert app.engine().initialise(policy_version=3).served_version == 3
    res = app.engine().rotate(options=ONLINE)
    assert res.performed and res.kind == "manual" and res.requested_version is None
    assert res.to_version == 2
    res = app.engine().rotate(options=ATOMIC)
    assert res.kind == "manual" and res.to_version == 3
    assert inspection.snapshot(dsn, app.cfg).served_version == 3  # untouched
    bump = app.engine().rotate(4, ONLINE)  # the next GitOps bump
    assert bump.performed and bump.requested_version == 4 and bump.to_version == 4
    assert inspection.snapshot(dsn, app.cfg).served_version == 4
    app.assert_rotated(keys_for_policy=[(4, 1)])
    assert keys(dsn, app.cfg) == [(1, "retired", None), (2, "retired", None),
                                  (3, "retired", None), (4, "active", 4)]


def test_many_rotations_keep_every_key_and_one_active(dsn: str) -> None:
    app = make_app(dsn, 200, atomic=True)
    for version in range(2, 7):
        app.engine().rotate(version, ONLINE if version % 2 else ATOMIC)
        assert active_version(dsn, app.cfg) == version
    app.assert_rotated()
    assert [s for _, s, _ in keys(dsn, app.cfg)] == ["retired"] * 5 + ["active"]
    assert app.ring().versions == (1, 2, 3, 4, 5, 6)


def test_database_refuses_a_second_active_key(dsn: str) -> None:
    """Invariant 3 is enforced by PostgreSQL itself (partial unique index), not only by
    the engine's care."""
    app = make_app(dsn, 10)
    with psycopg.connect(dsn) as conn, pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute("INSERT INTO encryption_keys (version, wrapped_dek, kek_fingerprint, "
                     "state, rotated_by) VALUES (2, '\\x00', 'x', 'active', 'hand')")
    assert active_version(dsn, app.cfg) == 1


def test_multiple_targets_schema_qualified_and_custom_columns(dsn: str) -> None:
    targets = [
        Target("secrets"),
        Target("secrets", schema="billing"),  # same name in another schema
        Target("credentials", id_column="cred_id", value_column="blob",
               key_id_column="kver", schema="app"),
    ]
    create_table(dsn, targets[0])
    create_table(dsn, targets[1])
    create_table(dsn, targets[2], key_type="smallint", id_type="text")
    for t in targets:
        grant_atomic(dsn, t)
    keys_schema(dsn, "keystore")
    cfg = StoreConfig(targets, keys_table="app_keys", schema="keystore")
    kek = crypto.new_key()
    eng = Engine(dsn, cfg, keks(kek), actor="test")
    eng.initialise()
    with psycopg.connect(dsn, autocommit=True) as conn:
        ring = eng.store.load_ring(conn, keks(kek))
    expected = {
        targets[0]: fill(dsn, targets[0], kek, 300, ring=ring),
        targets[1]: fill(dsn, targets[1], kek, 250, ring=ring, legacy_every=2),
    }
    # text ids for the third target
    creds = {f"user-{i:04d}": f"app-secret-cred-{i}".encode() for i in range(400)}
    with psycopg.connect(app_dsn(dsn)) as conn:
        for cid, pt in creds.items():
            value, kid = ring.encrypt(pt) if len(cid) % 2 else (crypto.encrypt(kek, pt), None)
            conn.execute("INSERT INTO app.credentials (cred_id, blob, kver) "
                         "VALUES (%s, %s, %s)", (cid, value, kid))
    expected[targets[2]] = creds

    res = eng.rotate(2, RotationOptions(batch_size=100))  # vacuum on: schema-qualified too
    assert res.re_encrypted == 950 and set(res.table_sizes) == {
        "secrets", "billing.secrets", "app.credentials"}
    for t, plain in expected.items():
        assert decrypt_all(dsn, cfg, kek, t) == plain
        assert {k for _, k in read_rows(dsn, t).values()} == {2}
    res = eng.rotate(3, RotationOptions(mode="Atomic", batch_size=100, vacuum=False))
    assert res.re_encrypted == 950
    for t, plain in expected.items():
        assert decrypt_all(dsn, cfg, kek, t) == plain
    with psycopg.connect(dsn) as conn:
        own = conn.execute("SELECT table_name FROM information_schema.tables "
                           "WHERE table_schema = 'keystore' ORDER BY 1").fetchall()
        public = conn.execute("SELECT table_name FROM information_schema.tables "
                              "WHERE table_schema = 'public' ORDER BY 1").fetchall()
    assert own == [("app_keys",), ("app_keys_audit",), ("app_keys_meta",),
                   ("app_keys_rotations",)]
    assert public == [("secrets",)]  # nothing of ours outside the keys schema
    assert verify_audit(dsn, cfg).events > 0


def test_target_problems_are_named(dsn: str) -> None:
    """Finding 10's engine half: each target problem is a specific SchemaError, the same
    for initialise, rotate, status and verify, before anything is written."""
    kek = crypto.new_key()
    cases = [
        ("CREATE TABLE {} (id bigint PRIMARY KEY, value text, key_id int)", "must be bytea"),
        ("CREATE TABLE {} (id bigint PRIMARY KEY, value bytea, key_id text)",
         "must be an integer type"),
        ("CREATE TABLE {} (id bigint PRIMARY KEY, value bytea)", "has no column key_id"),
        ("CREATE VIEW {} AS SELECT 1::bigint AS id, ''::bytea AS value, 1 AS key_id",
         "is a view, not a table"),
        (None, "does not exist"),
    ]
    from rotation_operator.errors import SchemaError

    for n, (ddl, message) in enumerate(cases):
        name = f"t{n}"
        if ddl:
            with psycopg.connect(app_dsn(dsn), autocommit=True) as conn:
                conn.execute(ddl.format(name))
        cfg = StoreConfig([Target(name)])
        for call in (lambda c=cfg: Engine(dsn, c, keks(kek), actor="test").initialise(),
                     lambda c=cfg: Engine(dsn, c, keks(kek), actor="test").rotate(2, ONLINE),
                     lambda c=cfg: inspection.snapshot(dsn, c),
                     lambda c=cfg: inspection.verify(dsn, c, keks(kek))):
            with pytest.raises(SchemaError, match=message):
                call()
    with psycopg.connect(admin_dsn(dsn)) as conn:  # nothing of ours was created
        assert conn.execute("SELECT to_regclass('encryption_keys')").fetchone() == (None,)


def test_status_snapshot_counts_before_and_after(dsn: str) -> None:
    app = make_app(dsn, 1000, legacy_every=4, targets=[Target("secrets"),
                                                      Target("other")], atomic=True)
    snap = inspection.snapshot(dsn, app.cfg)
    assert (snap.active_version, snap.served_version) == (1, None)
    assert (snap.secret_count, snap.legacy_count, snap.stale_count) == (2000, 500, 500)
    assert [(k.version, k.state, k.rows) for k in snap.keys] == [(1, "active", 1500)]
    assert [(t.table, t.kind, t.rows, t.legacy, t.stale, t.retired) for t in snap.targets] == [
        ("secrets", "table", 1000, 250, 250, 0), ("other", "table", 1000, 250, 250, 0)]
    assert snap.running is None and snap.last_rotation is None

    # an application writes under a key while we look
    with Encryptor(app_dsn(dsn), app.kek) as enc, psycopg.connect(app_dsn(dsn)) as conn:
        value, kid = enc.encrypt(b"app-secret-new")
        conn.execute("INSERT INTO secrets VALUES (5000, %s, %s)", (value, kid))
    app.expected[Target("secrets")][5000] = b"app-secret-new"
    app.engine().rotate(2, ONLINE)
    snap = inspection.snapshot(dsn, app.cfg)
    assert (snap.active_version, snap.served_version) == (2, 2)
    assert (snap.secret_count, snap.legacy_count, snap.stale_count) == (2001, 0, 0)
    assert [(k.version, k.state, k.rows) for k in snap.keys] == [
        (1, "retired", 0), (2, "active", 2001)]
    assert snap.keys[0].retired_at is not None and snap.keys[1].retired_at is None
    last = snap.last_rotation
    assert last is not None and (last.requested_version, last.phase, last.from_version,
                                 last.to_version, last.re_encrypted, last.total) == (
        2, "done", 1, 2, 2001, 2001)
    assert snap.audit_events == verify_audit(dsn, app.cfg).events

    app.engine().rotate(3, ATOMIC)
    snap = inspection.snapshot(dsn, app.cfg)
    last = snap.last_rotation
    assert last is not None and (last.requested_version, last.mode, last.total) == (
        3, "Atomic", 2001)
    assert last.re_encrypted == 2001, "an atomic rotation must record how many rows it moved"
    assert [(k.version, k.rows) for k in snap.keys] == [(1, 0), (2, 0), (3, 2001)]
    app.assert_rotated()


def test_parallel_workers_move_every_row(dsn: str) -> None:
    app = make_app(dsn, 3000)
    res = app.engine().rotate(2, RotationOptions(batch_size=100, workers=2, vacuum=False))
    assert res.performed and res.re_encrypted == 3000 and res.legacy_migrated == 750
    app.assert_rotated(keys_for_policy=[(2, 1)])


def test_library_reads_every_row_at_every_stage(dsn: str) -> None:
    """The application library decrypts legacy rows, old-key rows and new-key rows, and
    picks up a new active key by itself."""
    app = make_app(dsn, 300)
    with Encryptor(dsn, app.kek, max_age=0.0) as enc:
        rows = read_rows(dsn, app.target)
        assert {i: enc.decrypt(v, k) for i, (v, k) in rows.items()} == app.expected[
            app.target]
        assert enc.encrypt(b"x")[1] == 1
        app.engine().rotate(2, ONLINE)
        rows = read_rows(dsn, app.target)
        assert {i: enc.decrypt(v, k) for i, (v, k) in rows.items()} == app.expected[
            app.target]
        assert enc.encrypt(b"x")[1] == 2
        assert enc.ring.versions == (1, 2)


def test_quoted_identifiers_work(dsn: str) -> None:
    """Valid but case-sensitive or reserved names are quoted, never folded or parsed:
    a decoy table ``select`` (lower case) next to ``"Select"`` is not touched."""
    target = Target("Select", id_column="user", value_column="Value", key_id_column="order",
                    schema="Group")
    decoy = Target("select", schema="group")
    create_table(dsn, target)
    create_table(dsn, decoy)
    grant_atomic(dsn, target)
    keys_schema(dsn, "Table")
    cfg = StoreConfig([target], keys_table="Keys", schema="Table")
    kek = crypto.new_key()
    eng = Engine(dsn, cfg, keks(kek), actor="test")
    eng.initialise()
    with psycopg.connect(dsn, autocommit=True) as conn:
        ring = eng.store.load_ring(conn, keks(kek))
    expected = fill(dsn, target, kek, 500, ring=ring)
    decoy_rows = fill(dsn, decoy, kek, 50, ring=None)
    decoy_before = read_rows(dsn, decoy)
    assert decoy_rows and decoy_before
    eng.rotate(2, RotationOptions(batch_size=100))
    eng.rotate(3, RotationOptions(mode="Atomic", batch_size=100))
    assert decrypt_all(dsn, cfg, kek, target) == expected
    assert {k for _, k in read_rows(dsn, target).values()} == {3}
    assert read_rows(dsn, decoy) == decoy_before
    with psycopg.connect(admin_dsn(dsn)) as conn:
        tables = conn.execute(
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2"
        ).fetchall()
        assert conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
            sql.Identifier("Table", "Keys"))).fetchone() == (3,)
    assert tables == [("Group", "Select"), ("Table", "Keys"), ("Table", "Keys_audit"),
                      ("Table", "Keys_meta"), ("Table", "Keys_rotations"), ("group", "select")]
    assert inspection.snapshot(dsn, cfg).stale_count == 0
    assert inspection.verify(dsn, cfg, keks(kek)).ok
