"""The refresh timer: counts, sweeps, retention and schedules between rotations.

Counting needs the DSN only.  Two steps follow, each decided by the decision layer on the
snapshot the step before left: a ``sweep`` request (rows under a retired key move onto the
active key), then, after the retention steps that are due, a ``schedule`` request (a
rotation the policy asks for by itself), which starts a reconcile like any other.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from rotation_operator.errors import (
    AccessDenied,
    DatabaseUnavailable,
    KekError,
    KubernetesUnavailable,
    RotationOperatorError,
    SecretError,
)
from rotation_operator.operator import conditions, kube, leader, metrics, status
from rotation_operator.operator.conditions import READY
from rotation_operator.operator.control import Control, policy_lock
from rotation_operator.operator.secrets import read_dsn, read_secrets
from rotation_operator.operator.settings import OperatorSettings
from rotation_operator.operator.spec import Policy
from rotation_operator.operator.workflow import observe_schedule, reconcile
from rotation_operator.operator.writer import Reporter, StatusWriter
from rotation_operator.policy.config import StoreConfig
from rotation_operator.policy.decisions import Action, Decision, Request, decide
from rotation_operator.policy.reasons import Reason
from rotation_operator.rotation.engine import Engine
from rotation_operator.rotation.inspection import Snapshot, snapshot
from rotation_operator.rotation.lifecycle import Lifecycle, Outcome

log = logging.getLogger(__name__)


def _transient_reasons() -> set[str]:
    """Ready reasons the refresh timer may clear once counts can be read again: a Secret,
    the RBAC grant, the API server or the database missing, and every KEK problem."""
    from rotation_operator.crypto import pkcs11  # noqa: F401  (its KekError subclasses)
    reasons = {e.reason for e in (DatabaseUnavailable, SecretError, AccessDenied,
                                  KubernetesUnavailable)}
    classes: list[type[RotationOperatorError]] = [KekError]
    while classes:
        cls = classes.pop()
        reasons.add(cls.reason)
        classes.extend(cls.__subclasses__())
    return reasons


def refresh(policy: Policy, events: Reporter, settings: OperatorSettings | None = None,
            now: datetime | None = None, *, recheck: bool = False) -> bool:
    """Timer: refresh counts and keys, sweep rows found under a retired key, take the
    retention steps that are due, and start a scheduled rotation when one is due.  False if
    a reconciliation is busy.

    Counting needs the DSN only.  Clearing a transient failure (Ready=False because a
    Secret, the RBAC grant or the database was missing) needs everything reconcile
    needs: both Secrets readable, the KEK well-formed and matching the stored keys.
    """
    if not leader.may_act():  # no sweep, retention step or schedule from an old leader
        return True
    if policy.status.get("observedVersion") is None:
        # Never initialised (e.g. the KEK Secret is missing): there are no key tables to
        # count yet, and creating them is reconcile's job, after it has proved the KEK.
        return True
    now = now or datetime.now(UTC)
    ready = conditions.get(policy.conditions(), READY)
    # ``recheck``: a referenced Secret changed; prove the KEK again now, as a failing
    # policy would (a valid but different KEK must not stay Ready until the next bump)
    failing = ready is not None and ready.get("status") == "False" and \
        ready.get("reason") in _transient_reasons()
    transient = recheck or failing
    cfg = policy.store_config()
    request = policy.request(now, "schedule")
    lock = policy_lock(policy)
    if not lock.acquire(blocking=False):
        return False
    try:
        healed = False
        if transient:
            dsn, keks = read_secrets(policy)
            try:
                prepared = Engine(dsn, cfg, keks.all, actor=policy.actor, owner=policy.owner,
                                  legacy_reads=policy.legacy_reads).prepare()
            finally:
                keks.close()
            healed = failing and prepared.state.served is not None and \
                prepared.state.served >= policy.desired
        else:
            dsn = read_dsn(policy)
        counting = _counting(policy, settings, now)
        snap = snapshot(dsn, cfg, **counting)
        # Two steps, each decided on what the one before left: a sweep of rows under a
        # retired key (always online: it needs no grant a rotation may lack), then a
        # rotation the policy's schedule asks for.
        swept = decide(policy.request(now, "sweep"), snap.state())
        if swept.action is Action.SWEEP:
            interval = settings.control_interval if settings else 2.0
            snap = _sweep(policy, events, cfg, interval, swept)
        outcome = _lifecycle(policy, events, dsn, cfg, snap, now)
        if outcome.done or outcome.changed:
            snap = snapshot(dsn, cfg, **counting)
        decision = decide(request, snap.state())
    finally:
        lock.release()
    if decision.action is Action.ROTATE and settings is not None:
        # A scheduled rotation is a reconcile like any other (decided there, by the same
        # pure function, on the wall clock: an injected ``now`` only serves this refresh's
        # own look); it writes the full status.
        reconcile(policy, settings, events)
        return True
    observe_schedule(policy, request)
    fields = {**status.snapshot_fields(snap, conditions.now()),
              **status.schedule_fields(snap, request),
              "retention": status.retention_fields(outcome)}
    if not snap.exact:  # keep when the counts were last exact
        fields["counts"]["lastExactAt"] = (policy.status.get("counts") or {}).get(
            "lastExactAt")
    metrics.observe_counts(policy.namespace, policy.name, snap)
    _refresh_conditions(policy, snap, request, healed, fields, events)
    return True


def _counting(policy: Policy, settings: OperatorSettings | None, now: datetime
              ) -> dict[str, Any]:
    """Exact counts when the last were longer ago than the interval (or never); else the
    statistics' estimates for large tables (issue #11: a full scan every minute holds back
    VACUUM on a 100M-row table)."""
    if settings is None:
        return {"exact": True}
    last = (policy.status.get("counts") or {}).get("lastExactAt")
    stale = last is None or (now - datetime.fromisoformat(str(last).replace("Z", "+00:00"))
                             ).total_seconds() >= settings.exact_count_interval
    return {"exact": stale, "exact_below": settings.exact_count_below}


def _refresh_conditions(policy: Policy, snap: Snapshot, request: Request, healed: bool,
                        fields: dict[str, Any], events: Reporter) -> None:
    """The counts always; the conditions the refresh owns only if it changes one, computed
    on the object as it is now and written only if it is still that version: a reconcile
    that ran meanwhile must not see its conditions overwritten by an older body's."""
    current = kube.get_policy(policy.namespace, policy.name)
    if current is None:
        return
    meta = current.get("metadata") or {}
    fresh = Policy.from_object(current, policy.namespace, policy.name)
    # status.kek from the object as it is now, not the timer's older copy: a rekey that
    # finished meanwhile wrote the new KEK's fields, which must not be put back
    fields = {**fields, **status.kek_fields_from_status(snap, fresh.status)}
    writer = StatusWriter(fresh)
    before = [dict(c) for c in writer.conds]
    if healed:
        writer.apply(status.healed(snap))
    writer.apply(status.degraded(snap, writer.conds, clear_other=healed))
    writer.apply(status.key_usage(snap, request, writer.conds))
    writer.apply(status.legacy_reads(snap, writer.conds))
    late = status.late_legacy_news(before, writer.conds)
    if late is not None:
        events.warn(Reason.LATE_LEGACY_ROWS, late)
    if writer.conds == before:
        writer.patch(fields, with_conditions=False)
        return
    try:
        writer.patch(fields, resource_version=str(meta.get("resourceVersion") or ""))
    except kube.Conflict:  # someone wrote meanwhile: counts now, conditions next time
        writer.patch(fields, with_conditions=False)


def _lifecycle(policy: Policy, events: Reporter, dsn: str, cfg: StoreConfig, snap: Snapshot,
               now: datetime) -> Outcome:
    """The census, and the retention steps that are due (none while paused)."""
    outcome = Lifecycle(dsn, cfg, actor=policy.actor, owner=policy.owner).run(
        policy.retention(), now, snap.rows_per_key(), apply=not policy.paused,
        exact=snap.exact)
    for step in outcome.done:
        what = "disabled (no ring unwraps it; `keys enable` undoes it)" \
            if step.action == "disable" else "destroyed (its wrapped bytes are erased)"
        events.warn(Reason.KEY_DISABLED if step.action == "disable" else Reason.KEY_DESTROYED,
                    f"DEK v{step.version} {what}: spec.retention")
    for message in outcome.refused:
        events.warn(Reason.KEY_IN_USE, message)
    return outcome


def _sweep(policy: Policy, events: Reporter, cfg: StoreConfig, interval: float,
           decision: Decision) -> Snapshot:
    """Move rows under retired keys onto the active key (``decision``: the refresh's, which
    the engine takes again under the lock), and say so."""
    dsn, keks = read_secrets(policy)
    engine = Engine(dsn, cfg, keks.all, actor=policy.actor, owner=policy.owner,
                    legacy_reads=policy.legacy_reads)
    labels = (policy.namespace, policy.name)
    metrics.rotation_started(*labels)
    try:
        result = engine.sweep(policy.options(), control=Control(policy, interval),
                              decision=decision)
    finally:
        metrics.rotation_ended(*labels)
        keks.close()
    if result.performed:
        metrics.ROWS.labels(*labels).inc(result.re_encrypted)
        events.warn(Reason.STALE_ROWS_SWEPT, status.summary(result))
    return snapshot(dsn, cfg)
