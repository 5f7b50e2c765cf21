"""A real Prometheus scrapes the running operator (issue #12): a rotation's metrics arrive
through its HTTP API, and the shipped stalled-rotation alert fires on a rotation that
stops committing batches.

The alert is the shipped rule with its two 15-minute windows scaled to 15 seconds (the
test cannot wait a quarter of an hour); ``promtool test rules`` checks the real windows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import yaml

from tests.fixtures import roles
from tests.fixtures._env import testenv
from tests.fixtures.fix_operator import MakeApp, StartOperator, eventually
from tests.fixtures.fix_prometheus import StartPrometheus

REPO = Path(__file__).resolve().parents[2]
STALLED = "RotationOperatorRotationStalled"


def _scaled_rules(out: Path) -> Path:
    rules = yaml.safe_load((REPO / "manifests/monitoring/rules.yml").read_text())
    found = 0
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == STALLED:
                expr = rule["expr"]
                assert "[15m]" in expr and "> 900" in expr, expr
                rule["expr"] = expr.replace("[15m]", "[15s]").replace("> 900", "> 15")
                found += 1
    assert found == 1
    path = out / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    return path


def _value(result: list[dict[str, Any]]) -> float | None:
    return float(result[0]["value"][1]) if result else None


def test_prometheus_sees_a_rotation_and_fires_the_stalled_alert(
        namespace: str, dsn: str, make_app: MakeApp, start_operator: StartOperator,
        prometheus: StartPrometheus, tmp_path: Path) -> None:
    app = make_app(namespace, dsn, rows=300, legacy=30, rotation={"graceSeconds": 0})
    port = testenv.free_port()
    start_operator([namespace], extra_args=("--metrics-port", str(port)))
    app.wait_condition("Ready", "True")
    prom = prometheus([f"127.0.0.1:{port}"], _scaled_rules(tmp_path))
    sel = f'{{job="rotation-operator",namespace="{namespace}",policy="{app.name}"}}'

    app.patch_spec({"version": 2})
    app.wait_condition("Ready", "True", "RotationSucceeded")
    eventually(lambda: _value(prom.query(f"rotation_operator_rows_reencrypted_total{sel}"))
               == 300.0, timeout=30, interval=0.5, what="the rotation's rows in Prometheus")
    assert _value(prom.query(f"rotation_operator_active_key_version{sel}")) == 2.0
    assert _value(prom.query(f'rotation_operator_rotations_total{{job="rotation-operator",'
                             f'namespace="{namespace}",result="succeeded"}}')) == 1.0
    assert _value(prom.query('sum(rotation_operator_leader{job="rotation-operator"})')) == 1.0

    # A rotation that stops committing batches: a trigger holds its first batch.
    with psycopg.connect(roles.app_dsn(app.dsn), autocommit=True) as conn:
        conn.execute("CREATE FUNCTION hold() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                     "IF NEW.key_id = 3 THEN PERFORM pg_sleep(600); END IF; RETURN NEW; END $$")
        conn.execute("CREATE TRIGGER hold BEFORE UPDATE ON secrets FOR EACH ROW "
                     "EXECUTE FUNCTION hold()")
    app.patch_spec({"version": 3})
    app.wait_condition("Rotating", "True")
    eventually(lambda: _value(prom.query(f"rotation_operator_rotation_in_progress{sel}"))
               == 1.0, timeout=20, interval=0.5, what="the running rotation in Prometheus")

    def firing() -> dict[str, Any] | None:
        return next((a for a in prom.alerts() if a["labels"].get("alertname") == STALLED
                     and a["state"] == "firing"
                     and a["labels"].get("namespace") == namespace), None)
    alert = eventually(firing, timeout=60, interval=1.0, what=f"{STALLED} to fire")
    assert alert["labels"]["severity"] == "warning"
    assert alert["labels"]["policy"] == app.name
    assert "docs/runbook.md#rotationoperatorrotationstalled" in \
        alert["annotations"]["runbook_url"]
