"""High availability through the real control plane (issue #12): two replicas with
leader election; exactly one acts, the standby stays silent, takes over when the leader is
killed, and an old leader that wakes up from a pause writes nothing and exits."""

from __future__ import annotations

import os
import re
import signal
import time
import urllib.request
from collections.abc import Callable

import psycopg

from tests.fixtures import roles
from tests.fixtures._env import testenv
from tests.fixtures.fix_cluster import Kubectl
from tests.fixtures.fix_operator import MakeApp, OperatorProcess, StartOperator, eventually

LEASE = ("--leader-elect", "--lease-duration", "3", "--renew-deadline", "2",
         "--retry-period", "0.5")


def _start(start_operator: StartOperator, namespace: str) -> tuple[OperatorProcess, int]:
    port = testenv.free_port()
    op = start_operator([namespace], extra_args=(*LEASE, "--metrics-port", str(port)))
    return op, port


def _leader_gauge(port: int) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    m = re.search(r"^rotation_operator_leader (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def _leading(ops: list[tuple[OperatorProcess, int]]) -> list[OperatorProcess]:
    return [op for op, port in ops if op.alive() and _leader_gauge(port) == 1.0]


def _holder(kubectl: Kubectl) -> str:
    lease = kubectl.json("get", "lease", "rotation-operator", "-n", "rotation-operator")
    return str(lease["spec"].get("holderIdentity") or "")


def test_one_replica_acts_and_the_standby_takes_over_when_it_is_killed(
        namespace: str, dsn: str, kubectl: Kubectl, make_app: MakeApp,
        start_operator: StartOperator, report_measure: Callable[[str], None]) -> None:
    """kill -9 of the leader in the middle of a rotation: the standby takes over, resumes
    it and finishes exactly one rotation."""
    app = make_app(namespace, dsn, rows=1500, legacy=100, batch_size=100, workers=1)
    with psycopg.connect(roles.app_dsn(app.dsn), autocommit=True) as conn:  # ~6 s rotation
        conn.execute("CREATE FUNCTION slow_rows() RETURNS trigger LANGUAGE plpgsql AS "
                     "$$ BEGIN PERFORM pg_sleep(0.004); RETURN NEW; END $$")
        conn.execute("CREATE TRIGGER slow_rows BEFORE UPDATE ON secrets FOR EACH ROW "
                     "EXECUTE FUNCTION slow_rows()")
    ops = [_start(start_operator, namespace), _start(start_operator, namespace)]
    eventually(lambda: len(_leading(ops)) == 1, timeout=20, what="exactly one leader")
    app.wait_condition("Ready", "True")
    (leader,) = _leading(ops)
    standby = next(op for op, _ in ops if op is not leader)
    time.sleep(3)  # several renewals and refreshes
    assert len(_leading(ops)) == 1
    assert "reconciled" in leader.log()
    quiet = standby.log()
    assert "reconciled" not in quiet and "Timer 'refresh'" not in quiet, quiet[-2000:]
    assert "standby" in quiet
    assert not app.events(reason="RotationStarted")

    app.patch_spec({"version": 2})
    eventually(lambda: (app.status().get("rotation") or {}).get("done", 0) >= 200,
               timeout=30, interval=0.1, what="the rotation to be under way")
    killed_at = time.monotonic()
    leader.kill()  # kill -9 mid-rotation: no release, the Lease must expire
    eventually(lambda: _leading(ops) == [standby], timeout=15, interval=0.1,
               what="the standby to take over")
    failover = time.monotonic() - killed_at
    assert failover < 3 + 0.5 + 2.0, f"failover took {failover:.1f}s"  # lease + retry + slack
    report_measure(f"HA: failover after kill -9 of the leader mid-rotation: {failover:.2f}s "
                   "(lease 3 s, retry 0.5 s)")
    obj = app.wait_condition("Ready", "True", "RotationSucceeded", timeout=90)
    assert obj["status"]["observedVersion"] == 2
    assert obj["status"]["rotation"]["resumed"] is True
    assert [(r[0], r[1]) for r in app.rotations()] == [(1, "baseline"), (2, "done")]
    assert [k["version"] for k in app.key_rows()] == [1, 2]  # exactly one rotation
    assert "resuming" in standby.log()
    app.assert_intact()


def test_an_old_leader_that_wakes_up_writes_nothing_and_exits(
        namespace: str, dsn: str, kubectl: Kubectl, make_app: MakeApp,
        start_operator: StartOperator) -> None:
    app = make_app(namespace, dsn, rows=100, legacy=10)
    ops = [_start(start_operator, namespace), _start(start_operator, namespace)]
    eventually(lambda: len(_leading(ops)) == 1, timeout=20, what="exactly one leader")
    app.wait_condition("Ready", "True")
    (old,) = _leading(ops)
    new = next(op for op, _ in ops if op is not old)
    os.kill(old.pid, signal.SIGSTOP)  # a frozen process: it cannot renew, or know it
    try:
        eventually(lambda: _leading([p for p in ops if p[0] is new]) == [new], timeout=15,
                   interval=0.1, what="the standby to take over from the frozen leader")
        holder = _holder(kubectl)
        app.patch_spec({"version": 2})
        app.wait_condition("Ready", "True", "RotationSucceeded", timeout=60)
        before = len(old.log())
    finally:
        os.kill(old.pid, signal.SIGCONT)
    code = old.wait_exit(10)
    assert code == 1
    woke = old.log()[before:]
    assert "stopped leading" in woke, woke
    assert "reconciled" not in woke
    assert _holder(kubectl) == holder
    assert new.alive()
    app.assert_intact()


def test_a_leader_stopped_cleanly_hands_over_at_once(
        namespace: str, dsn: str, make_app: MakeApp, start_operator: StartOperator) -> None:
    make_app(namespace, dsn, rows=20, legacy=0)
    ops = [_start(start_operator, namespace), _start(start_operator, namespace)]
    eventually(lambda: len(_leading(ops)) == 1, timeout=20, what="exactly one leader")
    (leader,) = _leading(ops)
    standby = next(op for op, _ in ops if op is not leader)
    stopped_at = time.monotonic()
    assert leader.stop() == 0
    eventually(lambda: _leading(ops) == [standby], timeout=10, interval=0.1,
               what="the standby to take over")
    assert time.monotonic() - stopped_at < 3.0  # well within the lease duration
    assert "released Lease" in leader.log()
