"""``verify`` tells the truth (issue #17, finding 6), on a real PostgreSQL with the
documented roles: a stuck or stopped rotation, a row that needs a disabled or destroyed key,
and a wrapped DEK altered by a database writer (the superuser here) are each reported with
their own counts, keys, reason and exit status; rotation totals count rows, not passes; a
rekey changes no value but legacy rows."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import kopf
import psycopg
import pytest

from rotation_operator.cli.exits import ExitStatus
from rotation_operator.crypto import codec as crypto
from rotation_operator.errors import InvalidToken, KeysetTampered, RotationStuck
from rotation_operator.library import Encryptor
from rotation_operator.policy.decisions import Request
from rotation_operator.rotation import inspection
from rotation_operator.rotation.engine import Engine
from rotation_operator.rotation.lifecycle import Lifecycle
from rotation_operator.store.keystore import KeyStore
from rotation_operator.store.rotations import RotationRecord
from tests.fixtures.fix_app import (
    ONLINE,
    App,
    Gate,
    audit_events,
    db_now,
    dump,
    in_thread,
    make_app,
    plaintext_for,
    read_rows,
    run_cli,
)
from tests.fixtures.keks import keks
from tests.fixtures.roles import admin_dsn, app_dsn

Progress = list[tuple[int, int]]


def _as_app(dsn: str, *statements: str) -> None:
    with psycopg.connect(app_dsn(dsn), autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def _as_admin(dsn: str, statement: str, params: tuple[Any, ...] = ()) -> None:
    """The attacker of the threat model: a database writer without the KEK."""
    with psycopg.connect(admin_dsn(dsn), autocommit=True) as conn:
        conn.execute(statement, params)



def _records(app: App) -> list[RotationRecord]:
    with psycopg.connect(app.dsn) as conn:
        return KeyStore(app.cfg).rotation_records(conn)


def _by_key(app: App, ids: set[int] | None = None) -> dict[str, int]:
    """Rows per key, counted from the table itself, not by the code under test."""
    out: dict[str, int] = {}
    for i, (_, kid) in read_rows(app.dsn, app.target).items():
        if ids is None or i in ids:
            name = "legacy" if kid is None else f"v{kid}"
            out[name] = out.get(name, 0) + 1
    return out


def _verify_json(app: App, kek: bytes | None = None) -> tuple[int, dict[str, Any]]:
    proc = run_cli("verify", "-o", "json", dsn=app.dsn, kek=kek or app.kek)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


# -- a stuck rotation ------------------------------------------------------------------------
def test_a_stuck_rotation_fails_verify_and_its_totals_count_rows(dsn: str) -> None:
    app = make_app(dsn, 300)  # ids % 4 == 0 are legacy rows, the rest under v1
    _as_app(dsn, "CREATE FUNCTION keep_tens() RETURNS trigger LANGUAGE plpgsql AS "
                 "$$ BEGIN IF NEW.id % 10 = 0 THEN RETURN NULL; END IF; RETURN NEW; END $$",
            "CREATE TRIGGER keep_tens BEFORE UPDATE ON secrets FOR EACH ROW "
            "EXECUTE FUNCTION keep_tens()")
    seen: Progress = []
    with pytest.raises(RotationStuck):
        app.engine().rotate(2, ONLINE, progress=lambda d, t: seen.append((d, t)))
    stuck = _by_key(app, {i for i in app.expected[app.target] if i % 10 == 0})
    assert stuck == {"legacy": 15, "v1": 15} and _by_key(app).get("v2") == 270

    # verify: not OK, naming the rotation, the counts and the keys
    rep = inspection.verify(dsn, app.cfg, keks(app.kek))
    assert not rep.ok and not rep.in_progress and rep.failures == []
    assert rep.pending == stuck
    assert rep.rotation == {"kind": "policy", "toVersion": 2, "reEncrypted": 270,
                            "total": 300, "inProgress": False}
    proc = run_cli("verify", dsn=dsn, kek=app.kek)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "rotation to v2 STOPPED" in proc.stdout
    assert "270 of 300 rows moved, 30 still under a non-active key (legacy: 15, v1: 15)" \
        in proc.stdout
    assert proc.stdout.rstrip().endswith("verify: FAILED")
    code, data = _verify_json(app)
    assert code == 1 and data["ok"] is False and data["pendingRotation"] == stuck

    # totals: the rows it has to move, however many passes tried the 30 it could not
    (running,) = [r for r in _records(app) if r.phase == "running"]
    assert (running.re_encrypted, running.total) == (270, 300)
    assert seen[-1] == (270, 300) and max(t for _, t in seen) == 300
    proc = run_cli("status", dsn=dsn, kek=None)
    assert proc.returncode == 0 and "270/300 rows" in proc.stdout, proc.stdout

    # resumed: this run moves the 30 left, and the record counts 300 rows in all
    _as_app(dsn, "DROP TRIGGER keep_tens ON secrets")
    again: Progress = []
    res = app.engine().rotate(2, ONLINE, progress=lambda d, t: again.append((d, t)))
    assert res.resumed and res.re_encrypted == 30
    assert again[0] == (0, 30) and again[-1] == (30, 30)
    (done,) = [r for r in _records(app) if r.kind == "policy" and r.phase == "done"]
    assert (done.id, done.re_encrypted, done.total) == (running.id, 300, 300)
    app.assert_rotated()
    assert run_cli("verify", dsn=dsn, kek=app.kek).returncode == ExitStatus.OK


def test_verify_during_a_running_rotation_says_try_again_later(dsn: str) -> None:
    app = make_app(dsn, 600, legacy_every=0)
    gate = Gate(at=2)  # parked after its first batch, holding the rotation lock
    thread, out = in_thread(lambda: app.engine().rotate(
        2, ONLINE.replace(workers=1), progress=gate))
    try:
        assert gate.entered.wait(60), out
        rep = inspection.verify(dsn, app.cfg, keks(app.kek))
        proc = run_cli("verify", dsn=dsn, kek=app.kek)
    finally:
        gate.release.set()
        thread.join(60)
    assert not rep.ok and rep.in_progress and rep.rotation is not None
    assert rep.rotation["inProgress"] and 0 < rep.pending["v1"] < 600
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "rotation to v2 is running" in proc.stdout
    assert "verify: NOT YET" in proc.stdout
    assert "result" in out, out
    assert run_cli("verify", dsn=dsn, kek=app.kek).returncode == ExitStatus.OK


# -- rows under a key no ring reads ----------------------------------------------------------
def test_verify_fails_while_a_row_needs_a_disabled_or_destroyed_key(dsn: str) -> None:
    app = make_app(dsn, 50, legacy_every=0)
    backup = read_rows(dsn, app.target)  # every row under v1
    app.engine().rotate(2, ONLINE)
    life = Lifecycle(dsn, app.cfg, actor="t")
    life.disable(1, db_now(dsn))
    current = read_rows(dsn, app.target)
    restored = [3, 7]
    for i in restored:  # rows of an old backup, put back by a database writer
        _as_admin(dsn, "UPDATE secrets SET value = %s, key_id = 1 WHERE id = %s",
                  (backup[i][0], i))
    rep = inspection.verify(dsn, app.cfg, keks(app.kek))
    assert not rep.ok and rep.failures == [] and rep.pending == {}
    assert rep.unusable == {"v1": {"state": "disabled", "rows": 2}}
    proc = run_cli("verify", dsn=dsn, kek=app.kek)
    assert proc.returncode == ExitStatus.FAILED, proc.stdout + proc.stderr
    assert "rows under disabled DEK v1: 2 (`keys enable 1` to read them)" in proc.stdout

    # destroyed: the rows go, the key is destroyed, the backup's rows come back
    for i in restored:
        _as_admin(dsn, "UPDATE secrets SET value = %s, key_id = 2 WHERE id = %s",
                  (current[i][0], i))
    assert inspection.verify(dsn, app.cfg, keks(app.kek)).ok
    life.destroy(1, db_now(dsn) + timedelta(days=8))
    _as_admin(dsn, "UPDATE secrets SET value = %s, key_id = 1 WHERE id = 3", (backup[3][0],))
    code, data = _verify_json(app)
    assert code == ExitStatus.FAILED and data["ok"] is False and data["failures"] == []
    assert data["underUnusableKeys"] == {"v1": {"state": "destroyed", "rows": 1}}
    proc = run_cli("verify", dsn=dsn, kek=app.kek)
    assert "rows under destroyed DEK v1: 1 (its DEK is erased" in proc.stdout


# -- a wrapped DEK altered by a database writer ----------------------------------------------
def test_an_altered_wrap_of_an_unused_retired_key_is_tampering_everywhere(
        dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fingerprint names the KEK presented, its wrap of v1 does not open: every path
    fails closed with KeysetTampered, naming v1, and writes nothing; the CLI exits 4."""
    app = make_app(dsn, 50)
    app.engine().rotate(2, ONLINE)  # v1 retired, no row under it
    assert _by_key(app) == {"v2": 50}
    _as_admin(dsn, "UPDATE encryption_keys SET wrapped_dek = "
                   "overlay(wrapped_dek placing '\\xff' from 20 for 1) WHERE version = 1")
    before = dump(dsn)

    for args in (("verify",), ("rotate",), ("init",)):
        proc = run_cli(*args, dsn=dsn, kek=app.kek)
        assert proc.returncode == 4, (args, proc.stdout, proc.stderr)
        assert "[KeysetTampered]" in proc.stderr and "wrapped DEK v1 (retired)" in proc.stderr
        assert "Traceback" not in proc.stderr and "verify: OK" not in proc.stdout

    with pytest.raises(KeysetTampered) as info:
        app.engine().rotate(3, ONLINE)
    assert info.value.reason == "KeysetTampered" and info.value.key_version == 1
    # the library: neither a value encrypted nor one decrypted under the altered keyset
    with Encryptor(app_dsn(dsn), app.kek) as enc:
        with pytest.raises(KeysetTampered, match="DEK v1") as lib:
            enc.encrypt(b"new-app-secret")
        assert lib.value.key_version == 1
        value, kid = read_rows(dsn, app.target)[1]
        with pytest.raises(KeysetTampered):
            enc.decrypt(value, kid)

    # the operator: Ready=False with the reason, a Warning Event naming the key, a retry
    patches, events = _operator_reconcile(app, monkeypatch)
    ready = next(c for c in patches[-1]["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "KeysetTampered")
    assert "DEK v1" in ready["message"]
    assert [(t, r) for t, r, _ in events] == [("Warning", "KeysetTampered")]
    assert "wrapped DEK v1" in events[0][2]

    assert dump(dsn) == before  # not one tuple written


def _operator_reconcile(app: App, monkeypatch: pytest.MonkeyPatch
                        ) -> tuple[list[dict[str, Any]], list[tuple[str, str, str]]]:
    """One reconcile of the operator's workflow inside its error boundary, with the status
    writes and Events recorded instead of sent to a cluster."""
    from rotation_operator.crypto.kek import as_kek
    from rotation_operator.operator import handlers, kube, settings, workflow
    from rotation_operator.operator.secrets import Keks
    from rotation_operator.operator.settings import OperatorSettings
    from rotation_operator.operator.spec import Policy
    from rotation_operator.operator.writer import StatusWriter

    patches: list[dict[str, Any]] = []
    events: list[tuple[str, str, str]] = []
    spec = {"version": 3, "targets": [{"table": "secrets"}],
            "rotation": {"vacuum": False, "graceSeconds": 0, "batchSize": 100}}
    monkeypatch.setattr(kube, "patch_status",
                        lambda ns, name, body, rv=None: patches.append(body))
    monkeypatch.setattr(kube, "get_policy", lambda ns, n: {
        "metadata": {"generation": 1, "uid": "", "resourceVersion": "1"}, "spec": spec,
        "status": {}})
    monkeypatch.setattr(settings, "current", OperatorSettings())

    class Events:
        def info(self, reason: str, message: str) -> None:
            events.append(("Normal", reason, message))

        def warn(self, reason: str, message: str) -> None:
            events.append(("Warning", reason, message))

    policy = Policy("ns", "app", 1, spec, {})
    with pytest.raises(kopf.TemporaryError, match="KeysetTampered"), \
            handlers.boundary(policy, Events()):  # type: ignore[arg-type]
        workflow._reconcile(policy, OperatorSettings(), Events(), StatusWriter(policy),
                            app.dsn, Keks(as_kek(app.kek), [], []), policy.store_config(),
                            policy.options())
    return patches, events


# -- what a rekey changes --------------------------------------------------------------------
def _tuples(dsn: str) -> dict[int, tuple[str, bytes, int | None]]:
    """id -> (xmin, value, key id): an equal entry is a row not even rewritten."""
    with psycopg.connect(admin_dsn(dsn)) as conn:
        return {r[0]: (r[1], bytes(r[2]), r[3]) for r in conn.execute(
            "SELECT id, xmin::text, value, key_id FROM secrets").fetchall()}


def test_a_rekey_changes_no_value_but_legacy_rows(dsn: str) -> None:
    """docs/format.md §3: a rekey rewraps DEKs; rows under a retired DEK stay as they are
    (the DEK they need is rewrapped), and only legacy rows, under the old KEK itself,
    move onto the active DEK.  verify keeps reporting the retired rows until a sweep."""
    app = make_app(dsn, 200, legacy_every=0)
    stale = app.ring()  # an application ring from before the rotation: v1 active
    # legacy reads kept open (spec.legacy.reads: Open): a legacy row written after the first
    # rotation is still read, so the rekey moves it (closed, it stays: tests/db/test_legacy.py)
    Engine(dsn, app.cfg, keks(app.kek), actor="t", legacy_reads="open").rotate(2, ONLINE)
    expected = dict(app.expected[app.target])
    with psycopg.connect(app_dsn(dsn), autocommit=True) as conn:
        for i in range(1001, 1011):  # a writer with a stale ring: rows under retired v1
            expected[i] = pt = plaintext_for(i)
            value, kid = stale.encrypt(pt)
            conn.execute("INSERT INTO secrets VALUES (%s, %s, %s)", (i, value, kid))
        for i in range(2001, 2006):  # and legacy rows, under the old KEK itself
            expected[i] = pt = plaintext_for(i)
            conn.execute("INSERT INTO secrets VALUES (%s, %s, NULL)",
                         (i, crypto.encrypt(app.kek, pt)))
    before = _tuples(dsn)
    assert _by_key(app) == {"v2": 200, "v1": 10, "legacy": 5}

    new = crypto.new_key()
    res = Engine(dsn, app.cfg, keks(new, app.kek), actor="rekey").execute(
        Request("rekey"), ONLINE)
    assert res.rekeyed == (1, 2)
    after = _tuples(dsn)
    assert {i for i in after if after[i] != before[i]} == set(range(2001, 2006))
    assert {after[i][2] for i in range(2001, 2006)} == {2}
    sweep = [r for r in _records(app) if r.kind == "sweep"][-1]
    assert (sweep.phase, sweep.re_encrypted, sweep.total) == ("done", 5, 5)
    swept = [d for e, _, d in audit_events(dsn, app.cfg) if e == "rows_swept"]
    assert swept[-1]["re_encrypted"] == 5

    # a reader holding only the new KEK reads every row; the old KEK opens no wrap
    with psycopg.connect(dsn) as conn:
        stored = KeyStore(app.cfg).list_keys(conn)
    deks = {k.version: crypto.unwrap_dek(new, k.wrapped_dek, k.version) for k in stored}
    for k in stored:
        with pytest.raises(InvalidToken):
            crypto.unwrap_dek(app.kek, k.wrapped_dek, k.version)
    assert {i: crypto.decrypt(deks[kid], v) for i, (_, v, kid) in after.items()
            if kid is not None} == expected
    # verify: the ten rows under retired v1 are still reported, until a sweep moves them
    code, data = _verify_json(app, new)
    assert code == ExitStatus.FAILED and data["underRetiredKeys"] == {"v1": 10}
    assert Engine(dsn, app.cfg, keks(new), actor="t").sweep(ONLINE).re_encrypted == 10
    assert _verify_json(app, new)[0] == ExitStatus.OK
