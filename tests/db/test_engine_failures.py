"""Everything that can go wrong during a rotation, on a real PostgreSQL: a wrong KEK, a
row that does not decrypt, kill -9 at the places that matter, a database restart.

Invariant 1 (no loss) and 2 (fail closed) are checked after each; kill -9 uses the fault
hook of :mod:`rotation_operator.faults` in a CLI subprocess, so the process dies exactly
at the named point."""

from __future__ import annotations

import time
from collections.abc import Callable

import psycopg
import pytest

from rotation_operator.crypto import codec as crypto
from rotation_operator.errors import (
    DatabaseUnavailable,
    KekMismatchError,
    KeysetTampered,
    LockLost,
    RowDecryptError,
)
from rotation_operator.library import Encryptor
from rotation_operator.policy.config import MAX_LIMIT, RotationOptions, StoreConfig, Target
from rotation_operator.rotation import inspection
from rotation_operator.rotation.engine import Engine
from rotation_operator.store.locks import RotationLock
from tests.fixtures._env import testenv
from tests.fixtures.fix_app import (
    ATOMIC,
    ONLINE,
    App,
    assert_rotated,
    audit_events,
    create_table,
    decrypt_all,
    dump,
    fill,
    keys,
    make_app,
    new_kek,
    read_rows,
    run_cli,
)
from tests.fixtures.keks import keks
from tests.fixtures.roles import admin_dsn


# -- wrong KEK -----------------------------------------------------------------------------
def test_wrong_kek_fails_closed_and_writes_nothing(dsn: str) -> None:
    app = make_app(dsn, 300)
    app.engine().rotate(2, ONLINE)  # keys v1 (retired) and v2 (active)
    before = dump(dsn)
    wrong = crypto.new_key()

    with pytest.raises(KekMismatchError, match="DEK v2") as info:
        app.engine(wrong).initialise(policy_version=9)
    assert info.value.reason == "KEKMismatch"
    assert crypto.kek_fingerprint(wrong) in str(info.value)
    with pytest.raises(KekMismatchError, match="DEK v2"):
        app.engine(wrong).rotate(3, ONLINE)
    with pytest.raises(KekMismatchError, match="DEK v2"):
        app.engine(wrong).rotate(3, ATOMIC)
    with pytest.raises(KekMismatchError, match="DEK v2"):
        inspection.verify(dsn, app.cfg, keks(wrong))
    with pytest.raises(KekMismatchError, match="DEK v2"), Encryptor(dsn, wrong) as enc:
        enc.encrypt(b"x")
    proc = run_cli("rotate", "--policy-version", "3", "--no-vacuum", dsn=dsn, kek=wrong)
    assert proc.returncode == 2, proc.stderr
    assert "DEK v2" in proc.stderr and "[KEKMismatch]" in proc.stderr
    proc = run_cli("init", "--policy-version", "3", dsn=dsn, kek=wrong)
    assert proc.returncode == 2 and "[KEKMismatch]" in proc.stderr
    proc = run_cli("rotate", "--policy-version", "3", dsn=dsn, kek=None)  # no KEK at all
    assert proc.returncode == 2 and "no KEK" in proc.stderr and "[KEKInvalid]" in proc.stderr
    proc = run_cli("rotate", "--policy-version", "3", dsn=dsn, kek=b"short")
    assert proc.returncode == 2 and "found 10 bytes" in proc.stderr  # hex of 5 bytes

    assert dump(dsn) == before  # not one tuple written, not even rewritten
    app.assert_rotated()
    assert not inspection.snapshot(dsn, app.cfg).running


def test_tampered_or_swapped_wrapped_dek_is_refused(dsn: str) -> None:
    """The fingerprint matches but the wrap does not: the keys table was altered.  A
    wrapped DEK moved to another version's row does not unwrap (the version is in the
    associated data)."""
    app = make_app(dsn, 50)
    app.engine().rotate(2, ONLINE)
    before = dump(dsn)
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE encryption_keys SET wrapped_dek = (SELECT wrapped_dek "
                     "FROM encryption_keys WHERE version = 2) WHERE version = 1")
    with pytest.raises(KeysetTampered, match=r"DEK v1 \(retired\) .* does not unwrap .* "
                                             r"altered") as info:
        app.engine().rotate(3, ONLINE)
    assert info.value.reason == "KeysetTampered" and info.value.key_version == 1
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE encryption_keys SET wrapped_dek = "
                     "overlay(wrapped_dek placing '\\xff' from 20 for 1) WHERE version = 2")
    with pytest.raises(KeysetTampered, match=r"DEK v2 \(active\) .* does not unwrap"):
        app.engine().initialise()
    after = dump(dsn)
    assert after["public.secrets"] == before["public.secrets"]
    assert after["public.encryption_keys_audit"] == before["public.encryption_keys_audit"]


# -- a row that does not decrypt -----------------------------------------------------------
def _flip_byte(dsn: str, row_id: int, offset: int = 20) -> bytes:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT value FROM secrets WHERE id = %s", (row_id,)).fetchone()
        assert row is not None
        original = bytes(row[0])
        bad = bytearray(original)
        bad[offset] ^= 0x01
        conn.execute("UPDATE secrets SET value = %s WHERE id = %s", (bytes(bad), row_id))
    return original


def _page_mates(dsn: str, row_id: int) -> set[int]:
    """Ids of the rows on the same heap page as ``row_id``: always in the same batch."""
    with psycopg.connect(dsn) as conn:
        return {r[0] for r in conn.execute(
            "SELECT id FROM secrets WHERE (ctid::text::point)[0] = "
            "(SELECT (ctid::text::point)[0] FROM secrets WHERE id = %s)", (row_id,))}


def _check_unchanged_or_moved(app: App, before: dict[int, tuple[bytes, int | None]]
                              ) -> tuple[set[int], set[int]]:
    """Every row is either exactly as before or moved to the new key with the same
    plaintext; returns (unchanged ids, moved ids)."""
    after = read_rows(app.dsn, app.target)
    ring = app.ring()
    unchanged = {i for i in after if after[i] == before[i]}
    moved = set(after) - unchanged
    for i in moved:
        assert after[i][1] == ring.active_version
        assert ring.decrypt(*after[i]) == app.expected[app.target][i]
    return unchanged, moved


@pytest.mark.parametrize("legacy", [False, True], ids=["dek-row", "legacy-row"])
def test_corrupted_row_stops_online_rotation_then_resumes_after_repair(
        dsn: str, legacy: bool) -> None:
    app = make_app(dsn, 1000, legacy_every=4)
    bad_id = 512 if legacy else 513
    original = _flip_byte(dsn, bad_id)
    mates = _page_mates(dsn, bad_id)
    assert len(mates) > 10
    before = read_rows(dsn, app.target)

    with pytest.raises(RowDecryptError) as info:
        app.engine().rotate(2, ONLINE)
    exc = info.value
    assert (exc.table, exc.row_id, exc.key_version) == ("secrets", bad_id,
                                                        None if legacy else 1)
    assert f"row {bad_id} of table secrets" in str(exc)
    assert ("the KEK (legacy row)" if legacy else "DEK v1") in str(exc)

    unchanged, _ = _check_unchanged_or_moved(app, before)
    assert bad_id in unchanged
    assert mates <= unchanged, "rows of the failing batch were written"
    snap = inspection.snapshot(dsn, app.cfg)
    assert snap.running is not None and snap.running.requested_version == 2
    assert snap.stale_count == len(unchanged)
    failed = [d for e, _, d in audit_events(dsn, app.cfg) if e == "rotation_failed"]
    assert failed and failed[-1]["reason"] == "RowDecryptFailed"

    # still broken: fails again at the same row, creates no key
    with pytest.raises(RowDecryptError, match=f"row {bad_id} "):
        app.engine().rotate(2, ONLINE)
    assert len(keys(dsn, app.cfg)) == 2

    with psycopg.connect(dsn) as conn:  # repair from the application's backup
        conn.execute("UPDATE secrets SET value = %s WHERE id = %s", (original, bad_id))
    res = app.engine().rotate(2, ONLINE)
    assert res.performed and res.resumed
    app.assert_rotated(keys_for_policy=[(2, 1)])
    assert keys(dsn, app.cfg) == [(1, "retired", None), (2, "active", 2)]


def test_corrupted_row_stops_a_parallel_rotation(dsn: str) -> None:
    """The same with two worker processes: the worker's error reaches the caller intact."""
    app = make_app(dsn, 4000)
    original = _flip_byte(dsn, 2345)
    mates = _page_mates(dsn, 2345)
    before = read_rows(dsn, app.target)
    with pytest.raises(RowDecryptError) as info:
        app.engine().rotate(2, RotationOptions(batch_size=100, vacuum=False, workers=2))
    assert (info.value.table, info.value.row_id, info.value.key_version) == (
        "secrets", 2345, 1)
    unchanged, _ = _check_unchanged_or_moved(app, before)
    assert mates <= unchanged
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE secrets SET value = %s WHERE id = 2345", (original,))
    assert app.engine().rotate(2, RotationOptions(batch_size=100, workers=2)).resumed
    app.assert_rotated(keys_for_policy=[(2, 1)])


def test_corrupted_row_stops_atomic_rotation_with_nothing_written(dsn: str) -> None:
    """Atomic: the key is minted and announced first, then the rows move all or nothing:
    a bad row leaves every row exactly as it was (same tuples), resumable."""
    app = make_app(dsn, 1000, atomic=True)
    original = _flip_byte(dsn, 777)
    before = dump(dsn)
    with pytest.raises(RowDecryptError, match="row 777 of table secrets"):
        app.engine().rotate(2, ATOMIC)
    after = dump(dsn)
    assert after["public.secrets"] == before["public.secrets"]  # not one tuple written
    assert keys(dsn, app.cfg) == [(1, "retiring", None), (2, "active", 2)]
    assert [e for e, _, _ in audit_events(dsn, app.cfg)][-1] == "rotation_failed"
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE secrets SET value = %s WHERE id = 777", (original,))
    res = app.engine().rotate(2, ATOMIC)
    assert res.performed and res.resumed
    app.assert_rotated(keys_for_policy=[(2, 1)])


def test_row_under_unknown_key_stops_the_rotation(dsn: str) -> None:
    app = make_app(dsn, 300)
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE secrets SET key_id = 99 WHERE id = 42")
    with pytest.raises(RowDecryptError, match=r"row 42 of table secrets .* DEK v99"):
        app.engine().rotate(2, ONLINE)
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE secrets SET key_id = 1 WHERE id = 42")
    assert app.engine().rotate(2, ONLINE).resumed
    app.assert_rotated()


# -- kill -9 -------------------------------------------------------------------------------
KILL_POINTS = [
    ("Online", "after-start"),
    ("Online", "after-batch:1"),
    ("Online", "after-batch:3"),
    ("Online", "before-finish"),
    ("Online", "before-vacuum"),
    ("Atomic", "after-batch:3"),
    ("Atomic", "before-finish"),
    ("Atomic", "before-vacuum"),
]


def _rotate_cli(app: App, mode: str, fault: str | None = None, *extra: str
                ) -> tuple[int, str, str]:
    proc = run_cli("rotate", "--policy-version", "2", "--mode", mode, "--batch-size", "100",
                   "--wait-lock", "30", *extra, dsn=app.dsn, kek=app.kek, fault=fault)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize(("mode", "fault"), KILL_POINTS, ids=[f"{m}-{f}" for m, f in KILL_POINTS])
def test_kill_9_then_rerun_is_lossless(dsn: str, mode: str, fault: str) -> None:
    app = make_app(dsn, 1000, atomic=True)
    before = read_rows(dsn, app.target)

    code, out, err = _rotate_cli(app, mode, fault)
    assert code == -9, f"expected SIGKILL at {fault}, got {code}: {out}{err}"

    # in between: every row still reads back through the library, whatever its key
    with Encryptor(dsn, app.kek) as enc:
        rows = read_rows(dsn, app.target)
        assert {i: enc.decrypt(v, k) for i, (v, k) in rows.items()} == app.expected[
            app.target]
    if mode == "Atomic" and fault != "before-vacuum":
        # Atomic mints and announces the key first; its rows move all or nothing.
        assert read_rows(dsn, app.target) == before, "a killed atomic transaction left rows"
        assert keys(dsn, app.cfg) == [(1, "retiring", None), (2, "active", 2)]
    snap = inspection.snapshot(dsn, app.cfg)
    committed = fault == "before-vacuum"
    assert (snap.running is None) == committed
    assert (snap.served_version == 2) == committed

    code, out, err = _rotate_cli(app, mode)
    assert code == 0, err
    assert ("version 2 is served" in out) == committed
    assert (", resumed" in out) == (not committed)
    app.assert_rotated(keys_for_policy=[(2, 1)])
    assert keys(dsn, app.cfg) == [(1, "retired", None), (2, "active", 2)]
    proc = run_cli("verify", dsn=dsn, kek=app.kek)
    assert proc.returncode == 0 and "verify: OK" in proc.stdout, proc.stdout + proc.stderr


def test_kill_9_online_then_finish_atomically(dsn: str) -> None:
    """An interrupted online rotation finished by an Atomic rerun of the same version must
    not mint a second key for that version."""
    app = make_app(dsn, 1000, atomic=True)
    code, _, err = _rotate_cli(app, "Online", "after-batch:2")
    assert code == -9, err
    code, out, err = _rotate_cli(app, "Atomic")
    assert code == 0, err
    assert ", resumed" in out
    app.assert_rotated(keys_for_policy=[(2, 1)])
    assert keys(dsn, app.cfg) == [(1, "retired", None), (2, "active", 2)]


def test_kill_9_twice_in_a_row(dsn: str) -> None:
    app = make_app(dsn, 1000)
    assert _rotate_cli(app, "Online", "after-batch:2")[0] == -9
    assert _rotate_cli(app, "Online", "after-batch:2")[0] == -9
    assert _rotate_cli(app, "Online", "before-finish")[0] == -9
    assert _rotate_cli(app, "Online")[0] == 0
    app.assert_rotated(keys_for_policy=[(2, 1)])
    assert len(keys(dsn, app.cfg)) == 2


def test_kill_9_of_a_parallel_worker_then_rerun(dsn: str) -> None:
    """With workers, the fault point fires in a worker process: the rotator notices the
    dead worker, stops (retryable), and the rerun finishes without loss."""
    app = make_app(dsn, 4000)
    code, out, err = _rotate_cli(app, "Online", "after-batch:3", "--workers", "2")
    assert code == 3, out + err
    assert "died" in err and "[DatabaseUnavailable]" in err
    snap = inspection.snapshot(dsn, app.cfg)
    assert snap.running is not None and 0 < snap.stale_count < 4000
    code, out, err = _rotate_cli(app, "Online", None, "--workers", "2")
    assert code == 0 and ", resumed" in out, err
    app.assert_rotated(keys_for_policy=[(2, 1)])


# -- database restart ----------------------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 2], ids=["in-process", "2-workers"])
def test_database_restart_mid_rotation_then_rerun(dsn: str, pg_server: testenv.Postgres,
                                                  workers: int) -> None:
    app = make_app(dsn, 2000)
    calls = []

    def progress(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) == 4:
            pg_server.restart()

    # A load limit that is never reached: workers then get their block ranges one at a
    # time as they finish them, so the restart comes while rows remain, however far the
    # workers run ahead of this process on a busy machine.
    options = RotationOptions(batch_size=100, vacuum=False, workers=workers,
                              max_blocked_sessions=MAX_LIMIT)
    with pytest.raises(DatabaseUnavailable) as info:
        app.engine().rotate(2, options, progress=progress)
    assert info.value.retryable and info.value.reason == "DatabaseUnavailable"
    assert len(calls) >= 4  # workers may report batches they committed before the restart
    snap = inspection.snapshot(dsn, app.cfg)
    assert snap.running is not None and 0 < snap.stale_count < 2000
    assert decrypt_all(dsn, app.cfg, app.kek, app.target) == app.expected[app.target]

    res = app.engine().rotate(2, RotationOptions(batch_size=100, workers=workers))
    assert res.performed and res.resumed
    app.assert_rotated(keys_for_policy=[(2, 1)])


@pytest.mark.parametrize("cause", ["restart", "terminated"])
def test_a_lost_lock_session_is_reported_by_its_cause(dsn: str, pg_server: testenv.Postgres,
                                                      cause: str) -> None:
    """One cause, one reason, whichever part of a rotation notices first: the lock's
    heartbeat seeing its session end in a database restart says DatabaseUnavailable, as
    every other connection of the rotation does; only a session ended while the database
    stayed up (``pg_terminate_backend``: another rotator may now take the lock) says
    LockLost."""
    app = make_app(dsn, 10)
    with RotationLock(dsn, app.cfg, heartbeat=0.05) as lock:
        lock.check()
        if cause == "restart":
            pg_server.restart()
        else:
            with psycopg.connect(admin_dsn(dsn), autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (lock.backend_pid,))
        for _ in range(1200):  # until the heartbeat has noticed
            if lock.lost:
                break
            time.sleep(0.05)
        assert lock.lost
        expected = DatabaseUnavailable if cause == "restart" else LockLost
        for _ in range(2):  # asked again, the same answer
            with pytest.raises(expected) as info:
                lock.check()
            assert type(info.value) is expected and info.value.retryable


def test_database_unreachable_is_retryable_and_names_no_password(dsn: str) -> None:
    app = make_app(dsn, 10)
    bad = "postgresql://postgres:hunter2-secret@127.0.0.1:1/nowhere"
    app.dsn = bad
    for call in (lambda: app.engine().initialise(), lambda: app.engine().rotate(2, ONLINE),
                 lambda: inspection.snapshot(bad, app.cfg)):
        with pytest.raises(DatabaseUnavailable) as info:
            call()
        assert "hunter2" not in str(info.value) and info.value.retryable
    proc = run_cli("rotate", "--policy-version", "2", dsn=bad, kek=app.kek)
    assert proc.returncode == 3 and "hunter2" not in proc.stderr + proc.stdout


def test_an_interrupted_rotation_is_finished_or_superseded(dsn: str) -> None:
    """Rotation for 6 interrupted, then 5 requested (the CLI allows it): finishing 6 is
    the safe answer (5 is then served by 6).  Interrupted 7, then 8 requested: 8 supersedes
    7 (its rows move once, straight onto 8's key), and 7 is then below what was served."""
    app = make_app(dsn, 500, atomic=True)
    proc = run_cli("rotate", "--policy-version", "6", "--batch-size", "100", dsn=dsn,
                   kek=app.kek, fault="after-start")
    assert proc.returncode == -9
    res = app.engine().rotate(5, ONLINE, lock_wait=30)
    assert res.performed and res.resumed and res.requested_version == 6
    assert not app.engine().rotate(6, ATOMIC).performed
    proc = run_cli("rotate", "--policy-version", "7", "--batch-size", "100", dsn=dsn,
                   kek=app.kek, fault="after-batch:2")
    assert proc.returncode == -9
    res = app.engine().rotate(8, ATOMIC, lock_wait=30)
    assert res.performed and not res.resumed and res.to_version == 4
    with psycopg.connect(dsn) as conn:
        phases = {r.requested_version: r.phase
                  for r in app.engine().store.rotation_records(conn)}
    assert phases == {6: "done", 7: "superseded", 8: "done"}
    behind = app.engine().rotate(7, ONLINE)
    assert not behind.performed and behind.decision is not None
    assert behind.decision.reason == "VersionBelowServed"
    app.assert_rotated(keys_for_policy=[(6, 1), (7, 1), (8, 1)])


def test_wrong_kek_on_a_fresh_database_of_legacy_rows_creates_nothing(dsn: str) -> None:
    """No key exists yet, only pre-envelope rows: a KEK that opens none of them must not
    become the KEK of key v1 (the right one would be refused forever after)."""
    target = Target("secrets")
    create_table(dsn, target)
    kek = new_kek()
    expected = fill(dsn, target, kek, 50)  # all legacy
    before = dump(dsn)
    cfg = StoreConfig([target])
    wrong = crypto.new_key()
    calls: list[Callable[[Engine], object]] = [
        lambda e: e.initialise(policy_version=1), lambda e: e.rotate(2, ONLINE),
        lambda e: e.rotate(2, ATOMIC)]
    for call in calls:
        with pytest.raises(KekMismatchError, match="legacy row") as info:
            call(Engine(dsn, cfg, keks(wrong), actor="test"))
        assert "secrets" in str(info.value)
    assert dump(dsn) == before  # not even the key tables were created
    # The right KEK still works, and every legacy row reads back.
    Engine(dsn, cfg, keks(kek), actor="test").rotate(2, ONLINE)
    assert_rotated(dsn, cfg, kek, {target: expected})
