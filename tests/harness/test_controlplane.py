"""Smoke tests proving the control plane is a real kube-apiserver: version, CRDs with CEL
validation and a status subresource, token identities and RBAC enforcement."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import pytest

from tests.fixtures._env import testenv
from tests.fixtures.fix_cluster import Kubectl

CRD_NAME = "widgets.smoke.rotation-operator.io"
WIDGET = CRD_NAME  # fully qualified resource name: immune to stale discovery caches
CRD = f"""
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: {CRD_NAME}
spec:
  group: smoke.rotation-operator.io
  scope: Namespaced
  names: {{plural: widgets, singular: widget, kind: Widget, listKind: WidgetList}}
  versions:
    - name: v1
      served: true
      storage: true
      subresources:
        status: {{}}
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              required: [replicas]
              properties:
                replicas: {{type: integer, minimum: 0}}
              x-kubernetes-validations:
                - rule: "self.replicas <= 5"
                  message: "replicas must be at most 5"
            status:
              type: object
              properties:
                observedReplicas: {{type: integer}}
"""


def _widget(name: str, replicas: int) -> str:
    return json.dumps(
        {
            "apiVersion": "smoke.rotation-operator.io/v1",
            "kind": "Widget",
            "metadata": {"name": name},
            "spec": {"replicas": replicas},
        }
    )


def _eventually(check: Callable[[], bool], timeout: float = 15.0) -> None:
    """Retry ``check`` until it holds: RBAC changes reach the authorizer through an
    informer, so they apply after a short delay rather than instantly."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def widget_crd(kubectl: Kubectl) -> Iterator[str]:
    kubectl("apply", "-f", "-", input=CRD)
    kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")
    yield CRD_NAME
    kubectl("delete", "crd", CRD_NAME, "--wait=false", check=False)


def test_server_is_kubernetes_v1_35_4(kubectl: Kubectl) -> None:
    version = json.loads(kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == "v1.35.4"
    assert version["clientVersion"]["gitVersion"] == "v1.35.4"


def test_token_identities(kubectl: Kubectl, control_plane: testenv.ControlPlane) -> None:
    admin = kubectl.json("auth", "whoami")["status"]["userInfo"]
    operator = kubectl.json("auth", "whoami", kubeconfig=control_plane.operator_kubeconfig)
    assert admin["username"] == "admin"
    assert "system:masters" in admin["groups"]
    assert operator["status"]["userInfo"]["username"] == testenv.OPERATOR_USER
    assert set(testenv.OPERATOR_GROUPS) <= set(operator["status"]["userInfo"]["groups"])


def test_crd_cel_validation_and_status_subresource(
    kubectl: Kubectl, widget_crd: str, namespace: str
) -> None:
    bad = kubectl("create", "-n", namespace, "-f", "-", input=_widget("big", 7), check=False)
    assert bad.returncode != 0
    assert "replicas must be at most 5" in bad.stderr

    kubectl("create", "-n", namespace, "-f", "-", input=_widget("ok", 3))
    kubectl("patch", WIDGET, "ok", "-n", namespace, "--subresource=status", "--type=merge",
            "-p", '{"status": {"observedReplicas": 3}}')
    # Through the main resource, status is ignored: proof that the subresource is real.
    kubectl("patch", WIDGET, "ok", "-n", namespace, "--type=merge",
            "-p", '{"status": {"observedReplicas": 99}}')
    obj = kubectl.json("get", WIDGET, "ok", "-n", namespace)
    assert obj["status"] == {"observedReplicas": 3}
    assert obj["spec"] == {"replicas": 3}


def test_operator_identity_needs_rbac(
    kubectl: Kubectl, control_plane: testenv.ControlPlane, namespace: str
) -> None:
    as_operator = control_plane.operator_kubeconfig
    denied = kubectl("get", "configmaps", "-n", namespace, kubeconfig=as_operator, check=False)
    assert denied.returncode != 0
    assert "Forbidden" in denied.stderr

    kubectl.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "read-configmaps", "namespace": namespace},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"],
                       "verbs": ["get", "list", "watch"]}],
        }
    )
    kubectl.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "operator-reads-configmaps", "namespace": namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                        "name": "read-configmaps"},
            "subjects": [{"kind": "ServiceAccount", "name": testenv.OPERATOR_SERVICE_ACCOUNT,
                          "namespace": testenv.OPERATOR_NAMESPACE}],
        }
    )

    def allowed() -> bool:
        got = kubectl("get", "configmaps", "-n", namespace, kubeconfig=as_operator,
                      check=False)
        return got.returncode == 0

    _eventually(allowed)
    # The grant is namespaced: other namespaces stay forbidden.
    elsewhere = kubectl("get", "configmaps", "-n", "default", kubeconfig=as_operator,
                        check=False)
    assert elsewhere.returncode != 0
    assert "Forbidden" in elsewhere.stderr
