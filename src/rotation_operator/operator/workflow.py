"""One policy's reconciliation: Secrets → engine → status.  No Kopf in here.

The handlers call :func:`reconcile` (create, resume, spec change) and :func:`refresh`
(timer).  A reconcile is one pass: prepare the database once, decide once
(:func:`~rotation_operator.policy.decisions.decide`), act, report.  Everything the user sees is
written here: status fields, conditions, Events (through the ``Reporter`` the handler
passes in, so this module stays free of Kopf).  Errors are raised as
:class:`~rotation_operator.errors.RotationOperatorError`; the handler boundary turns them
into a condition, an Event and a Kopf retry.

Between batches the running rotation looks at its policy again (:class:`Control`, at most
every two seconds): ``spec.rotation.paused`` stops it cleanly, and so does deleting the
policy.  No Kubernetes call happens inside a database transaction: the engine calls back
only between them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from rotation_operator.crypto import sources
from rotation_operator.crypto.kek import Kek
from rotation_operator.errors import (
    AccessDenied,
    ConfigError,
    DatabaseUnavailable,
    KekError,
    KubernetesUnavailable,
    NotLeading,
    RotationCancelled,
    RotationOperatorError,
    RotationPaused,
    SecretError,
)
from rotation_operator.operator import conditions, kube, leader, metrics, status
from rotation_operator.operator.conditions import READY
from rotation_operator.operator.settings import OperatorSettings
from rotation_operator.operator.spec import Policy
from rotation_operator.policy.config import RotationOptions, StoreConfig
from rotation_operator.policy.decisions import Action, Decision, Request, decide, wants_rotation
from rotation_operator.policy.reasons import Reason
from rotation_operator.rotation.engine import Engine, RotationResult
from rotation_operator.rotation.inspection import Snapshot, snapshot
from rotation_operator.rotation.lifecycle import Lifecycle, Outcome

log = logging.getLogger(__name__)
_busy: dict[tuple[str, str], threading.Lock] = {}
_busy_guard = threading.Lock()
_ACTS = (Action.ROTATE, Action.RESUME, Action.SWEEP, Action.REKEY)


class Reporter(Protocol):
    """Posts Kubernetes Events for the policy (Kopf's ``kopf.info``/``kopf.warn``)."""

    def info(self, reason: str, message: str) -> None: ...
    def warn(self, reason: str, message: str) -> None: ...


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


def policy_lock(policy: Policy) -> threading.Lock:
    with _busy_guard:
        return _busy.setdefault((policy.namespace, policy.name), threading.Lock())


class StatusWriter:
    """Keeps the conditions this process wrote, so successive patches compose."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.conds = policy.conditions()
        #: The last ``status.rotation`` this run wrote (a failure marks it Failed).
        self.rotation: dict[str, Any] | None = None

    def condition(self, type_: str, status: bool, reason: str, message: str) -> None:
        self.conds = conditions.set_condition(self.conds, type_, status, reason, message,
                                              self.policy.generation)

    def apply(self, changes: Iterable[status.Change]) -> None:
        """Set each condition of ``changes`` (from :mod:`.status`), in order."""
        for c in changes:
            self.condition(c.type, c.status, c.reason, c.message)

    def patch(self, fields: Mapping[str, Any] | None = None, *, with_conditions: bool = True,
              resource_version: str | None = None) -> None:
        body: dict[str, Any] = dict(fields or {})
        if "rotation" in body:
            self.rotation = dict(body["rotation"])
        if with_conditions:
            body["conditions"] = self.conds
            body["observedGeneration"] = self.policy.generation
        kube.patch_status(self.policy.namespace, self.policy.name, body, resource_version)
        if with_conditions:
            metrics.observe_conditions(self.policy.namespace, self.policy.name, self.conds)


class Control:
    """Called by the engine between batches: stops the rotation when this replica no
    longer leads or is stopping (every call), or when its policy is paused or deleted
    (looked up at most every ``interval`` seconds)."""

    def __init__(self, policy: Policy, interval: float = 2.0):
        self.policy = policy
        self.interval = interval
        self._checked = time.monotonic() - interval  # the first call looks (a resumed
        # scheduled rotation adopts a bump known already, before its first batch)

    def __call__(self) -> int | None:
        """Raise to stop; otherwise the ``spec.version`` asked for now (when looked up)."""
        if not leader.may_act():
            raise NotLeading("this replica no longer leads, or is stopping: rotation "
                             "stopped between batches; the leader resumes it")
        if time.monotonic() - self._checked < self.interval:
            return None
        self._checked = time.monotonic()
        p = self.policy
        try:
            obj = kube.get_policy(p.namespace, p.name)
        except KubernetesUnavailable as exc:  # keep going; the next check may answer
            log.warning("could not look up %s/%s between batches: %s", p.namespace, p.name, exc)
            return None
        meta = (obj or {}).get("metadata") or {}
        if obj is None or meta.get("deletionTimestamp") or (p.uid and meta.get("uid") != p.uid):
            raise RotationCancelled(f"policy {p.namespace}/{p.name} was deleted: rotation "
                                    "stopped between batches (a re-created policy resumes it)")
        now = Policy.from_object(obj, p.namespace, p.name)
        if now.paused:
            raise RotationPaused("spec.rotation.paused was set: rotation stopped between "
                                 "batches; clear it to resume")
        return now.version


@dataclass
class Keks:
    """The policy's KEKs as read now: the current one, the previous ones, and the sources
    whose bytes look like text (a weak, passphrase-like KEK)."""

    current: Kek
    previous: list[Kek]
    weak: list[str]

    @property
    def all(self) -> list[Kek]:
        return [self.current, *self.previous]

    def close(self) -> None:
        for kek in self.all:
            close = getattr(kek, "close", None)
            if close is not None:
                close()


def read_keks(policy: Policy) -> Keks:
    """``spec.kek`` and ``spec.previousKeks``, from Secrets or PKCS#11 tokens."""
    spec = policy.spec.get("kek") or {}
    weak: list[str] = []
    current = _kek(policy, spec, "spec.kek", weak)
    previous = [_kek(policy, item, f"spec.previousKeks[{i}]", weak)
                for i, item in enumerate(policy.spec.get("previousKeks") or [])]
    return Keks(current, previous, weak)


def _kek(policy: Policy, source: Mapping[str, Any], where: str, weak: list[str]) -> Kek:
    ns = policy.namespace
    ref = source.get("secretRef") or {}
    if ref.get("name"):
        key = ref.get("key", "kek")
        raw = kube.read_secret(ns, ref["name"], key, "KEK")
        return sources.secret_kek(raw, f"Secret {ns}/{ref['name']} key {key}",
                                  on_weak=weak.append)
    hsm = source.get("pkcs11") or {}
    pin_ref = hsm.get("pinSecretRef") or {}
    if not (hsm.get("module") and hsm.get("tokenLabel") and hsm.get("keyLabel")
            and pin_ref.get("name")):
        raise ConfigError(f"{where} needs secretRef.name, or pkcs11 with module, tokenLabel, "
                          "keyLabel and pinSecretRef.name")
    pin = kube.read_secret(ns, pin_ref["name"], pin_ref.get("key", "pin"), "HSM PIN")
    return sources.pkcs11_kek(hsm["module"], hsm["tokenLabel"], hsm["keyLabel"], pin)


def referenced_secrets(policy: Policy) -> list[str]:
    """Names of the Secrets the policy reads: the DSN's, the KEK's (or its HSM PIN's), and
    those of ``previousKeks``, without duplicates."""
    names = [((policy.spec.get("database") or {}).get("secretRef") or {}).get("name")]
    for source in [policy.spec.get("kek") or {}, *(policy.spec.get("previousKeks") or [])]:
        names.append((source.get("secretRef") or {}).get("name"))
        names.append(((source.get("pkcs11") or {}).get("pinSecretRef") or {}).get("name"))
    return sorted({n for n in names if isinstance(n, str) and n})


def row_version(policy: Policy, table: str, row_id: object) -> str:
    """What one row of a target is now (its ``xmin``, or ``gone``), for noticing that a
    row a rotation stopped on was repaired; read as the operator's role, needs no KEK."""
    from psycopg import sql

    from rotation_operator.store.database import connect, db_errors

    target = next((t for t in policy.store_config().targets
                   if t.name == table or t.table == table), None)
    if target is None:
        return "gone"
    ident = sql.Identifier(target.schema, target.table) if target.schema else \
        sql.Identifier(target.table)
    with db_errors(), connect(read_dsn(policy)) as conn:
        row = conn.execute(sql.SQL("SELECT xmin::text FROM {} WHERE {} = %s").format(
            ident, sql.Identifier(target.id_column)), (row_id,)).fetchone()
    return str(row[0]) if row else "gone"


def read_secrets(policy: Policy) -> tuple[str, Keks]:
    db_ref = (policy.spec.get("database") or {}).get("secretRef") or {}
    if not db_ref.get("name"):
        raise ConfigError("spec.database.secretRef.name is required")
    keks = read_keks(policy)  # the KEK first: its absence is the likelier mistake
    return read_dsn(policy), keks


def read_dsn(policy: Policy) -> str:
    db_ref = (policy.spec.get("database") or {}).get("secretRef") or {}
    db_key = db_ref.get("key", "dsn")
    dsn = kube.read_secret(policy.namespace, db_ref.get("name", ""), db_key, "database DSN")
    try:
        return dsn.decode().strip()
    except UnicodeDecodeError:
        raise ConfigError(f"Secret {policy.namespace}/{db_ref.get('name')} key {db_key} is not "
                          "UTF-8 text") from None


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
    engine = Engine(dsn, cfg, keks.all, actor=policy.actor, owner=policy.owner)
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
    _write_ready(policy, writer, snap, result, decision, keks)
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
        if exc.reason == "RowDecryptFailed":
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
                 result: RotationResult | None, decision: Decision, keks: Keks) -> None:
    request = policy.request()
    writer.apply(status.ready(decision, result, snap))
    writer.apply(status.degraded(snap, writer.conds, clear_other=True))
    writer.apply(status.kek_weak(keks.weak, writer.conds))
    writer.apply(status.key_usage(snap, request, writer.conds))
    # Metrics first: whoever sees the status (kubectl wait) may scrape right after.
    metrics.observe_counts(policy.namespace, policy.name, snap)
    _observe_schedule(policy, request)
    writer.patch({**status.snapshot_fields(snap, conditions.now()),
                  **status.kek_fields(snap, {k.fingerprint for k in keks.all},
                                      keks.current.fingerprint, keks.current.describe(),
                                      status.kek_protection(keks.current)),
                  **status.schedule_fields(snap, request)})


def _observe_schedule(policy: Policy, request: Request) -> None:
    """The policy's maxKeyAge as a metric (the KeyTooOld alert compares with it)."""
    if request.max_key_age is not None:
        metrics.MAX_KEY_AGE.labels(policy.namespace, policy.name).set(
            request.max_key_age.total_seconds())
    else:  # removed from the spec: no series, so KeyTooOld cannot fire on a stale one
        metrics.clear_max_key_age(policy.namespace, policy.name)


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
    request = policy.request(now, "refresh")
    lock = policy_lock(policy)
    if not lock.acquire(blocking=False):
        return False
    try:
        healed = False
        if transient:
            dsn, keks = read_secrets(policy)
            try:
                prepared = Engine(dsn, cfg, keks.all, actor=policy.actor,
                                  owner=policy.owner).prepare()
            finally:
                keks.close()
            healed = failing and prepared.state.served is not None and \
                prepared.state.served >= policy.desired
        else:
            dsn = read_dsn(policy)
        counting = _counting(policy, settings, now)
        snap = snapshot(dsn, cfg, **counting)
        decision = decide(request, snap.state())
        if decision.action is Action.SWEEP:
            interval = settings.control_interval if settings else 2.0
            snap = _sweep(policy, events, cfg, interval)
        outcome = _lifecycle(policy, events, dsn, cfg, snap, now)
        if outcome.done or outcome.changed:
            snap = snapshot(dsn, cfg, **counting)
        if decision.action is Action.SWEEP:  # the next step, on what the sweep left
            decision = decide(request, snap.state())
    finally:
        lock.release()
    if decision.action is Action.ROTATE and settings is not None:
        # A scheduled rotation is a reconcile like any other (decided there, by the same
        # pure function, on the wall clock: an injected ``now`` only serves this refresh's
        # own look); it writes the full status.
        reconcile(policy, settings, events)
        return True
    _observe_schedule(policy, request)
    fields = {**status.snapshot_fields(snap, conditions.now()),
              **status.schedule_fields(snap, request),
              "retention": status.retention_fields(outcome)}
    if not snap.exact:  # keep when the counts were last exact
        fields["counts"]["lastExactAt"] = (policy.status.get("counts") or {}).get(
            "lastExactAt")
    metrics.observe_counts(policy.namespace, policy.name, snap)
    _refresh_conditions(policy, snap, request, healed, fields)
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
                        fields: dict[str, Any]) -> None:
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


def _sweep(policy: Policy, events: Reporter, cfg: StoreConfig, interval: float) -> Snapshot:
    """Move rows under retired keys onto the active key, and say so."""
    dsn, keks = read_secrets(policy)
    engine = Engine(dsn, cfg, keks.all, actor=policy.actor, owner=policy.owner)
    labels = (policy.namespace, policy.name)
    metrics.rotation_started(*labels)
    try:
        result = engine.sweep(policy.options(), control=Control(policy, interval))
    finally:
        metrics.rotation_ended(*labels)
        keks.close()
    if result.performed:
        metrics.ROWS.labels(*labels).inc(result.re_encrypted)
        events.warn(Reason.STALE_ROWS_SWEPT, status.summary(result))
    return snapshot(dsn, cfg)


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


