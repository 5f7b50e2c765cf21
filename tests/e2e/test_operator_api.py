"""What users see of the EncryptionPolicy API through kubectl: printer columns,
``kubectl explain``, and the admission-time validation (OpenAPI schema and CEL)."""

from __future__ import annotations

import copy
import json
import re
import subprocess
from typing import Any

import pytest

from tests.fixtures.fix_cluster import Kubectl
from tests.fixtures.fix_operator import (
    API_VERSION,
    ENCPOL,
    MakeApp,
    OperatorProcess,
    eventually,
    parse_table,
)

COLUMNS = ["NAME", "DESIRED", "OBSERVED", "ACTIVE", "SECRETS", "LEGACY", "READY", "AGE"]


def _row(kubectl: Kubectl, namespace: str, *extra: str) -> dict[str, str]:
    out = kubectl("get", "encpol", "-n", namespace, *extra).stdout
    rows = parse_table(out)
    assert len(rows) == 1, out
    return rows[0]


def test_printer_columns_before_and_after_rotation(
    kubectl: Kubectl, namespace: str, dsn: str, make_app: MakeApp, operator: OperatorProcess
) -> None:
    app = make_app(namespace, dsn, rows=30, legacy=12)
    app.wait_condition("Ready", "True")

    header = kubectl("get", "encpol", "-n", namespace).stdout.splitlines()[0]
    assert header.split() == COLUMNS
    before = _row(kubectl, namespace)
    assert {k: v for k, v in before.items() if k != "AGE"} == {
        "NAME": "app", "DESIRED": "1", "OBSERVED": "1", "ACTIVE": "1", "SECRETS": "30",
        "LEGACY": "12", "READY": "True"}
    wide = _row(kubectl, namespace, "-o", "wide")
    assert wide["REASON"] == "KeysReady"

    # Bumping by more than one rotates once: the DEK goes to v2, the policy to 3.
    kubectl("patch", "encpol", "app", "-n", namespace, "--type=merge",
            "-p", '{"spec":{"version":3}}')
    assert _row(kubectl, namespace)["DESIRED"] == "3"
    app.wait_condition("Ready", "True", "RotationSucceeded")
    after = _row(kubectl, namespace)
    assert {k: v for k, v in after.items() if k != "AGE"} == {
        "NAME": "app", "DESIRED": "3", "OBSERVED": "3", "ACTIVE": "2", "SECRETS": "30",
        "LEGACY": "0", "READY": "True"}
    wide = _row(kubectl, namespace, "-o", "wide")
    assert wide["REASON"] == "RotationSucceeded"
    assert wide["PROGRESS"] == "30/30 (100%)"
    assert app.active_version() == 2


def _explain(kubectl: Kubectl, field: str) -> str:
    """``kubectl explain`` with whitespace normalised (it wraps long descriptions)."""
    def run() -> str | None:
        proc = kubectl("explain", field, check=False)
        return proc.stdout if proc.returncode == 0 else None
    text = eventually(run, timeout=20, what=f"kubectl explain {field}")
    return " ".join(text.split())


def test_kubectl_explain_shows_descriptions(kubectl: Kubectl, operator_installed: str) -> None:
    spec = _explain(kubectl, "encpol.spec")
    assert "What the keys should be. Only spec.version triggers rotations." in spec
    for field in ("version", "kek", "database", "targets", "rotation"):
        assert re.search(rf"\b{field}\s+<", spec), f"{field} missing from:\n{spec}"
    assert "Rotation counter. Increase it (by any amount) to rotate once" in spec
    assert "The key-encryption key (KEK), root of trust" in spec

    targets = _explain(kubectl, "encpol.spec.targets")
    assert "The application's tables holding encrypted values." in targets
    assert "The operator never creates or alters them." in targets
    for field, text in [("table", "Table name."),
                        ("idColumn", "Unique (primary key) column."),
                        ("valueColumn", "bytea column with the encrypted value."),
                        ("keyIdColumn", "Integer column naming the DEK version")]:
        assert re.search(rf"\b{field}\s+<string>", targets), f"{field} missing:\n{targets}"
        assert text in targets


def _policy(name: str, **spec_overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "version": 3,
        "kek": {"secretRef": {"name": "app-kek"}},
        "database": {"secretRef": {"name": "app-db"}},
        "targets": [{"table": "secrets"}],
        "rotation": {"batchSize": 1000},
    }
    spec.update(spec_overrides)
    return {"apiVersion": API_VERSION, "kind": "EncryptionPolicy",
            "metadata": {"name": name}, "spec": spec}


def _create(kubectl: Kubectl, namespace: str, obj: dict[str, Any]
            ) -> subprocess.CompletedProcess[str]:
    return kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(obj), check=False)


def _exists(kubectl: Kubectl, namespace: str, name: str) -> bool:
    return kubectl("get", ENCPOL, name, "-n", namespace, check=False).returncode == 0


def test_admission_rejects_invalid_specs(kubectl: Kubectl, namespace: str,
                                         operator_installed: str) -> None:
    # No operator needed: the API server itself refuses these.
    good = _create(kubectl, namespace, _policy("good"))
    assert good.returncode == 0, good.stderr
    stored = kubectl.json("get", ENCPOL, "good", "-n", namespace)
    # Defaults from the schema are applied at admission.
    assert stored["spec"]["kek"]["secretRef"]["key"] == "kek"
    assert stored["spec"]["database"]["keysTable"] == "encryption_keys"
    assert stored["spec"]["targets"][0]["keyIdColumn"] == "key_id"
    assert stored["spec"]["rotation"]["mode"] == "Online"

    # CEL transition rule: spec.version may never decrease...
    lower = kubectl("patch", ENCPOL, "good", "-n", namespace, "--type=merge",
                    "-p", '{"spec":{"version":2}}', check=False)
    assert lower.returncode != 0
    assert "spec.version may never decrease; bump it to rotate" in lower.stderr
    assert kubectl.json("get", ENCPOL, "good", "-n", namespace)["spec"]["version"] == 3
    # ...while the same or a higher one is fine.
    kubectl("patch", ENCPOL, "good", "-n", namespace, "--type=merge",
            "-p", '{"spec":{"version":3}}')
    kubectl("patch", ENCPOL, "good", "-n", namespace, "--type=merge",
            "-p", '{"spec":{"version":7}}')

    cases = [
        ("small-batch", _policy("small-batch", rotation={"batchSize": 10}),
         ["spec.rotation.batchSize", "should be greater than or equal to 100"]),
        ("no-targets", _policy("no-targets", targets=[]),
         ["spec.targets", "should have at least 1 items"]),
        ("hostile-table", _policy("hostile-table", targets=[{"table": "x; drop table y"}]),
         ["spec.targets[0].table", "should match '^[A-Za-z_][A-Za-z0-9_]{0,62}$'"]),
        ("hostile-keys", _policy("hostile-keys", database={
            "secretRef": {"name": "app-db"}, "keysTable": 'k"; drop table y; --'}),
         ["spec.database.keysTable", "should match"]),
        ("twice", _policy("twice", targets=[{"table": "a"}, {"table": "a"}]),
         ["a target table is listed twice"]),
        ("zero-version", _policy("zero-version", version=0),
         ["spec.version", "should be greater than or equal to 1"]),
        ("bad-mode", _policy("bad-mode", rotation={"mode": "Fast"}),
         ["spec.rotation.mode", "Unsupported value: \"Fast\""]),
    ]
    for name, obj, messages in cases:
        proc = _create(kubectl, namespace, obj)
        assert proc.returncode != 0, f"{name} was accepted"
        for message in messages:
            assert message in proc.stderr, f"{name}: {message!r} not in:\n{proc.stderr}"
        assert not _exists(kubectl, namespace, name)

    # The same rules apply to updates of an existing object.
    broken = copy.deepcopy(stored["spec"])
    broken["targets"][0]["table"] = "x; drop table y"
    upd = kubectl("patch", ENCPOL, "good", "-n", namespace, "--type=merge",
                  "-p", json.dumps({"spec": {"targets": broken["targets"]}}), check=False)
    assert upd.returncode != 0
    assert "should match" in upd.stderr


@pytest.mark.parametrize("field", ["kek", "database", "targets", "version"])
def test_required_fields(kubectl: Kubectl, namespace: str, operator_installed: str,
                         field: str) -> None:
    obj = _policy(f"no-{field}")
    del obj["spec"][field]
    proc = _create(kubectl, namespace, obj)
    assert proc.returncode != 0
    assert f"spec.{field}: Required value" in proc.stderr


def test_deployment_pod_passes_restricted_pod_security(kubectl: Kubectl,
                                                       operator_installed: str) -> None:
    """No kubelet runs here, but admission does: the Deployment's pod, created for real
    (server-side dry run) in the operator's namespace, must pass the namespace's
    ``restricted`` Pod Security level, and the manifests must agree with each other."""
    ns = "rotation-operator"
    labels = kubectl.json("get", "namespace", ns)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    deploy = kubectl.json("get", "deployment", "rotation-operator", "-n", ns)
    template = deploy["spec"]["template"]
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "rotation-operator-dry-run", "labels": template["metadata"].get(
               "labels", {})},
           "spec": template["spec"]}
    proc = kubectl("create", "-n", ns, "--dry-run=server", "-f", "-", input=json.dumps(pod),
                   check=False)
    assert proc.returncode == 0, proc.stderr

    # The pod runs as the ServiceAccount the ClusterRoleBinding grants...
    sa = template["spec"]["serviceAccountName"]
    kubectl("get", "serviceaccount", sa, "-n", ns)
    binding = kubectl.json("get", "clusterrolebinding", "rotation-operator")
    assert {"kind": "ServiceAccount", "name": sa, "namespace": ns} in binding["subjects"]
    assert binding["roleRef"]["name"] == "rotation-operator"
    # ...and its probes and scrape port point at what `rotation-operator run` serves.
    (container,) = template["spec"]["containers"]
    assert container["args"][0] == "run"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": 8080, "metrics": 9090}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health",
                                                     "scheme": "HTTP"}
    assert template["metadata"]["annotations"]["prometheus.io/port"] == "9090"
    # Two replicas with leader election (issue #12): a rolling update keeps one of them up,
    # and each knows its own pod name for the Lease's holder identity.
    assert deploy["spec"]["replicas"] == 2
    assert deploy["spec"]["strategy"]["type"] == "RollingUpdate"
    assert "--leader-elect" in container["args"]
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
           for e in container.get("env", [])}
    assert env.get("POD_NAME") == "metadata.name"
    assert env.get("POD_NAMESPACE") == "metadata.namespace"
