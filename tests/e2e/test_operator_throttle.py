"""Throttling through the real operator (issue #11): a streaming standby that stops
replaying makes the rotation wait, and says so in ``Throttled``, ``status.rotation``
and the metrics; once it replays again the rotation finishes, losing nothing."""

from __future__ import annotations

import urllib.request
from typing import Any

from tests.fixtures._env import testenv
from tests.fixtures.fix_operator import MakeApp, StartOperator, eventually


def test_replica_lag_throttles_the_rotation_visibly_until_the_replica_replays(
        namespace: str, dsn: str, make_app: MakeApp, start_operator: StartOperator,
        standby: Any, pg_monitor: None) -> None:
    app = make_app(namespace, dsn, rows=20_000, legacy=0, batch_size=500, workers=2,
                   rotation={"maxReplicationLag": "1s", "maxRowsPerSecond": 4000,
                             "graceSeconds": 0})
    port = testenv.free_port()
    start_operator([namespace], extra_args=("--metrics-port", str(port)))
    app.wait_condition("Ready", "True")
    standby.psql("SELECT pg_wal_replay_pause()")
    try:
        app.patch_spec({"version": 2})
        obj = app.wait_condition("Throttled", "True", timeout=60)
        cond = next(c for c in obj["status"]["conditions"] if c["type"] == "Throttled")
        assert cond["reason"] == "ReplicationLag"
        assert "maxReplicationLag 1s" in cond["message"]
        rotation = obj["status"]["rotation"]
        assert rotation["phase"] == "Running"
        assert rotation["maxRowsPerSecond"] == 4000
        assert rotation["throttle"]["reason"] == "ReplicationLag"
        assert rotation["throttle"]["lagSeconds"] >= 1.0  # above 1 s, shown to 0.1 s
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                         timeout=5).read().decode()
        assert any(line.startswith("rotation_operator_throttled{")
                   and 'reason="ReplicationLag"' in line and line.endswith(" 1.0")
                   for line in metrics.splitlines()), metrics[-2000:]
    finally:
        standby.psql("SELECT pg_wal_replay_resume()")
    obj = app.wait_condition("Ready", "True", timeout=120)
    assert obj["status"]["observedVersion"] == 2
    cond = next(c for c in obj["status"]["conditions"] if c["type"] == "Throttled")
    assert cond["status"] == "False"
    assert obj["status"]["rotation"].get("throttle") is None
    eventually(lambda: app.stale_count() == 0, timeout=10, what="every row moved")
    app.assert_intact()
