"""Rotations driven through the Kubernetes API, checked against the database.

The operator runs as a local subprocess under the manifests' RBAC identity; every test
reads the database back (keys table, rows, decrypted plaintexts) rather than trusting the
status alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psycopg

from tests.fixtures._env import unique_name
from tests.fixtures.fix_cluster import Kubectl
from tests.fixtures.fix_operator import (
    ENCPOL,
    App,
    MakeApp,
    OperatorProcess,
    PolicyWatch,
    StartOperator,
    eventually,
)
from tests.fixtures.roles import app_dsn


def _ready_current(obj: dict[str, Any]) -> bool:
    conds = (obj.get("status") or {}).get("conditions") or []
    ready = next((c for c in conds if c.get("type") == "Ready"), None)
    return bool(ready and ready.get("status") == "True"
                and ready.get("observedGeneration") == obj["metadata"]["generation"])


def _assert_rotated(app: App, active: int) -> None:
    """The database finished a rotation to DEK ``active``: no row elsewhere, no loss."""
    keys = app.key_rows()
    assert [k["version"] for k in keys if k["state"] == "active"] == [active]
    assert all(k["state"] == "retired" for k in keys if k["version"] != active)
    assert app.stale_count() == 0
    app.assert_intact()


def test_pipeline_patch_then_kubectl_wait(kubectl: Kubectl, namespace: str, dsn: str,
                                          make_app: MakeApp, start_operator: StartOperator,
                                          watch_policy: Callable[[App], PolicyWatch]) -> None:
    app = make_app(namespace, dsn, rows=3000, legacy=1000, batch_size=100, vacuum=False)
    op = start_operator([namespace])
    kubectl("wait", "encpol/app", "-n", namespace, "--for=condition=Ready", "--timeout=60s")

    # 1. The pre-bump Ready=True must not satisfy `kubectl wait` after the bump.  Made
    # deterministic by bumping while no operator runs: the stale condition stays put.
    op.stop()
    kubectl("patch", "encpol", "app", "-n", namespace, "--type=merge",
            "-p", '{"spec":{"version":2}}')
    obj = app.get()
    assert obj["metadata"]["generation"] == 2
    ready = app.condition("Ready", obj)
    assert ready is not None and ready["status"] == "True"
    assert ready["observedGeneration"] == 1  # what lets kubectl tell it is stale
    early = kubectl("wait", "encpol/app", "-n", namespace, "--for=condition=Ready",
                    "--timeout=3s", check=False)
    assert early.returncode != 0, "kubectl wait accepted the pre-bump Ready condition"
    assert "timed out" in early.stderr

    start_operator([namespace])
    kubectl("wait", "encpol/app", "-n", namespace,
            "--for=jsonpath={.status.observedVersion}=2", "--timeout=90s")
    _assert_rotated(app, 2)
    kubectl("wait", "encpol/app", "-n", namespace, "--for=condition=Ready", "--timeout=60s")
    _assert_rotated(app, 2)

    # 2. With the operator running: patch, then wait at once.  A watch records every
    # version of the object, so an early Ready=True for the new generation is caught even
    # if kubectl wait happened to miss it.
    watch = watch_policy(app)
    kubectl("patch", "encpol", "app", "-n", namespace, "--type=merge",
            "-p", '{"spec":{"version":3}}')
    kubectl("wait", "encpol/app", "-n", namespace, "--for=condition=Ready", "--timeout=90s")
    _assert_rotated(app, 3)
    assert app.status()["observedVersion"] == 3
    kubectl("wait", "encpol/app", "-n", namespace,
            "--for=jsonpath={.status.observedVersion}=3", "--timeout=5s")
    seen = watch.stop()
    gen3 = [o for o in seen if o["metadata"]["generation"] == 3]
    assert gen3, "the watch saw no object of the new generation"
    first_ready = next(i for i, o in enumerate(gen3) if _ready_current(o))
    # Every version before Ready=True (current) still described the old keys...
    for o in gen3[:first_ready]:
        assert (o.get("status") or {}).get("observedVersion") == 2
    # ...and when it turned True the status already described the finished rotation.
    done = gen3[first_ready]["status"]
    assert done["observedVersion"] == 3 and done["activeKeyVersion"] == 3
    assert done["staleCount"] == 0
    # The operator flagged the rotation (Ready=False for the new generation) first.
    flagged = [app.condition("Ready", o) for o in gen3[:first_ready]]
    assert any(c and c["status"] == "False" and c["reason"] == "Rotating"
               and c["observedGeneration"] == 3 for c in flagged), flagged


def test_rotating_condition_and_progress(namespace: str, dsn: str, make_app: MakeApp,
                                         start_operator: StartOperator,
                                         watch_policy: Callable[[App], PolicyWatch]) -> None:
    rows = 20_000
    app = make_app(namespace, dsn, rows=rows, legacy=5_000, batch_size=500, vacuum=False)
    start_operator([namespace], progress_interval=0.02)
    app.wait_condition("Ready", "True", timeout=60)
    watch = watch_policy(app)

    # An application transaction holds one row late in the table, so the rotation stops
    # there (its UPDATE waits) after publishing progress for the batches before: the
    # in-between state is observed by polling without any race against a fast machine.
    with psycopg.connect(app_dsn(dsn)) as blocker:  # the application holds a row
        blocker.execute("SELECT 1 FROM secrets WHERE id = 16000 FOR UPDATE")

        def in_progress() -> dict[str, Any] | None:
            obj = app.get()
            cond = app.condition("Rotating", obj)
            rot = (obj.get("status") or {}).get("rotation") or {}
            if cond and cond["status"] == "True" and rot.get("phase") == "Running" \
                    and 0 < rot.get("done", 0) < rot.get("total", 0):
                return obj
            return None

        app.patch_spec({"version": 2})
        polled = eventually(in_progress, timeout=60, interval=0.2,
                            what="Rotating=True with partial progress")
        assert polled["metadata"]["generation"] == 2
        rotating = app.condition("Rotating", polled)
        assert rotating is not None and rotating["observedGeneration"] == 2
        assert rotating["reason"] == "RotationRunning"
        ready = app.condition("Ready", polled)
        assert ready is not None and (ready["status"], ready["reason"]) == ("False", "Rotating")
        rot = polled["status"]["rotation"]
        assert rot["total"] == rows and 0 < rot["done"] < rows
        assert rot["progress"].startswith(f"{rot['done']}/{rows} (")
        assert rot["policyVersion"] == 2 and rot["mode"] == "Online"
        # The database agrees that the rotation is under way and not finished.
        assert app.rotations()[-1][:2] == (2, "running")
        assert 0 < app.stale_count() < rows
        blocker.commit()

    final = app.wait_condition("Ready", "True", "RotationSucceeded", timeout=120)
    seen = watch.stop()
    _assert_rotated(app, 2)

    during = [o for o in seen if o["metadata"]["generation"] == 2
              and (app.condition("Rotating", o) or {}).get("status") == "True"]
    assert during, "the watch saw no object version with Rotating=True"
    for o in during:
        assert app.cond("Ready", o)["status"] == "False"
    dones = [o["status"]["rotation"]["done"] for o in during
             if (o["status"].get("rotation") or {}).get("phase") == "Running"]
    assert dones == sorted(dones), f"progress went backwards: {dones}"
    rot = final["status"]["rotation"]
    assert rot["phase"] == "Succeeded"
    assert (rot["done"], rot["total"], rot["reEncrypted"]) == (rows, rows, rows)
    assert rot["legacyMigrated"] == 5_000
    assert rot["progress"] == f"{rows}/{rows} (100%)"
    assert app.cond("Rotating", final)["status"] == "False"


def test_kill_mid_rotation_then_restart(namespace: str, dsn: str, make_app: MakeApp,
                                        start_operator: StartOperator) -> None:
    # workers=1: batches run in the operator process itself, where the fault point kills
    # the operator (in a parallel worker it would kill only that worker).
    app = make_app(namespace, dsn, rows=1000, legacy=300, batch_size=100, vacuum=False,
                   workers=1)
    op = start_operator([namespace], env={"ROTATION_OPERATOR_FAULT": "after-batch:2"})
    app.wait_condition("Ready", "True")
    app.patch_spec({"version": 2})
    assert op.wait_exit(60) == -9  # SIGKILLed itself after the second batch

    # Mid-rotation in the database: new key active, old retiring, two batches moved.
    keys = app.key_rows()
    assert [(k["version"], k["state"]) for k in keys] == [(1, "retiring"), (2, "active")]
    moved = sum(1 for kid, _ in app.rows().values() if kid == 2)
    assert 0 < moved < 1000
    assert app.rotations() == [(1, "baseline", None, 1, 0), (2, "running", 1, 2, moved)]
    app.assert_intact()  # nothing lost even now
    status = app.status()
    assert app.cond("Rotating")["status"] == "True"
    assert status.get("observedVersion") == 1

    restarted = start_operator([namespace])
    obj = app.wait_condition("Ready", "True", "RotationSucceeded", timeout=90)
    # Resumed once: not once as "resume" and again as "update" of the changed spec.
    log = eventually(lambda: (lambda t: t if "is processed" in t else None)(restarted.log()),
                     timeout=10, what="Kopf to finish the cycle")
    assert log.count("reconciled:") == 1, log
    keys = app.key_rows()
    assert [k["version"] for k in keys if k["policy_version"] == 2] == [2], keys
    assert [(k["version"], k["state"]) for k in keys] == [(1, "retired"), (2, "active")]
    assert app.stale_count() == 0
    app.assert_intact()
    assert [r[:2] for r in app.rotations()] == [(1, "baseline"), (2, "done")]
    assert app.rotations()[-1][4] == 1000  # every row counted once
    rot = obj["status"]["rotation"]
    assert rot["phase"] == "Succeeded" and rot["resumed"] is True
    assert obj["status"]["observedVersion"] == 2 and obj["status"]["staleCount"] == 0
    assert len(app.events(reason="RotationFinished")) == 1


def test_delete_and_recreate_does_not_rotate(kubectl: Kubectl, namespace: str, dsn: str,
                                             make_app: MakeApp,
                                             operator: OperatorProcess) -> None:
    app = make_app(namespace, dsn, rows=200, legacy=50)
    app.wait_condition("Ready", "True")
    app.patch_spec({"version": 2})
    app.wait_condition("Ready", "True", "RotationSucceeded")
    before = app.db_state()

    kubectl("delete", ENCPOL, "app", "-n", namespace, "--wait=true", "--timeout=30s")
    time.sleep(1)  # deleting stops management only: nothing may happen to the keys
    assert app.db_state() == before
    app.apply_policy(version=2)
    obj = app.wait_condition("Ready", "True", "KeysReady")
    uid = obj["metadata"]["uid"]
    assert obj["status"]["observedVersion"] == 2 and obj["status"]["activeKeyVersion"] == 2
    time.sleep(3)  # one more refresh cycle: still nothing rotates
    assert app.db_state() == before
    assert app.events(reason="RotationStarted", uid=uid) == []
    assert len(app.events(reason="RotationStarted")) == 1  # the one of the first object


def test_two_policies_in_two_namespaces(kubectl: Kubectl, namespace: str, dsn: str,
                                        make_app: MakeApp, make_database: Callable[[], str],
                                        start_operator: StartOperator) -> None:
    other_ns = unique_name("t", "two-policies-b", 63, "-")
    kubectl("create", "namespace", other_ns)
    try:
        a = make_app(namespace, dsn, rows=150, legacy=50)
        b = make_app(other_ns, make_database(), rows=120, legacy=120)  # same policy name
        start_operator([namespace, other_ns])
        a.wait_condition("Ready", "True")
        b.wait_condition("Ready", "True")
        b_before = b.db_state()

        a.patch_spec({"version": 2})
        a.wait_condition("Ready", "True", "RotationSucceeded")
        _assert_rotated(a, 2)
        time.sleep(3)  # a refresh cycle of both
        assert b.db_state() == b_before
        b_status = b.status()
        assert (b_status["observedVersion"], b_status["activeKeyVersion"]) == (1, 1)
        assert b_status["legacyCount"] == 120
        assert b.events(reason="RotationStarted") == []

        a_before = a.db_state()
        b.patch_spec({"version": 5})
        b.wait_condition("Ready", "True", "RotationSucceeded")
        _assert_rotated(b, 2)
        assert b.status()["observedVersion"] == 5
        assert a.db_state() == a_before
        assert a.status()["observedVersion"] == 2
    finally:
        kubectl("delete", "namespace", other_ns, "--wait=false", check=False)


def test_cluster_wide_operator_as_deployed(kubectl: Kubectl, namespace: str, dsn: str,
                                           make_app: MakeApp,
                                           start_operator: StartOperator) -> None:
    """The Deployment's mode: no namespace flag, the ClusterRole as the only grant."""
    # Without a controller-manager, deleted namespaces stay Terminating with their
    # policies in them (earlier tests'); remove those so the operator is not busy
    # failing on their dropped databases.
    terminating = {n["metadata"]["name"] for n in kubectl.json("get", "namespaces")["items"]
                   if n["status"].get("phase") == "Terminating"}
    for ns in sorted({i["metadata"]["namespace"]
                      for i in kubectl.json("get", ENCPOL, "-A")["items"]} & terminating):
        kubectl("delete", ENCPOL, "--all", "-n", ns, "--wait=false", check=False)
    op = start_operator([])
    app = make_app(namespace, dsn, rows=80, legacy=30)
    app.wait_condition("Ready", "True")
    app.patch_spec({"version": 2})
    app.wait_condition("Ready", "True", "RotationSucceeded")
    _assert_rotated(app, 2)
    log = op.log()
    # Everything the cluster-wide mode needs is granted (Kopf would log 403s and fall back).
    assert "Not enough permissions" not in log, log[-4000:]
    assert 'forbidden: User "system:serviceaccount' not in log, log[-4000:]
