"""Kopf handlers: the thinnest layer.  Each one builds a :class:`Policy`, calls the
workflow, and goes through :func:`boundary`, the one place where package errors become a
condition, an Event and ``kopf.TemporaryError`` / ``kopf.PermanentError``.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import kopf
import psycopg
import urllib3
from kubernetes.client.exceptions import ApiException

from rotation_operator.errors import (
    InternalError,
    KubernetesUnavailable,
    NotLeading,
    RotationOperatorError,
    RowDecryptError,
)
from rotation_operator.operator import (
    kube,
    leader,
    logs,
    metrics,
    secrets,
    spec,
    workflow,
)
from rotation_operator.operator import (
    refresh as timer,
)
from rotation_operator.operator import settings as operator_settings
from rotation_operator.operator import writer as writer_mod
from rotation_operator.operator.kube import GROUP, PLURAL, VERSION
from rotation_operator.store.database import translate

RESOURCE = (GROUP, VERSION, PLURAL)
WATCH_TIMER = "watch-inputs"
log = logging.getLogger(__name__)


class _Events:
    def __init__(self, body: kopf.Body):
        self.body = body

    def info(self, reason: str, message: str) -> None:
        self._post("Normal", reason, message)

    def warn(self, reason: str, message: str) -> None:
        self._post("Warning", reason, message)

    def _post(self, type_: str, reason: str, message: str) -> None:
        if not leader.may_act():  # an old leader that woke up posts nothing
            log.warning("Event %s not posted: this replica no longer leads", reason)
            return
        kopf.event(self.body, type=type_, reason=reason, message=message)


def _policy(body: kopf.Body) -> spec.Policy:
    return spec.Policy.from_object(body)


def as_error(exc: Exception) -> RotationOperatorError:
    """Every exception as the package's error, with a sanitized message: psycopg's through
    :func:`~rotation_operator.store.database.translate` (no DETAIL line, no row values), the
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


@dataclass
class Retrying:
    """A reconcile that failed and waits for Kopf's retry: what would make it worth
    retrying at once (a newer generation, a changed Secret, the named row repaired)."""

    generation: int
    reason: str
    row: tuple[str, object] | None = None  # (table, id) of the row it stopped on
    row_version: str | None = None


#: (namespace, name) -> the reconcile waiting for its retry (this process only).
_retrying: dict[tuple[str, str], Retrying] = {}
#: (namespace, name) -> the referenced Secrets' versions last seen.
_secrets_seen: dict[tuple[str, str], dict[str, str]] = {}


def retry_delay(exc: RotationOperatorError, retry: int) -> float:
    """Back off 2, 4, 8 ... seconds up to the error's own delay (and the operator's cap):
    a fix in the first minutes is picked up within seconds, a lasting failure costs
    little.  Changes the operator can see (spec, Secrets, the named row) retry at once."""
    delay = min(float(exc.retry_delay), 2.0 * 2.0 ** max(retry, 0))
    cap = operator_settings.current.max_retry_delay
    return delay if cap is None else min(delay, cap)


@contextmanager
def boundary(policy: spec.Policy, events: _Events, retry: int = 0,
             reconciling: bool = False) -> Iterator[writer_mod.StatusWriter]:
    """Map every error to status + Event + Kopf's retry semantics; ``reconciling``: the
    reconcile handler's run, whose retry may be brought forward."""
    writer = writer_mod.StatusWriter(policy)  # the run writes through it, and so does a failure
    key = (policy.namespace, policy.name)
    try:
        with logs.policy(policy.namespace, policy.name):
            yield writer
    except (kopf.TemporaryError, kopf.PermanentError):
        raise
    except Exception as raw:
        exc = as_error(raw)
        if isinstance(exc, NotLeading):  # nothing may be written; the leader takes over
            log.warning("%s", exc)
            raise kopf.TemporaryError(f"{exc.reason}: {exc}", delay=exc.retry_delay) from None
        workflow.fail(policy, exc, events, writer)
        if exc.retryable:
            if reconciling:
                row = (exc.table, exc.row_id) if isinstance(exc, RowDecryptError) else None
                _retrying[key] = Retrying(policy.generation, exc.reason, row)
            raise kopf.TemporaryError(f"{exc.reason}: {exc}",
                                      delay=retry_delay(exc, retry)) from None
        _retrying.pop(key, None)
        raise kopf.PermanentError(f"{exc.reason}: {exc}") from None
    if reconciling:
        _retrying.pop(key, None)


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
    # A policy deleted while one of its timers runs keeps Kopf's finalizer until the
    # timer returns; Kopf looks again after this many seconds (default 60, which made
    # `kubectl delete --wait` hang for a minute whenever a refresh was under way).
    settings.background.cancellation_polling = 1
    # Watching named namespaces (-n NS) must not need cluster-wide RBAC: without this,
    # Kopf lists and watches all namespaces to match patterns, and when RoleBindings (or
    # this ClusterRole, which has no namespaces rule) forbid it, retries with back-off for
    # about a minute before serving anything.  Exact names need no observation.
    watched = operator_settings.current.namespaces
    if watched and not any(set(ns) & set("!*?,") for ns in watched):
        settings.scanning.disabled = True


@kopf.on.cleanup()
def stopping(**_: Any) -> None:
    """SIGTERM (a rolling update, a drain): a running rotation stops between batches, so
    the replica taking over resumes it at once instead of waiting for this process's
    rotation thread to be killed; nothing more is written to the cluster."""
    leader.stop_acting()
    log.info("stopping: a running rotation stops after its current batch")


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
              retry: int = 0, **_: Any) -> None:
    """Create, operator restart, spec change: initialise, rotate if asked, report."""
    policy, events = _policy(body), _Events(body)
    # What the Secrets are as this run reads them: a change from here on is noticed.
    _secrets_seen[(policy.namespace, policy.name)] = _secret_versions(policy)
    with boundary(policy, events, retry, reconciling=True) as writer:
        summary = workflow.reconcile(policy, operator_settings.current, events, writer)
    logger.info("reconciled: %s", summary)


@kopf.timer(*RESOURCE, interval=operator_settings.current.refresh_interval,
            initial_delay=operator_settings.current.refresh_interval)
def refresh(body: kopf.Body, logger: logging.Logger | logging.LoggerAdapter[Any],
            **_: Any) -> None:
    """Refresh counts between rotations (applications write all the time)."""
    policy, events = _policy(body), _Events(body)
    with boundary(policy, events):
        if not timer.refresh(policy, events, operator_settings.current):
            logger.debug("refresh skipped: a reconciliation is running")


@kopf.on.event(*RESOURCE)
def spec_changed_while_retrying(body: kopf.Body, **_: Any) -> None:
    """A spec change is a fresh start: a reconcile waiting out a retry delay for an older
    generation runs at once (Kopf alone would let the delay run out first)."""
    meta = body.get("metadata") or {}
    key = (str(meta.get("namespace")), str(meta.get("name")))
    waiting = _retrying.get(key)
    if waiting is not None and int(meta.get("generation") or 0) > waiting.generation:
        _bring_forward(key, "the spec changed")


@kopf.timer(*RESOURCE, id=WATCH_TIMER, interval=operator_settings.current.recheck_interval,
            initial_delay=operator_settings.current.recheck_interval)
def watch_inputs(body: kopf.Body, **_: Any) -> None:
    """Every few seconds, cheaply: did a referenced Secret change (a GET each), or the
    row a failed rotation stopped on (one indexed read)?  A change retries a failing
    reconcile at once, and re-proves the KEK of a healthy policy, so a wrong key put into
    its Secret shows as not Ready within seconds."""
    policy, events = _policy(body), _Events(body)
    key = (policy.namespace, policy.name)
    versions = _secret_versions(policy)
    before = _secrets_seen.get(key)
    _secrets_seen[key] = versions
    changed = before is not None and before != versions
    waiting = _retrying.get(key)
    if waiting is not None:
        if changed:
            _bring_forward(key, "a referenced Secret changed")
        elif waiting.row is not None:
            with logs.policy(*key):
                try:
                    now = workflow.row_version(policy, *waiting.row)
                except RotationOperatorError as exc:
                    log.debug("row probe failed: %s", exc)
                    return
            if waiting.row_version is None:
                waiting.row_version = now
            elif now != waiting.row_version:
                _bring_forward(key, f"row {waiting.row[1]!r} of {waiting.row[0]} changed")
        return
    if changed:
        with boundary(policy, events):
            done = timer.refresh(policy, events, operator_settings.current, recheck=True)
        if not done and before is not None:  # the policy was busy: look again next tick
            _secrets_seen[key] = before


def _secret_versions(policy: spec.Policy) -> dict[str, str]:
    return {n: kube.secret_version(policy.namespace, n)
            for n in secrets.referenced_secrets(policy)}


def _bring_forward(key: tuple[str, str], why: str) -> None:
    log.info("[%s/%s] %s: retrying the reconcile now", key[0], key[1], why)
    _retrying.pop(key, None)
    try:
        kube.reset_retry(key[0], key[1], "reconcile")
    except RotationOperatorError as exc:  # Kopf's own retry still comes
        log.warning("could not bring the retry forward: %s", exc)


@kopf.on.delete(*RESOURCE, optional=True)
def forget(body: kopf.Body, **_: Any) -> None:
    meta = body.get("metadata") or {}
    key = (str(meta.get("namespace")), str(meta.get("name")))
    _retrying.pop(key, None)
    _secrets_seen.pop(key, None)
    metrics.forget(*key)  # a deleted policy's series go too
