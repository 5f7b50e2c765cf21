"""The few Kubernetes API calls the workflow makes itself: read a Secret or a policy, patch
status.

Kopf watches and posts events through its own client; these calls use the official
client because they run inside sync handlers and between a rotation's batches.  Every call
has a request timeout (a hung API server must not hold a handler forever).  Errors are
mapped here to the package's hierarchy, so the one boundary in ``handlers`` sees only
:class:`~rotation_operator.errors.RotationOperatorError`.  Secret values are returned as
bytes to the caller and never logged.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from rotation_operator.errors import (
    AccessDenied,
    KubernetesUnavailable,
    NotLeading,
    RotationOperatorError,
    SecretError,
)
from rotation_operator.operator import leader, metrics

GROUP, VERSION, PLURAL = "rotation-operator.io", "v1alpha1", "encryptionpolicies"
#: (connect, read) seconds for every call.
TIMEOUT = (5.0, 30.0)
T = TypeVar("T")


@contextmanager
def _unreachable(what: str) -> Iterator[None]:
    """Timeouts, refused connections and 5xx answers: retry later."""
    try:
        yield
    except urllib3.exceptions.HTTPError as exc:
        raise KubernetesUnavailable(f"{what}: the Kubernetes API did not answer "
                                    f"({type(exc).__name__})") from None


def _call(operation: str, what: str, fn: Callable[[], T]) -> T:
    with metrics.timed("kubernetes", operation), _unreachable(what):
        return fn()


def read_secret(namespace: str, name: str, key: str, what: str) -> bytes:
    """The bytes of ``key`` in Secret ``namespace/name``; precise errors, never the value."""
    try:
        secret = _call("read_secret", what, lambda: client.CoreV1Api().read_namespaced_secret(
            name, namespace, _request_timeout=TIMEOUT))
    except ApiException as exc:
        if exc.status == 404:
            raise SecretError(f"{what}: Secret {namespace}/{name} does not exist") from None
        if exc.status == 403:
            raise AccessDenied(f"{what}: the operator may not get Secret {namespace}/{name} "
                               "(RBAC: grant get on secrets)") from None
        raise _http(f"{what}: reading Secret {namespace}/{name}", exc) from None
    data = secret.data or {}
    if key not in data:
        raise SecretError(f"{what}: Secret {namespace}/{name} has no key {key!r} "
                          f"(it has: {', '.join(sorted(data)) or 'no keys'})")
    return base64.b64decode(data[key])


def secret_version(namespace: str, name: str) -> str:
    """What a Secret is now, for change detection only: its resourceVersion, or
    ``absent`` / ``forbidden`` / ``unreachable`` (never its data)."""
    try:
        secret = _call("read_secret", f"Secret {namespace}/{name}",
                       lambda: client.CoreV1Api().read_namespaced_secret(
                           name, namespace, _request_timeout=TIMEOUT))
    except ApiException as exc:
        return {404: "absent", 403: "forbidden"}.get(exc.status or 0, "unreachable")
    except KubernetesUnavailable:
        return "unreachable"
    meta = secret.metadata
    return str(meta.resource_version) if meta is not None else "unknown"


def reset_retry(namespace: str, name: str, handler: str) -> None:
    """Forget Kopf's retry state of ``handler`` on the policy (its progress annotation):
    Kopf then runs the handler at once, as if for the first time."""
    if not leader.may_act():
        return
    body = {"metadata": {"annotations": {f"{GROUP}/{handler}": None}}}
    try:
        _call("patch_policy", f"retry reset of {namespace}/{name}",
              lambda: client.CustomObjectsApi().patch_namespaced_custom_object(
                  GROUP, VERSION, namespace, PLURAL, name, body, _request_timeout=TIMEOUT))
    except ApiException as exc:
        if exc.status != 404:
            raise _http(f"retry reset of {namespace}/{name}", exc) from None


def get_policy(namespace: str, name: str) -> dict[str, Any] | None:
    """The policy object, or None if it is gone."""
    try:
        obj: Any = _call(
            "get_policy", f"reading {namespace}/{name}",
            lambda: client.CustomObjectsApi().get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, _request_timeout=TIMEOUT))
    except ApiException as exc:
        if exc.status == 404:
            return None
        if exc.status == 403:
            raise AccessDenied(f"the operator may not get {PLURAL} in {namespace}") from None
        raise _http(f"reading {namespace}/{name}", exc) from None
    return dict(obj)


class Conflict(Exception):
    """The object changed since it was read (a conditional patch was refused)."""


def patch_status(namespace: str, name: str, status: dict[str, Any],
                 resource_version: str | None = None) -> None:
    """Merge-patch the status subresource of one EncryptionPolicy; with
    ``resource_version``, only if the object is still that version (else :class:`Conflict`):
    conditions computed from a read are never written over a newer writer's."""
    if not leader.may_act():
        raise NotLeading(f"status update of {namespace}/{name} refused: this replica no "
                         "longer holds the leader Lease")
    body: dict[str, Any] = {"status": status}
    if resource_version is not None:
        body["metadata"] = {"resourceVersion": resource_version}
    try:
        _call("patch_status", f"status update of {namespace}/{name}",
              lambda: client.CustomObjectsApi().patch_namespaced_custom_object_status(
                  GROUP, VERSION, namespace, PLURAL, name, body, _request_timeout=TIMEOUT))
    except ApiException as exc:
        if exc.status == 409:
            raise Conflict(f"{namespace}/{name} changed meanwhile") from None
        if exc.status == 404:
            return  # deleted meanwhile: deleting stops management, nothing to report
        if exc.status == 403:
            raise AccessDenied(f"the operator may not patch {PLURAL}/status in {namespace} "
                               "(RBAC: grant patch on encryptionpolicies/status)") from None
        raise _http(f"status update of {namespace}/{name}", exc) from None


def _http(what: str, exc: ApiException) -> RotationOperatorError:
    if exc.status is not None and (exc.status >= 500 or exc.status == 429):
        return KubernetesUnavailable(f"{what} failed: HTTP {exc.status}")
    return RotationOperatorError(f"{what} failed: HTTP {exc.status}")
