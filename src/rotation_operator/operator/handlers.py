"""Kopf handlers: the thinnest layer.  Each one builds a :class:`Policy`, calls the
workflow, and goes through :func:`boundary`, the one place where package errors become a
condition, an Event and ``kopf.TemporaryError`` / ``kopf.PermanentError``.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import kopf
import psycopg
import urllib3
from kubernetes.client.exceptions import ApiException

from ..database import translate
from ..errors import InternalError, KubernetesUnavailable, RotationOperatorError
from . import settings as operator_settings
from . import workflow
from .kube import GROUP, PLURAL, VERSION

RESOURCE = (GROUP, VERSION, PLURAL)
log = logging.getLogger(__name__)


class _Events:
    def __init__(self, body: kopf.Body):
        self.body = body

    def info(self, reason: str, message: str) -> None:
        kopf.event(self.body, type="Normal", reason=reason, message=message)

    def warn(self, reason: str, message: str) -> None:
        kopf.event(self.body, type="Warning", reason=reason, message=message)


def _policy(body: kopf.Body) -> workflow.Policy:
    meta = body.get("metadata") or {}
    return workflow.Policy(namespace=meta["namespace"], name=meta["name"],
                           generation=int(meta.get("generation") or 0),
                           spec=body.get("spec") or {}, status=body.get("status") or {},
                           uid=str(meta.get("uid") or ""))


def as_error(exc: Exception) -> RotationOperatorError:
    """Every exception as the package's error, with a sanitized message: psycopg's through
    :func:`~rotation_operator.database.translate` (no DETAIL line, no row values), the
    Kubernetes client's as unavailable, anything else as an internal error named by type."""
    if isinstance(exc, RotationOperatorError):
        return exc
    if isinstance(exc, psycopg.Error):
        return translate(exc)
    if isinstance(exc, urllib3.exceptions.HTTPError | ApiException | TimeoutError |
                  ConnectionError):
        return KubernetesUnavailable(f"the Kubernetes API failed: {type(exc).__name__}")
    log.error("unexpected %s in a handler:\n%s", type(exc).__name__,
              "".join(traceback.format_tb(exc.__traceback__)))
    return InternalError(f"unexpected {type(exc).__name__} (a bug; the operator log has "
                         "where it happened)")


@contextmanager
def boundary(policy: workflow.Policy, events: _Events) -> Iterator[workflow.StatusWriter]:
    """Map every error to status + Event + Kopf's retry semantics."""
    writer = workflow.StatusWriter(policy)  # the run writes through it, and so does a failure
    try:
        yield writer
    except (kopf.TemporaryError, kopf.PermanentError):
        raise
    except Exception as raw:
        exc = as_error(raw)
        workflow.fail(policy, exc, events, writer)
        if exc.retryable:
            cap = operator_settings.current.max_retry_delay
            delay = exc.retry_delay if cap is None else min(exc.retry_delay, cap)
            raise kopf.TemporaryError(f"{exc.reason}: {exc}", delay=delay) from None
        raise kopf.PermanentError(f"{exc.reason}: {exc}") from None


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Kopf's own settings: keep its bookkeeping in annotations (status is declared)."""
    prefix = "rotation-operator.io"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=prefix)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=prefix, key="last-handled-configuration")
    # Kopf's own log lines become Events only from WARNING up; ours go through kopf.event.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
    settings.execution.max_workers = 8
    # Watching named namespaces (-n NS) must not need cluster-wide RBAC: without this,
    # Kopf lists and watches all namespaces to match patterns, and when RoleBindings (or
    # this ClusterRole, which has no namespaces rule) forbid it, retries with back-off for
    # about a minute before serving anything.  Exact names need no observation.
    watched = operator_settings.current.namespaces
    if watched and not any(set(ns) & set("!*?,") for ns in watched):
        settings.scanning.disabled = True


def _spec_changed(diff: kopf.Diff, **_: Any) -> bool:
    """Only spec changes matter (labels, annotations and status do not)."""
    return any(not item.field or item.field[0] == "spec" for item in diff)


# One handler id for all three causes, so Kopf calls ``reconcile`` once per cycle.  With
# ``field="spec"`` the update handler's id became "reconcile/spec", and an object whose
# spec changed while the operator was down ran reconcile twice on restart (resume and
# update); the second, no-op run overwrote Ready's RotationSucceeded ("resumed after an
# interruption") with KeysReady.  ``when=`` keeps the spec-only filter.
@kopf.on.resume(*RESOURCE, id="reconcile")
@kopf.on.create(*RESOURCE, id="reconcile")
@kopf.on.update(*RESOURCE, id="reconcile", when=_spec_changed)
def reconcile(body: kopf.Body, logger: logging.Logger | logging.LoggerAdapter[Any],
              **_: Any) -> None:
    """Create, operator restart, spec change: initialise, rotate if asked, report."""
    policy, events = _policy(body), _Events(body)
    with boundary(policy, events) as writer:
        summary = workflow.reconcile(policy, operator_settings.current, events, writer)
    logger.info("reconciled: %s", summary)


@kopf.timer(*RESOURCE, interval=operator_settings.current.refresh_interval,
            initial_delay=operator_settings.current.refresh_interval)
def refresh(body: kopf.Body, logger: logging.Logger | logging.LoggerAdapter[Any],
            **_: Any) -> None:
    """Refresh counts between rotations (applications write all the time)."""
    policy, events = _policy(body), _Events(body)
    with boundary(policy, events):
        if not workflow.refresh(policy, events, operator_settings.current):
            logger.debug("refresh skipped: a reconciliation is running")
