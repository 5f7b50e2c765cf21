"""Concurrency on a real PostgreSQL: two rotators at once (invariant 6), and applications
writing through the library while an online rotation runs (invariants 1 and 4)."""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any

import psycopg
import pytest

from rotation_operator.errors import LockHeld
from rotation_operator.library import Encryptor
from rotation_operator.policy.config import Mode, RotationOptions, StoreConfig, Target
from rotation_operator.rotation import inspection
from rotation_operator.rotation.engine import Engine
from rotation_operator.rotation.results import RotationResult
from tests.fixtures.fix_app import (
    ATOMIC,
    ONLINE,
    Gate,
    active_version,
    audit_events,
    keys,
    make_app,
    not_under_active,
    plaintext_for,
    read_rows,
    run_cli,
)
from tests.fixtures.fix_app import in_thread as _in_thread
from tests.fixtures.keks import keks
from tests.fixtures.roles import app_dsn


@pytest.mark.parametrize("options", [ONLINE, ATOMIC], ids=["online", "atomic"])
def test_two_rotators_make_exactly_one_rotation(dsn: str, options: RotationOptions) -> None:
    app = make_app(dsn, 2000, atomic=True)
    gate = Gate()
    first, a = _in_thread(lambda: app.engine(actor="a").rotate(2, options, progress=gate))
    assert gate.entered.wait(30)

    # a second rotator that will not wait is refused, in-process and from the CLI
    with pytest.raises(LockHeld) as info:
        app.engine(actor="b").rotate(2, options)
    assert info.value.retryable
    with pytest.raises(LockHeld):  # same keys table named with its schema: same lock
        Engine(dsn, StoreConfig(app.cfg.targets, schema="public"), keks(app.kek),
               actor="b").rotate(2, options)
    proc = run_cli("rotate", "--policy-version", "2", dsn=dsn, kek=app.kek)
    assert proc.returncode == 3 and "[LockHeld]" in proc.stderr, proc.stderr

    # one that waits gets the lock after the first finished, and finds nothing to do
    second, b = _in_thread(lambda: app.engine(actor="b").rotate(2, options, lock_wait=60))
    time.sleep(0.5)
    assert second.is_alive(), "the waiting rotator must not run while the first does"
    gate.release.set()
    first.join(60)
    second.join(60)
    assert "error" not in a and "error" not in b, (a, b)
    ra: RotationResult = a["result"]
    rb: RotationResult = b["result"]
    assert ra.performed and not rb.performed and rb.to_version == ra.to_version == 2
    app.assert_rotated(keys_for_policy=[(2, 1)])
    assert len(keys(dsn, app.cfg)) == 2
    started = [d for e, _, d in audit_events(dsn, app.cfg) if e == "rotation_started"]
    assert len(started) == 1


def test_racing_rotators_without_a_gate(dsn: str) -> None:
    """Several threads and two CLI processes ask for the same version at the same time."""
    app = make_app(dsn, 1500, atomic=True)
    barrier = threading.Barrier(3)

    def rotate(mode: Mode) -> RotationResult:
        barrier.wait()
        return app.engine().rotate(3, RotationOptions(mode=mode, batch_size=100,
                                                      vacuum=False), lock_wait=60)

    threads = [_in_thread(lambda m=m: rotate(m)) for m in ("Online", "Atomic", "Online")]
    for t, _ in threads:
        t.join(120)
    results = [out["result"] for _, out in threads]
    assert sum(r.performed for r in results) == 1
    procs = [run_cli("rotate", "--policy-version", "3", "--wait-lock", "60", dsn=dsn,
                     kek=app.kek) for _ in range(2)]
    assert all(p.returncode == 0 and "version 3 is served" in p.stdout for p in procs), \
        [p.stdout + p.stderr for p in procs]
    app.assert_rotated(keys_for_policy=[(3, 1)])
    assert len(keys(dsn, app.cfg)) == 2


def test_a_rotator_that_died_releases_the_lock(dsn: str) -> None:
    app = make_app(dsn, 500)
    proc = run_cli("rotate", "--policy-version", "2", "--batch-size", "100", dsn=dsn,
                   kek=app.kek, fault="after-batch:2")
    assert proc.returncode == -9
    # The dead client's session ends and PostgreSQL drops its advisory lock.
    res = app.engine().rotate(2, ONLINE, lock_wait=30)
    assert res.resumed
    app.assert_rotated(keys_for_policy=[(2, 1)])


# -- applications writing during a rotation -------------------------------------------------
class Writer(threading.Thread):
    """An application thread: inserts new rows and rewrites its own existing rows (read,
    decrypt, check, encrypt a new plaintext, write), as fast as it can.

    Each writer owns a disjoint set of ids, so "what it last wrote" is well defined.
    """

    def __init__(self, dsn: str, enc: Encryptor, index: int, count: int, initial: int,
                 expected: dict[int, bytes]):
        super().__init__(daemon=True)
        self.dsn, self.enc, self.index, self.count = dsn, enc, index, count
        self.own = [i for i in range(1, initial + 1) if i % count == index]
        self.last: dict[int, bytes] = {i: expected[i] for i in self.own}
        self.next_id = 1_000_000 * (index + 1)
        self.stop = threading.Event()
        self.rotation_returned = threading.Event()
        self.writes = self.reads = 0
        self.key_ids_after_return: list[int] = []
        self.error: BaseException | None = None
        self.rng = random.Random(index)

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self.stop.is_set():
                    self.step(conn)
        except BaseException as exc:
            self.error = exc

    def step(self, conn: psycopg.Connection[Any]) -> None:
        if self.rng.random() < 0.4:
            row_id = self.next_id
            self.next_id += 1
            pt = plaintext_for(row_id)
            value, kid = self.enc.encrypt(pt)
            conn.execute("INSERT INTO secrets (id, value, key_id) VALUES (%s, %s, %s)",
                         (row_id, value, kid))
        else:
            row_id = self.rng.choice(self.own)
            with conn.transaction():
                row = conn.execute("SELECT value, key_id FROM secrets WHERE id = %s "
                                   "FOR UPDATE", (row_id,)).fetchone()
                assert row is not None
                got = self.enc.decrypt(bytes(row[0]), row[1])
                assert got == self.last[row_id], f"row {row_id} read back wrong"
                self.reads += 1
                pt = plaintext_for(row_id)
                value, kid = self.enc.encrypt(pt)
                conn.execute("UPDATE secrets SET value = %s, key_id = %s WHERE id = %s",
                             (value, kid, row_id))
        self.last[row_id] = pt
        self.writes += 1
        if self.rotation_returned.is_set():
            self.key_ids_after_return.append(kid)


@pytest.mark.parametrize("workers", [1, 2], ids=["in-process", "2-workers"])
def test_writers_during_online_rotation_lose_nothing(dsn: str, workers: int,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rotation_operator")
    n = 20_000
    app = make_app(dsn, n, legacy_every=10)
    expected = app.expected[app.target]
    enc = Encryptor(app_dsn(dsn), app.kek)  # the library's defaults
    writers = [Writer(app_dsn(dsn), enc, i, 3, n, expected) for i in range(3)]
    for w in writers:
        w.start()
    time.sleep(0.3)  # writers are at full speed under key v1 before the rotation starts
    started = time.monotonic()
    res = app.engine().rotate(2, RotationOptions(batch_size=100, vacuum=False,
                                                 workers=workers))
    seconds = time.monotonic() - started
    for w in writers:
        w.rotation_returned.set()
    time.sleep(0.3)  # and keep writing for a while after it returned
    for w in writers:
        w.stop.set()
    for w in writers:
        w.join(30)
    enc.close()
    for w in writers:
        assert w.error is None, repr(w.error)
        assert w.writes > 50 and w.key_ids_after_return, "writers were not busy"
        assert set(w.key_ids_after_return) == {2}, "a write after the rotation used v1"

    # writers rewrote some rows under v2 before the rotation reached them: fewer than n
    assert res.performed and res.re_encrypted > n // 2
    final = dict(expected)
    for w in writers:
        final.update(w.last)
    app.expected[app.target] = final
    # every row decrypts to what its writer last wrote; no row under a non-active key
    app.assert_rotated(keys_for_policy=[(2, 1)])
    assert not_under_active(dsn, app.cfg) == 0
    assert inspection.snapshot(dsn, app.cfg).stale_count == 0
    written = sum(w.writes for w in writers)
    print(f"\nrotation of {n} rows took {seconds:.1f}s with {written} concurrent writes; "
          f"{res.re_encrypted} rows re-encrypted; passes with late rows: "
          f"{sum('arrived under old keys' in r.getMessage() for r in caplog.records)}")


def test_library_picks_up_the_new_key_within_max_age(dsn: str) -> None:
    app = make_app(dsn, 200)
    with Encryptor(app_dsn(dsn), app.kek, max_age=0.2) as enc:
        assert enc.encrypt(b"x")[1] == 1
        app.engine().rotate(2, ONLINE)
        time.sleep(0.25)
        assert enc.encrypt(b"x")[1] == 2
        assert active_version(dsn, app.cfg) == 2


def test_library_ring_moves_to_the_new_key_before_a_short_rotation_finishes(
        dsn: str) -> None:
    """A short online rotation waits ``grace`` after minting, so an Encryptor that warmed
    its ring just before (max_age 1 s < grace 2 s) writes under the new key afterwards."""
    app = make_app(dsn, 200)
    with Encryptor(app_dsn(dsn), app.kek, max_age=1.0) as enc, \
            psycopg.connect(app_dsn(dsn)) as conn:
        enc.encrypt(b"warm the ring")
        started = time.monotonic()
        app.engine().rotate(2, RotationOptions(mode="Online", batch_size=100, vacuum=False,
                                               grace=2.0))
        assert time.monotonic() - started >= 2.0
        value, kid = enc.encrypt(b"app-secret-late")
        conn.execute("INSERT INTO secrets VALUES (9999, %s, %s)", (value, kid))
    assert read_rows(dsn, Target("secrets"))[9999][1] == active_version(dsn, app.cfg)


@pytest.mark.parametrize("mode", ["Online", "Atomic"])
def test_an_open_transaction_older_than_the_new_key_is_waited_for(dsn: str, mode: Mode) -> None:
    """A write encrypted under the old key in a transaction that commits during the
    rotation is caught: the handover waits for the transactions in flight (in Atomic mode
    before it locks the table, so the lock then finds the row committed)."""
    app = make_app(dsn, 200, atomic=True)
    with Encryptor(app_dsn(dsn), app.kek) as enc, psycopg.connect(app_dsn(dsn)) as writer:
        value, kid = enc.encrypt(b"written under the old key")
        writer.execute("INSERT INTO secrets VALUES (9998, %s, %s)", (value, kid))
        # the transaction stays open while the rotation starts
        result: dict[str, object] = {}
        t = threading.Thread(target=lambda: result.update(r=app.engine().rotate(2, RotationOptions(
            mode=mode, batch_size=100, vacuum=False, grace=0.2))))
        t.start()
        time.sleep(1.5)
        assert t.is_alive(), "the rotation finished while an older transaction was open"
        writer.commit()
        t.join(30)
    res = result["r"]
    assert isinstance(res, RotationResult) and res.handover["transactions"] == 1
    rows = read_rows(dsn, Target("secrets"))
    assert rows[9998][1] == active_version(dsn, app.cfg)
    app.expected[app.target][9998] = b"written under the old key"
    app.assert_rotated(keys_for_policy=[(2, 1)])
