"""Failing closed: missing Secret, wrong KEK, unreachable database, missing RBAC.

Each failure must show as Ready=False with a specific reason, a Warning Event with that
reason, and no write at all to the database; and nothing secret may leak into the
operator's log, the Events or the status.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from rotation_operator.crypto import codec as crypto
from tests.fixtures._env import REPO_ROOT, testenv
from tests.fixtures.fix_cluster import Kubectl
from tests.fixtures.fix_operator import (
    ENCPOL,
    KEK_SECRET,
    App,
    MakeApp,
    OperatorProcess,
    PolicyWatch,
    StartOperator,
    eventually,
)

#: Long enough for one reconcile retry-less window plus two refresh-timer runs (2s).
SETTLE = 4.5


def _assert_failed(app: App, reason: str, *, message: str) -> dict[str, Any]:
    """Ready=False/Degraded=True with ``reason``, and a Warning Event with that reason."""
    obj = app.wait_condition("Ready", "False", reason)
    ready = app.condition("Ready", obj)
    assert ready is not None and message in ready["message"], ready
    degraded = app.condition("Degraded", obj)
    assert degraded is not None and (degraded["status"], degraded["reason"]) == ("True", reason)
    rotating = app.condition("Rotating", obj)
    assert rotating is not None and rotating["status"] == "False"
    events = app.wait_event(reason, "Warning")
    assert any(message in ev["message"] for ev in events), events
    return obj


def _assert_clean_log(op: OperatorProcess) -> None:
    """Failures are reported, not crashed on: no unhandled exception in any handler."""
    log = op.log()
    assert "Traceback" not in log, log[-6000:]


def test_missing_kek_secret(namespace: str, dsn: str, make_app: MakeApp,
                            operator: OperatorProcess) -> None:
    app = make_app(namespace, dsn, rows=40, legacy=40, kek_secret=False)  # fresh database
    before = app.db_state()
    assert not before["has_keys_table"]
    _assert_failed(app, "SecretMissing",
                   message=f"KEK: Secret {namespace}/{KEK_SECRET} does not exist")
    time.sleep(SETTLE)  # the refresh timer runs meanwhile: it must not write either
    assert app.db_state() == before  # not even the key tables were created
    assert app.cond("Ready")["reason"] == "SecretMissing"
    assert app.events(reason="RotationStarted") == []
    _assert_clean_log(operator)

    # Creating the Secret heals the policy without a spec change (the retry).
    app.set_secret(KEK_SECRET, "kek", app.kek.hex())
    obj = app.wait_condition("Ready", "True", "KeysReady")
    assert app.cond("Degraded", obj)["status"] == "False"
    assert [(k["version"], k["state"]) for k in app.key_rows()] == [(1, "active")]
    assert app.rows() == before["rows"]  # a fresh policy records its version: no rotation
    _assert_clean_log(operator)


def test_kek_secret_deleted_later_keeps_ready_false_until_restored(
    kubectl: Kubectl, namespace: str, dsn: str, make_app: MakeApp, operator: OperatorProcess,
    watch_policy: Callable[[App], PolicyWatch],
) -> None:
    app = make_app(namespace, dsn, rows=30, legacy=10)
    app.wait_condition("Ready", "True")
    before = app.db_state()
    kubectl("delete", "secret", KEK_SECRET, "-n", namespace)
    watch = watch_policy(app)
    app.patch_spec({"rotation": {"batchSize": 200}})  # a spec change, same version
    _assert_failed(app, "SecretMissing",
                   message=f"KEK: Secret {namespace}/{KEK_SECRET} does not exist")
    time.sleep(SETTLE + 2)  # several refresh runs and reconcile retries
    # Once failed, Ready stays False while the Secret is missing: the refresh timer
    # (which itself needs only the DSN) must not declare the policy healed.
    readies = [app.condition("Ready", o) for o in watch.stop()]
    first = next(i for i, c in enumerate(readies) if c and c["reason"] == "SecretMissing")
    flaps = [c for c in readies[first:] if c and c["status"] == "True"]
    assert not flaps, flaps
    assert app.db_state() == before

    app.set_secret(KEK_SECRET, "kek", app.kek.hex())
    app.wait_condition("Ready", "True", "KeysReady")
    assert app.db_state()["keys"] == before["keys"]
    _assert_clean_log(operator)


def test_wrong_kek(namespace: str, dsn: str, make_app: MakeApp,
                   start_operator: StartOperator) -> None:
    app = make_app(namespace, dsn, rows=60, legacy=20)  # keys table made with the right KEK
    op = start_operator([namespace])
    app.wait_condition("Ready", "True")
    before = app.db_state()

    wrong = os.urandom(32)
    app.set_secret(KEK_SECRET, "kek", wrong.hex())
    app.patch_spec({"version": 2})
    obj = _assert_failed(app, "KEKMismatch",
                         message="is not the one that wrapped DEK v1")
    # Only the presented KEK's fingerprint is named, never the right one's (an oracle).
    message = app.cond("Ready", obj)["message"]
    assert crypto.kek_fingerprint(wrong) in message
    assert crypto.kek_fingerprint(app.kek) not in message
    assert obj["status"]["observedVersion"] == 1 and obj["status"]["activeKeyVersion"] == 1
    time.sleep(SETTLE)
    after = app.db_state()
    assert after["keys"] == before["keys"]  # no new key, nothing re-wrapped
    assert after["rows"] == before["rows"]  # not one value rewritten
    assert after == before  # nor rotation records or audit events
    assert app.events(reason="RotationStarted") == []
    _assert_clean_log(op)

    # Fixing the Secret heals it without a spec change, and the pending bump then
    # rotates exactly once, losing nothing.
    app.set_secret(KEK_SECRET, "kek", app.kek.hex())
    app.wait_condition("Ready", "True", "RotationSucceeded")
    assert app.active_version() == 2 and app.stale_count() == 0
    assert [k["version"] for k in app.key_rows() if k["policy_version"] == 2] == [2]
    app.assert_intact()
    _assert_clean_log(op)


def test_wrong_kek_on_a_fresh_database_with_legacy_rows(namespace: str, dsn: str,
                                                        make_app: MakeApp,
                                                        operator: OperatorProcess) -> None:
    app = make_app(namespace, dsn, rows=20, legacy=20, secret_kek=os.urandom(32))

    def settled() -> dict[str, Any] | None:
        obj = app.get()
        ready = app.condition("Ready", obj)
        return obj if ready and ready.get("observedGeneration") == 1 else None
    obj = eventually(settled, timeout=30, what="a Ready condition")
    assert not app.has_keys_table(), "keys were created under a KEK no legacy row opens"
    ready = app.condition("Ready", obj)
    assert ready is not None and ready["status"] == "False" and ready["reason"] == "KEKMismatch"
    assert "legacy row" in ready["message"]


def test_unreachable_database(namespace: str, dsn: str, make_app: MakeApp,
                              operator: OperatorProcess) -> None:
    password = f"pw-{secrets.token_hex(8)}"
    closed = f"postgresql://app:{password}@127.0.0.1:{testenv.free_port()}/appdb"
    app = make_app(namespace, dsn, rows=30, legacy=10, db_secret=closed)
    before = app.db_state()
    obj = _assert_failed(app, "DatabaseUnavailable", message="cannot connect to PostgreSQL")
    time.sleep(SETTLE)
    assert app.db_state() == before  # the real database was never touched
    # The DSN's password appears nowhere.
    seen = json.dumps(obj) + json.dumps(app.events()) + operator.log()
    assert password not in seen
    _assert_clean_log(operator)

    # Pointing the Secret at the real database heals it.
    app.set_secret("app-db", "dsn", dsn)
    app.wait_condition("Ready", "True", "KeysReady")
    assert app.active_version() == 1
    app.assert_intact()


# --------------------------------------------------------------------------- RBAC


class SecretsRule:
    """Removes the ``get secrets`` rule from the manifests' ClusterRole and puts it back."""

    def __init__(self, kubectl: Kubectl, kubeconfig: str, namespace: str) -> None:
        self.kubectl, self.kubeconfig, self.namespace = kubectl, kubeconfig, namespace
        self.removed = False

    def allowed(self) -> bool:
        proc = self.kubectl("auth", "can-i", "get", "secrets", "-n", self.namespace,
                            kubeconfig=self.kubeconfig, check=False)
        return proc.stdout.strip() == "yes"

    def remove(self) -> None:
        role = self.kubectl.json("get", "clusterrole", "rotation-operator")
        for key in ("resourceVersion", "uid", "creationTimestamp", "managedFields",
                    "generation"):
            role["metadata"].pop(key, None)
        kept = [r for r in role["rules"] if "secrets" not in r.get("resources", [])]
        assert len(kept) == len(role["rules"]) - 1
        self.removed = True
        self.kubectl("replace", "-f", "-", input=json.dumps({**role, "rules": kept}))
        eventually(lambda: not self.allowed(), timeout=30,
                   what="the RBAC change to reach the authorizer")

    def restore(self) -> None:
        if self.removed:
            self.kubectl("apply", "-k", str(REPO_ROOT / "manifests"))
            eventually(self.allowed, timeout=30, what="the restored RBAC rule")
            self.removed = False


@pytest.fixture
def secrets_rule(kubectl: Kubectl, operator_installed: str,
                 control_plane: testenv.ControlPlane, namespace: str) -> Iterator[SecretsRule]:
    rule = SecretsRule(kubectl, str(control_plane.operator_kubeconfig), namespace)
    try:
        yield rule
    finally:
        rule.restore()  # whatever happened: later tests need the manifests' RBAC


def test_manifest_rbac_is_enough_and_a_missing_rule_is_forbidden(
    kubectl: Kubectl, namespace: str, dsn: str, make_app: MakeApp,
    start_operator: StartOperator, control_plane: testenv.ControlPlane,
    secrets_rule: SecretsRule,
) -> None:
    # The operator runs as the service account, bound only by manifests/rbac.yaml...
    who = kubectl.json("auth", "whoami", kubeconfig=control_plane.operator_kubeconfig)
    assert who["status"]["userInfo"]["username"] == testenv.OPERATOR_USER
    assert secrets_rule.allowed()
    # ...which grants get on Secrets, not list (least privilege).
    assert kubectl("auth", "can-i", "list", "secrets", "-n", namespace,
                   kubeconfig=control_plane.operator_kubeconfig, check=False
                   ).stdout.strip() == "no"

    app = make_app(namespace, dsn, rows=30, legacy=30)
    secrets_rule.remove()
    op = start_operator([namespace])
    obj = _assert_failed(app, "Forbidden",
                         message=f"may not get Secret {namespace}/{KEK_SECRET}")
    ready = app.condition("Ready", obj)
    assert ready is not None and "grant get on secrets" in ready["message"]
    assert not app.has_keys_table()  # nothing written
    _assert_clean_log(op)

    # With the rule back, the same policy heals on its own.
    secrets_rule.restore()
    app.wait_condition("Ready", "True", "KeysReady")
    assert app.active_version() == 1
    app.assert_intact()


# --------------------------------------------------------------------------- leaks


def _forms(key: bytes) -> list[str]:
    """Ways key bytes could be printed: hex (both cases), base64 (standard, URL-safe,
    unpadded), and the bytes repr's body."""
    b64 = base64.b64encode(key).decode()
    url = base64.urlsafe_b64encode(key).decode()
    return [key.hex(), key.hex().upper(), b64, url, b64.rstrip("="), repr(key)[2:-1]]


def test_no_key_material_or_plaintext_leaks(kubectl: Kubectl, namespace: str, dsn: str,
                                            make_app: MakeApp,
                                            start_operator: StartOperator) -> None:
    app = make_app(namespace, dsn, rows=200, legacy=60)
    op = start_operator([namespace], extra_args=["--verbose"])  # debug logs too
    app.wait_condition("Ready", "True")
    app.patch_spec({"version": 2})
    app.wait_condition("Ready", "True", "RotationSucceeded")
    # Then a failure: a wrong KEK, a bump, KEKMismatch.
    wrong = os.urandom(32)
    app.set_secret(KEK_SECRET, "kek", wrong.hex())
    app.patch_spec({"version": 3})
    app.wait_condition("Ready", "False", "KEKMismatch")
    app.wait_event("KEKMismatch", "Warning")
    time.sleep(2.5)  # a refresh cycle with the wrong KEK in place
    op.stop()

    log = op.log()
    events = json.dumps(kubectl.json("get", "events", "-n", namespace))
    policy = json.dumps(kubectl.json("get", ENCPOL, app.name, "-n", namespace))
    assert "rotated v1 -> v2" in log and "DEK v" in events and "KEKMismatch" in policy

    deks = app.deks()
    assert sorted(deks) == [1, 2]
    needles: dict[str, str] = {}
    for name, key in [("KEK", app.kek), ("wrong KEK", wrong),
                      *((f"DEK v{v}", dek) for v, dek in deks.items())]:
        for form in _forms(key):
            needles[form] = name
    for row_id, plain in app.plaintexts.items():
        needles[plain.decode()] = f"plaintext of row {row_id}"
    for where, text in [("operator log", log), ("events", events), ("policy", policy)]:
        leaked = sorted({name for needle, name in needles.items() if needle in text})
        assert not leaked, f"{where} contains {leaked}"


def test_undecryptable_row_stops_the_rotation_until_repaired(
    namespace: str, dsn: str, make_app: MakeApp, operator: OperatorProcess,
) -> None:
    app = make_app(namespace, dsn, rows=500, legacy=100, batch_size=100)
    app.wait_condition("Ready", "True")
    bad_id = 250
    garbage = b"RO\x01" + os.urandom(40)  # our format, but fails authentication
    with app.connect() as conn:
        conn.execute("UPDATE secrets SET value = %s WHERE id = %s", (garbage, bad_id))

    app.patch_spec({"version": 2})
    obj = _assert_failed(app, "RowDecryptFailed",
                         message=f"row {bad_id} of table secrets does not decrypt")
    rotating = app.condition("Rotating", obj)
    assert rotating is not None and rotating["reason"] == "RotationFailed", rotating
    rot = obj["status"]["rotation"]
    assert rot["phase"] == "Failed" and f"row {bad_id}" in rot["message"]
    assert rot["total"] == 500 and 0 <= rot["done"] < 500  # not reset by the failure
    assert obj["status"]["observedVersion"] == 1
    # Stopped, resumable: the bad row untouched, every other row still readable.
    assert app.rows()[bad_id] == (1, garbage)
    expected = {i: p for i, p in app.plaintexts.items() if i != bad_id}
    deks = app.deks()
    for row_id, (kid, value) in app.rows().items():
        if row_id != bad_id:
            key = app.kek if kid is None else deks[kid]
            assert crypto.decrypt(key, value) == expected[row_id]
    _assert_clean_log(operator)

    # Repairing the row (the application rewrites it) lets the retry finish the rotation.
    with app.connect() as conn:
        conn.execute("UPDATE secrets SET value = %s, key_id = NULL WHERE id = %s",
                     (crypto.encrypt(app.kek, app.plaintexts[bad_id]), bad_id))
    obj = app.wait_condition("Ready", "True", "RotationSucceeded")
    assert obj["status"]["rotation"]["resumed"] is True
    assert [k["version"] for k in app.key_rows() if k["policy_version"] == 2] == [2]
    assert app.active_version() == 2 and app.stale_count() == 0
    app.assert_intact()
    assert app.cond("Degraded", obj)["status"] == "False"
