"""The few Kubernetes API calls the workflow makes itself: read a Secret, patch status.

Kopf watches and posts events through its own client; these calls use the official
client because they run inside sync handlers and from the rotation's progress callback.
Errors are mapped here to the package's hierarchy so the one boundary in ``handlers``
sees only :class:`~rotation_operator.errors.RotationOperatorError`.  Secret values are
returned as bytes to the caller and never logged.
"""

from __future__ import annotations

import base64
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from ..errors import AccessDenied, RotationOperatorError, SecretError

GROUP, VERSION, PLURAL = "rotation-operator.io", "v1alpha1", "encryptionpolicies"


def read_secret(namespace: str, name: str, key: str, what: str) -> bytes:
    """The bytes of ``key`` in Secret ``namespace/name``; precise errors, never the value."""
    try:
        secret = client.CoreV1Api().read_namespaced_secret(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            raise SecretError(f"{what}: Secret {namespace}/{name} does not exist") from None
        if exc.status == 403:
            raise AccessDenied(f"{what}: the operator may not get Secret {namespace}/{name} "
                               "(RBAC: grant get on secrets)") from None
        raise RotationOperatorError(
            f"{what}: reading Secret {namespace}/{name} failed: HTTP {exc.status}") from None
    data = secret.data or {}
    if key not in data:
        raise SecretError(f"{what}: Secret {namespace}/{name} has no key {key!r} "
                          f"(it has: {', '.join(sorted(data)) or 'no keys'})")
    return base64.b64decode(data[key])


def patch_status(namespace: str, name: str, status: dict[str, Any]) -> None:
    """Merge-patch the status subresource of one EncryptionPolicy."""
    try:
        client.CustomObjectsApi().patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, {"status": status})
    except ApiException as exc:
        if exc.status == 404:
            return  # deleted meanwhile: deleting stops management, nothing to report
        if exc.status == 403:
            raise AccessDenied(f"the operator may not patch {PLURAL}/status in {namespace} "
                               "(RBAC: grant patch on encryptionpolicies/status)") from None
        raise RotationOperatorError(f"status update of {namespace}/{name} failed: "
                                    f"HTTP {exc.status}") from None
