"""One policy's reconciliation: Secrets → engine → status.  No Kopf in here.

The handlers call :func:`reconcile` (create, resume, spec change).  A reconcile is one
pass: prepare the database once, decide once to report
(:func:`~rotation_operator.policy.decisions.decide`; the engine decides once more under the
lock), act, report.  The status it writes is built by :mod:`.status` (pure) and written
through :class:`~.writer.StatusWriter`; Events go through the ``Reporter`` the handler
passes in, so this module stays free of Kopf.  Errors are raised as
:class:`~rotation_operator.errors.RotationOperatorError`; the handler boundary turns them
into a condition, an Event and a Kopf retry (:func:`fail`).

Between batches the running rotation looks at its policy again (:class:`~.control.Control`):
``spec.rotation.paused`` stops it cleanly, and so does deleting the policy.  The timer's
work between rotations is :mod:`.refresh`'s.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from rotation_operator.errors import (
    RotationCancelled,
    RotationOperatorError,
    RotationPaused,
    RowDecryptError,
)
from rotation_operator.operator import conditions, metrics, status
from rotation_operator.operator.control import Control, policy_lock
from rotation_operator.operator.secrets import Keks, read_dsn, read_secrets
from rotation_operator.operator.settings import OperatorSettings
from rotation_operator.operator.spec import Policy
from rotation_operator.operator.writer import Reporter, StatusWriter
from rotation_operator.policy.config import RotationOptions, StoreConfig
from rotation_operator.policy.decisions import Action, Decision, Request, decide, wants_rotation
from rotation_operator.policy.reasons import Reason
from rotation_operator.rotation.engine import Engine
from rotation_operator.rotation.inspection import Snapshot, snapshot
from rotation_operator.rotation.results import RotationResult

log = logging.getLogger(__name__)
_ACTS = (Action.ROTATE, Action.RESUME, Action.SWEEP, Action.REKEY)


def row_version(policy: Policy, table: str, row_id: object) -> str:
    """What one row of a target is now (its ``xmin``, or ``gone``), for noticing that a
    row a rotation stopped on was repaired; read as the operator's role, needs no KEK."""
    from rotation_operator.store.database import connect, db_errors
    from rotation_operator.store.targets import row_xmin

    target = next((t for t in policy.store_config().targets
                   if t.name == table or t.table == table), None)
    if target is None:
        return "gone"
    with db_errors(), connect(read_dsn(policy)) as conn:
        xmin = row_xmin(conn, target, row_id)
    return xmin if xmin is not None else "gone"


def reconcile(policy: Policy, settings: OperatorSettings, events: Reporter,
              writer: StatusWriter | None = None) -> str:
    """Prepare, decide, act (rotate, resume or sweep), and write the full status.

    Returns a short summary for the handler's log line.  ``writer`` is the handler
    boundary's: if this raises, the boundary reports the failure through the same writer,
    continuing from this run's own writes (the handler's body predates them).
    """
    writer = writer or StatusWriter(policy)
    desired = policy.desired
    if wants_rotation(desired, policy.status.get("observedVersion")) and not policy.paused:
        # Flag it before any slow work: pipelines watch for Rotating within a second.
        writer.apply(status.requested(desired))
        writer.patch({"rotation": status.rotation_status(
            phase="Pending", policyVersion=desired, startedAt=conditions.now())})
    cfg, options = policy.store_config(), policy.options()
    dsn, keks = read_secrets(policy)
    try:
        return _reconcile(policy, settings, events, writer, dsn, keks, cfg, options)
    finally:
        keks.close()


def _reconcile(policy: Policy, settings: OperatorSettings, events: Reporter,
               writer: StatusWriter, dsn: str, keks: Keks, cfg: StoreConfig,
               options: RotationOptions) -> str:
    desired = policy.desired
    engine = Engine(dsn, cfg, keks.all, actor=policy.actor, owner=policy.owner,
                    legacy_reads=policy.legacy_reads)
    request = policy.request()
    result: RotationResult | None = None
    with policy_lock(policy):
        prepared = engine.prepare(desired, request)
        decision = decide(request, prepared.state)
        try:
            for _ in range(3):  # a rekey or a resumed rotation of another kind, then this one's
                if decision.action not in _ACTS:
                    break
                result = _rotate(policy, settings, events, writer, engine, options, decision,
                                 request, prepared)
                if decision.action is Action.REKEY and result.performed and \
                        result.decision is not None and result.decision.action in _ACTS:
                    break  # the rekey was followed by the rotation it made room for
                if decision.action not in (Action.RESUME, Action.REKEY) or \
                        result.requested_version == desired:
                    break
                prepared = engine.prepare(desired, request)
                decision = decide(request, prepared.state)
        except RotationPaused as exc:
            decision = Decision(Action.PAUSED, exc.reason, str(exc))
        except RotationCancelled as exc:
            log.info("%s/%s: %s", policy.namespace, policy.name, exc)
            return str(exc)
        snap = snapshot(dsn, cfg)
    if result is not None and result.rekeyed:
        events.info(Reason.KEK_ROTATED, "rewrapped DEK "
                    f"{', '.join(f'v{v}' for v in result.rekeyed)} under the KEK "
                    f"{keks.current.fingerprint}")
    _write_ready(policy, writer, snap, result, decision, keks, events)
    return decision.message if result is None else status.summary(result)


def _rotate(policy: Policy, settings: OperatorSettings, events: Reporter, writer: StatusWriter,
            engine: Engine, options: RotationOptions, decision: Decision, request: Request,
            prepared: Any) -> RotationResult:
    started = conditions.now()
    labels = (policy.namespace, policy.name)
    sweep = decision.action is Action.SWEEP
    rekey = decision.action is Action.REKEY
    if not sweep and not rekey:
        events.info(Reason.ROTATION_STARTED, f"{decision.message} ({options.mode} mode, "
                                             f"batches of {options.batch_size})")
    writer.apply(status.started(decision, policy.desired))
    kind = "sweep" if sweep else "rekey" if rekey else decision.kind
    base = {"phase": "Running", "kind": kind, "mode": options.mode,
            "policyVersion": policy.desired if kind in ("policy", "rekey") else None,
            "startedAt": started,
            "maxRowsPerSecond": options.max_rows_per_second or None}
    writer.patch({"rotation": status.rotation_status(**base, done=0, total=0,
                                                     progress=status.progress(0, 0))})
    last = [0.0]
    t_start = time.monotonic()
    # the latest counts (for the Failed record too) and the throttle's latest word
    seen: dict[str, Any] = {"done": 0, "total": 0, "rowsPerSecond": None, "throttle": None}

    def running_status(**changes: Any) -> dict[str, Any]:
        fields = {**base, **seen, **changes}
        return status.rotation_status(**fields, progress=status.progress(fields["done"],
                                                                         fields["total"]))

    def progress(done: int, total: int) -> None:
        elapsed = time.monotonic() - t_start
        seen.update(done=done, total=total,
                    rowsPerSecond=round(done / elapsed) if elapsed > 1 else None)
        metrics.rotation_progress(*labels, done, total)
        if time.monotonic() - last[0] < settings.progress_interval and done < total:
            return
        last[0] = time.monotonic()
        try:
            writer.patch({"rotation": running_status()}, with_conditions=False)
        except RotationOperatorError as exc:  # progress is best effort; the rotation goes on
            log.warning("progress update failed: %s", exc)

    throttled_at = [0.0]

    def throttled(reason: str | None, message: str, lag: float | None) -> None:
        """The rotation waits for a limit (or stops waiting): condition, status, metric;
        a change at once, a new figure at most every progress interval."""
        metrics.throttled(*labels, reason, lag)
        before = seen["throttle"]
        if before is None and reason is None:
            return
        if before is not None and before["reason"] == reason and \
                time.monotonic() - throttled_at[0] < settings.progress_interval:
            return
        throttled_at[0] = time.monotonic()
        seen["throttle"] = None if reason is None else {
            "reason": reason, "message": message,
            "lagSeconds": None if lag is None else round(lag, 1), "since": (
                before["since"] if before and before["reason"] == reason else conditions.now())}
        writer.apply(status.throttled(reason, message))
        try:
            writer.patch({"rotation": running_status()})
        except RotationOperatorError as exc:
            log.warning("throttle status update failed: %s", exc)

    metrics.rotation_started(*labels)
    t0 = time.monotonic()
    try:
        result = engine.execute(request, options, prepared=prepared, progress=progress,
                                control=Control(policy, settings.control_interval),
                                throttled=throttled, decision=decision)
    except RotationPaused as exc:
        writer.patch({"rotation": running_status(phase="Paused", throttle=None,
                                                  message=str(exc))}, with_conditions=False)
        raise
    except RotationOperatorError as exc:
        metrics.ROTATIONS.labels(*labels, "failed").inc()
        if isinstance(exc, RowDecryptError):
            metrics.DECRYPT_FAILURES.labels(*labels).inc()
        writer.patch({"rotation": running_status(phase="Failed", throttle=None,
                                                  message=str(exc))}, with_conditions=False)
        raise
    finally:
        metrics.rotation_ended(*labels)
        metrics.throttled(*labels, None, None)
        seen["throttle"] = None
        writer.apply(status.throttle_ended(writer.conds))
    metrics.DURATION.labels(*labels).observe(time.monotonic() - t0)
    metrics.ROWS.labels(*labels).inc(result.re_encrypted)
    metrics.ROTATIONS.labels(*labels, "succeeded" if result.performed else "noop").inc()
    rotated = status.rotated(result)
    if result.decision is not None and result.decision.action is Action.SWEEP:
        kind = "sweep"
    elif rotated:
        kind = result.kind
    writer.patch({"rotation": status.finished_rotation(base, result, kind, conditions.now())},
                 with_conditions=False)
    if kind == "sweep":
        events.warn(Reason.STALE_ROWS_SWEPT, status.summary(result))
    elif rotated:
        if rekey:  # a rekey made room for this rotation: it started only now
            events.info(Reason.ROTATION_STARTED,
                        result.decision.message if result.decision else "")
        events.info(Reason.ROTATION_FINISHED, status.summary(result))
        if result.swept_after or result.caught_in_handover:
            events.info(Reason.OLD_KEY_WRITES_CAUGHT,
                        f"{result.caught_in_handover} rows written under old keys during the "
                        f"rotation were moved by its final passes, {result.swept_after} "
                        "right after it finished")
    return result


def _write_ready(policy: Policy, writer: StatusWriter, snap: Snapshot,
                 result: RotationResult | None, decision: Decision, keks: Keks,
                 events: Reporter) -> None:
    request = policy.request()
    before = [dict(c) for c in writer.conds]
    writer.apply(status.ready(decision, result, snap))
    writer.apply(status.degraded(snap, writer.conds, clear_other=True))
    writer.apply(status.legacy_reads(snap, writer.conds))
    late = status.late_legacy_news(before, writer.conds)
    if late is not None:
        events.warn(Reason.LATE_LEGACY_ROWS, late)
    writer.apply(status.kek_weak(keks.weak, writer.conds))
    writer.apply(status.key_usage(snap, request, writer.conds))
    # Metrics first: whoever sees the status (kubectl wait) may scrape right after.
    metrics.observe_counts(policy.namespace, policy.name, snap)
    observe_schedule(policy, request)
    writer.patch({**status.snapshot_fields(snap, conditions.now()),
                  **status.kek_fields(snap, {k.fingerprint for k in keks.all},
                                      keks.current.fingerprint, keks.current.describe(),
                                      status.kek_protection(keks.current)),
                  **status.schedule_fields(snap, request)})


def observe_schedule(policy: Policy, request: Request) -> None:
    """The policy's maxKeyAge as a metric (the KeyTooOld alert compares with it)."""
    if request.max_key_age is not None:
        metrics.MAX_KEY_AGE.labels(policy.namespace, policy.name).set(
            request.max_key_age.total_seconds())
    else:  # removed from the spec: no series, so KeyTooOld cannot fire on a stale one
        metrics.clear_max_key_age(policy.namespace, policy.name)


def fail(policy: Policy, exc: RotationOperatorError, events: Reporter,
         writer: StatusWriter) -> None:
    """The status write for a failure: Ready=False with the error's reason.

    ``writer``: the failing run's own, so a rotation it flagged (Rotating=True, written
    after Kopf took the body) is reported as RotationFailed rather than Idle.
    """
    changes, repeated = status.failed(exc.reason, str(exc), writer.conds)
    writer.apply(changes)
    if not repeated:  # a retry that fails the same way adds no Event
        events.warn(exc.reason, str(exc))
    fields: dict[str, Any] = {}
    if writer.rotation is not None and writer.rotation.get("phase") in ("Pending", "Running"):
        # This run's rotation failed (perhaps before it started): say so, in its own terms.
        fields["rotation"] = {**writer.rotation, "phase": "Failed", "message": str(exc),
                              "finishedAt": conditions.now()}
    try:
        writer.patch(fields)
    except RotationOperatorError as second:
        log.error("could not write the failure to status: %s", second)


