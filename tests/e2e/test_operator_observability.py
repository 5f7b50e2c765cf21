"""What a platform team scrapes and ships: Prometheus metrics, the liveness endpoint and
JSON logs, from the real operator process after a real rotation."""

from __future__ import annotations

import json
import re
import urllib.request

from tests.fixtures._env import testenv
from tests.fixtures.fix_cluster import Kubectl
from tests.fixtures.fix_operator import MakeApp, StartOperator


def _scrape(port: int) -> dict[str, float]:
    """Samples of the rotation_operator_* families, keyed by ``name{labels}``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    samples = {}
    for line in text.splitlines():
        m = re.match(r"^(rotation_operator_\w+(?:\{[^}]*\})?) (\S+)$", line)
        if m:
            samples[m.group(1)] = float(m.group(2))
    return samples


def test_metrics_liveness_and_json_logs(kubectl: Kubectl, namespace: str, dsn: str,
                                        make_app: MakeApp,
                                        start_operator: StartOperator) -> None:
    port = testenv.free_port()
    app = make_app(namespace, dsn, rows=400, legacy=100, batch_size=100, vacuum=False)
    op = start_operator([namespace], extra_args=("--metrics-port", str(port),
                                                 "--log-format", "json"))
    kubectl("wait", "encpol/app", "-n", namespace, "--for=condition=Ready", "--timeout=60s")
    app.patch_spec({"version": 2})
    kubectl("wait", "encpol/app", "-n", namespace,
            "--for=jsonpath={.status.observedVersion}=2", "--timeout=90s")

    labels = f'namespace="{namespace}",policy="app"'
    samples = _scrape(port)
    assert samples[f'rotation_operator_rotations_total{{{labels},result="succeeded"}}'] == 1
    assert samples[f"rotation_operator_rows_reencrypted_total{{{labels}}}"] == 400
    assert samples[f"rotation_operator_rotation_duration_seconds_count{{{labels}}}"] == 1
    assert samples[f"rotation_operator_active_key_version{{{labels}}}"] == 2
    assert samples[f"rotation_operator_legacy_rows{{{labels}}}"] == 0
    assert samples[f"rotation_operator_stale_rows{{{labels}}}"] == 0
    assert samples[f"rotation_operator_secret_rows{{{labels}}}"] == 400

    with urllib.request.urlopen(op.health_url, timeout=10) as resp:
        assert resp.status == 200

    lines = [line for line in op.log().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert any("rotated v1 -> v2" in r.get("message", "") for r in records)
