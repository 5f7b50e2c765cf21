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

import dataclasses
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from rotation_operator.crypto import codec
from rotation_operator.crypto.kek import Kek, SecretKek
from rotation_operator.errors import (
    ConfigError,
    KubernetesUnavailable,
    NotLeading,
    RotationCancelled,
    RotationOperatorError,
    RotationPaused,
)
from rotation_operator.operator import conditions, kube, leader, metrics
from rotation_operator.operator.conditions import (
    DEGRADED,
    KEK_WEAK,
    KEY_USAGE,
    READY,
    ROTATING,
    THROTTLED,
)
from rotation_operator.operator.settings import OperatorSettings
from rotation_operator.policy.config import (
    MAX_DURATION,
    RotationOptions,
    StoreConfig,
    Target,
    key_age,
    parse_duration,
)
from rotation_operator.policy.decisions import (
    Action,
    Decision,
    Request,
    Retention,
    State,
    decide,
    next_rotation_due,
    rotation_helps,
    usage_high,
    wants_rotation,
)
from rotation_operator.rotation.engine import Engine, RotationResult
from rotation_operator.rotation.inspection import Snapshot, rfc3339, snapshot
from rotation_operator.rotation.lifecycle import MIN_DAYS, Lifecycle, Outcome

log = logging.getLogger(__name__)
_busy: dict[tuple[str, str], threading.Lock] = {}
_busy_guard = threading.Lock()
#: Ready reasons the refresh timer may clear once counts can be read again.
_TRANSIENT = ("DatabaseUnavailable", "SecretMissing", "Forbidden", "KubernetesUnavailable",
              "KEKMismatch", "KEKInvalid", "LegacyRowsNeedRawKEK", "HSMModuleMissing",
              "HSMTokenMissing", "HSMLoginFailed", "HSMKeyMissing", "HSMKeyUnsuitable",
              "HSMError")
_ACTS = (Action.ROTATE, Action.RESUME, Action.SWEEP, Action.REKEY)
#: maxEncryptionsPerKey by default: 2^30, a quarter of NIST SP 800-38D's 2^32 bound for
#: random 96-bit nonces under one key.
DEFAULT_MAX_ENCRYPTIONS = 1 << 30
#: Every field of ``status.rotation``: each write names all of them (None deletes one in a
#: merge patch), so the object always describes the one rotation it names.
ROTATION_FIELDS = ("phase", "kind", "mode", "policyVersion", "fromVersion", "toVersion", "done",
                   "total", "progress", "reEncrypted", "legacyMigrated", "resumed", "startedAt",
                   "finishedAt", "seconds", "message", "handover", "caughtInHandover",
                   "sweptAfter", "rowsPerSecond", "maxRowsPerSecond", "throttle")


class Reporter(Protocol):
    """Posts Kubernetes Events for the policy (Kopf's ``kopf.info``/``kopf.warn``)."""

    def info(self, reason: str, message: str) -> None: ...
    def warn(self, reason: str, message: str) -> None: ...


@dataclass(frozen=True)
class Policy:
    """The parts of an EncryptionPolicy object the workflow reads."""

    namespace: str
    name: str
    generation: int
    spec: Mapping[str, Any]
    status: Mapping[str, Any]
    uid: str = ""

    @property
    def desired(self) -> int:
        version = self.spec.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ConfigError("spec.version must be a positive integer")
        return version

    @property
    def actor(self) -> str:
        return f"EncryptionPolicy {self.namespace}/{self.name} version={self.spec.get('version')}"

    @property
    def owner(self) -> str:
        """Whom the keys table's targets are recorded for."""
        return f"EncryptionPolicy {self.namespace}/{self.name}"

    @property
    def paused(self) -> bool:
        return bool((self.spec.get("rotation") or {}).get("paused", False))

    def request(self, now: datetime | None = None) -> Request:
        """What this policy asks of the database now: its version, and what it wants done
        by itself (a maximum key age, a usage bound)."""
        r = self.spec.get("rotation") or {}
        age = r.get("maxKeyAge")
        limit = r.get("maxEncryptionsPerKey", DEFAULT_MAX_ENCRYPTIONS)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ConfigError(f"maxEncryptionsPerKey {limit!r} is not a positive integer")
        return Request("policy", self.desired, self.paused, now or datetime.now(UTC),
                       key_age(age) if age else None, limit,
                       bool(r.get("rotateOnUsage", False)))

    def retention(self) -> Retention | None:
        ret = self.spec.get("retention")
        if not ret:
            return None
        days = {}
        for field in ("disableAfterDays", "destroyAfterDays"):
            value = ret.get(field, MIN_DAYS)
            if not isinstance(value, int) or isinstance(value, bool) or value < MIN_DAYS:
                raise ConfigError(f"retention.{field} {value!r} is below {MIN_DAYS} days: a key "
                                  "destroyed early cannot be brought back")
            if value > MAX_DURATION.days:
                raise ConfigError(f"retention.{field} {value} is more than "
                                  f"{MAX_DURATION.days} days")
            days[field] = value
        return Retention(timedelta(days=days["disableAfterDays"]),
                         timedelta(days=days["destroyAfterDays"]))

    def store_config(self) -> StoreConfig:
        db = self.spec.get("database") or {}
        targets = [Target.from_spec(t) for t in self.spec.get("targets") or []]
        return StoreConfig(targets, db.get("keysTable", "encryption_keys"), db.get("schema"))

    def options(self) -> RotationOptions:
        r = self.spec.get("rotation") or {}
        defaults = RotationOptions()
        return RotationOptions(
            mode=r.get("mode", "Online"), batch_size=r.get("batchSize", defaults.batch_size),
            vacuum=r.get("vacuum", True), workers=r.get("workers", defaults.workers),
            grace=r.get("graceSeconds", defaults.grace),
            max_batch_bytes=r.get("maxBatchBytes", defaults.max_batch_bytes),
            lock_timeout=r.get("lockTimeoutSeconds", defaults.lock_timeout),
            statement_timeout=r.get("statementTimeoutSeconds", defaults.statement_timeout),
            handover_timeout=r.get("handoverTimeoutSeconds", defaults.handover_timeout),
            max_rows_per_second=r.get("maxRowsPerSecond", 0),
            max_replication_lag=None if r.get("maxReplicationLag") is None else parse_duration(
                r["maxReplicationLag"], "maxReplicationLag").total_seconds(),
            max_blocked_sessions=r.get("maxBlockedSessions"))

    def conditions(self) -> list[dict[str, Any]]:
        return [dict(c) for c in self.status.get("conditions") or []]


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
        spec = obj.get("spec") or {}
        if (spec.get("rotation") or {}).get("paused"):
            raise RotationPaused("spec.rotation.paused was set: rotation stopped between "
                                 "batches; clear it to resume")
        version = spec.get("version")
        return version if isinstance(version, int) else None


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
        described = f"Secret {ns}/{ref['name']} key {key}"
        if codec.kek_looks_like_text(raw):
            weak.append(described)
        return SecretKek(codec.parse_kek(raw, described), described)
    hsm = source.get("pkcs11") or {}
    pin_ref = hsm.get("pinSecretRef") or {}
    if not (hsm.get("module") and hsm.get("tokenLabel") and hsm.get("keyLabel")
            and pin_ref.get("name")):
        raise ConfigError(f"{where} needs secretRef.name, or pkcs11 with module, tokenLabel, "
                          "keyLabel and pinSecretRef.name")
    pin = kube.read_secret(ns, pin_ref["name"], pin_ref.get("key", "pin"), "HSM PIN")
    from rotation_operator.crypto.pkcs11 import (
        Pkcs11Kek,  # the PKCS#11 binding only where it is used
    )
    return Pkcs11Kek(hsm["module"], hsm["tokenLabel"], hsm["keyLabel"], pin.strip())


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
    from rotation_operator.store.database import connect, db_errors
    from rotation_operator.store.targets import row_xmin

    target = next((t for t in policy.store_config().targets
                   if t.name == table or t.table == table), None)
    if target is None:
        return "gone"
    with db_errors(), connect(read_dsn(policy)) as conn:
        xmin = row_xmin(conn, target, row_id)
    return xmin if xmin is not None else "gone"


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


def rotation_status(**fields: Any) -> dict[str, Any]:
    """A complete ``status.rotation``: unnamed fields are None (removed by the patch)."""
    unknown = set(fields) - set(ROTATION_FIELDS)
    assert not unknown, unknown
    return {name: fields.get(name) for name in ROTATION_FIELDS}


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
        writer.condition(ROTATING, True, "RotationRequested",
                         f"spec.version {desired} requested; preparing the rotation")
        writer.condition(READY, False, "Rotating", f"rotating to version {desired}")
        writer.patch({"rotation": rotation_status(phase="Pending", policyVersion=desired,
                                                  startedAt=conditions.now())})
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
    engine = Engine(dsn, cfg, keks.current, actor=policy.actor, owner=policy.owner,
                    previous=keks.previous)
    request = policy.request()
    result: RotationResult | None = None
    with policy_lock(policy):
        prepared = engine.prepare(desired)
        if request.rotate_on_usage and prepared.state.rows is None:
            # a rotation for usage is decided on the rows too (a fresh key must start well
            # below the bound); the statistics suffice for that, the engine counts again
            counted = snapshot(dsn, cfg, exact=False, exact_below=settings.exact_count_below)
            prepared = dataclasses.replace(prepared, state=dataclasses.replace(
                prepared.state, rows=counted.secret_count))
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
                prepared = engine.prepare(desired)
                decision = decide(request, prepared.state)
        except RotationPaused as exc:
            decision = Decision(Action.PAUSED, exc.reason, str(exc))
        except RotationCancelled as exc:
            log.info("%s/%s: %s", policy.namespace, policy.name, exc)
            return str(exc)
        snap = snapshot(dsn, cfg)
    if result is not None and result.rekeyed:
        events.info("KEKRotated", f"rewrapped DEK {', '.join(f'v{v}' for v in result.rekeyed)} "
                                  f"under the KEK {keks.current.fingerprint}")
    _write_ready(policy, writer, snap, result, decision, keks)
    return decision.message if result is None else _summary(result)


def schedule_fields(policy: Policy, snap: Snapshot, request: Request) -> dict[str, Any]:
    """``status.nextRotationDue``, and the usage of the active key."""
    active = snap.active_key
    state = State(snap.active_version or 0, snap.served_version, None,
                  active_created=active.created_at if active else None,
                  active_encryptions=max(active.encryptions, active.rows) if active else 0)
    due = next_rotation_due(request, state)
    if request.max_key_age is not None:
        metrics.MAX_KEY_AGE.labels(policy.namespace, policy.name).set(
            request.max_key_age.total_seconds())
    else:  # removed from the spec: no series, so KeyTooOld cannot fire on a stale one
        metrics.clear_max_key_age(policy.namespace, policy.name)
    return {"nextRotationDue": rfc3339(due)}


def _usage(writer: StatusWriter, snap: Snapshot, request: Request) -> None:
    active = snap.active_key
    if active is None or request.max_encryptions is None:
        return
    used = max(active.encryptions, active.rows)
    state = State(active.version, None, None, active_encryptions=used)
    if usage_high(request, state):
        too_big = snap.secret_count >= request.max_encryptions // 2
        hint = (" (the targets hold so many rows that every new key starts near the bound: "
                "raise maxEncryptionsPerKey)" if too_big else "")
        writer.condition(KEY_USAGE, True, "UsageBoundNear" if not too_big else "TableNearBound",
                         f"DEK v{active.version} has encrypted about {used} values of the "
                         f"{request.max_encryptions} one key may (maxEncryptionsPerKey): "
                         "rotate it" + (", as the policy does by itself" if request.rotate_on_usage
                                        else " (or set rotation.rotateOnUsage)") + hint)
    elif conditions.get(writer.conds, KEY_USAGE) is not None:
        writer.condition(KEY_USAGE, False, "UsageBoundFar",
                         f"DEK v{active.version} has encrypted about {used} values")


def _rotate(policy: Policy, settings: OperatorSettings, events: Reporter, writer: StatusWriter,
            engine: Engine, options: RotationOptions, decision: Decision, request: Request,
            prepared: Any) -> RotationResult:
    started = conditions.now()
    labels = (policy.namespace, policy.name)
    sweep = decision.action is Action.SWEEP
    rekey = decision.action is Action.REKEY
    if rekey:
        writer.condition(ROTATING, True, "Rekeying", decision.message)
        writer.condition(READY, False, "Rekeying", decision.message)
    elif not sweep:
        events.info("RotationStarted", f"{decision.message} ({options.mode} mode, batches of "
                                       f"{options.batch_size})")
        writer.condition(ROTATING, True, "RotationRunning", decision.message)
        writer.condition(READY, False, "Rotating", f"rotating to version {policy.desired}"
                         if decision.kind == "policy" else decision.message)
    kind = "sweep" if sweep else "rekey" if rekey else decision.kind
    base = {"phase": "Running", "kind": kind, "mode": options.mode,
            "policyVersion": policy.desired if kind in ("policy", "rekey") else None,
            "startedAt": started,
            "maxRowsPerSecond": options.max_rows_per_second or None}
    writer.patch({"rotation": rotation_status(**base, done=0, total=0,
                                              progress=_progress(0, 0))})
    last = [0.0]
    t_start = time.monotonic()
    # the latest counts (for the Failed record too) and the throttle's latest word
    seen: dict[str, Any] = {"done": 0, "total": 0, "rowsPerSecond": None, "throttle": None}

    def running_status(**changes: Any) -> dict[str, Any]:
        fields = {**base, **seen, **changes}
        return rotation_status(**fields, progress=_progress(fields["done"], fields["total"]))

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
        if reason is None:
            writer.condition(THROTTLED, False, "NotThrottled", "the rotation is not waiting "
                             "for a limit")
        else:
            writer.condition(THROTTLED, True, reason, message)
        try:
            writer.patch({"rotation": running_status()})
        except RotationOperatorError as exc:
            log.warning("throttle status update failed: %s", exc)

    metrics.rotation_started(*labels)
    t0 = time.monotonic()
    try:
        result = engine.execute(request, options, prepared=prepared, progress=progress,
                                control=Control(policy, settings.control_interval),
                                throttled=throttled)
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
        if conditions.get(writer.conds, THROTTLED) is not None:
            writer.condition(THROTTLED, False, "NotThrottled", "no rotation is running")
    metrics.DURATION.labels(*labels).observe(time.monotonic() - t0)
    metrics.ROWS.labels(*labels).inc(result.re_encrypted)
    metrics.ROTATIONS.labels(*labels, "succeeded" if result.performed else "noop").inc()
    rotated = _rotated(result)
    if result.decision is not None and result.decision.action is Action.SWEEP:
        kind = "sweep"
    elif rotated:
        kind = result.kind
    writer.patch({"rotation": rotation_status(**{
        **base, "phase": "Succeeded" if result.performed else "Skipped", "kind": kind,
        "policyVersion": result.requested_version, "fromVersion": result.from_version,
        "toVersion": result.to_version, "done": result.re_encrypted,
        "total": result.re_encrypted,
        "progress": _progress(result.re_encrypted, result.re_encrypted),
        "reEncrypted": result.re_encrypted, "legacyMigrated": result.legacy_migrated,
        "resumed": result.resumed, "finishedAt": conditions.now(),
        "seconds": round(result.seconds, 3), "message": _summary(result),
        "handover": result.handover or None, "caughtInHandover": result.caught_in_handover,
        "sweptAfter": result.swept_after})},
        with_conditions=False)
    if kind == "sweep":
        events.warn("StaleRowsSwept", _summary(result))
    elif rotated:
        if rekey:  # a rekey made room for this rotation: it started only now
            events.info("RotationStarted", result.decision.message if result.decision else "")
        events.info("RotationFinished", _summary(result))
        if result.swept_after or result.caught_in_handover:
            events.info("OldKeyWritesCaught",
                        f"{result.caught_in_handover} rows written under old keys during the "
                        f"rotation were moved by its final passes, {result.swept_after} "
                        "right after it finished")
    return result


def _rotated(result: RotationResult) -> bool:
    """Whether ``result`` includes a rotation (not only a rekey or a sweep)."""
    return result.performed and result.decision is not None and \
        result.decision.action in (Action.ROTATE, Action.RESUME)


def _write_ready(policy: Policy, writer: StatusWriter, snap: Snapshot,
                 result: RotationResult | None, decision: Decision, keks: Keks) -> None:
    performed = result is not None and _rotated(result)
    if decision.action is Action.BEHIND:
        writer.condition(READY, False, decision.reason, decision.message)
        writer.condition(ROTATING, False, "Idle", "no rotation running")
    elif decision.action is Action.PAUSED:
        writer.condition(READY, False, "Paused", decision.message)
        writer.condition(ROTATING, False, "Paused", decision.message)
    else:
        rekeyed = result is not None and bool(result.rekeyed)
        text = _summary(result) if result is not None and (performed or rekeyed) else (
            f"active key v{snap.active_version}; {decision.message}")
        reason = "RotationSucceeded" if performed else "KEKRotated" if rekeyed else "KeysReady"
        writer.condition(READY, True, reason, text)
        writer.condition(ROTATING, False, "Idle", "no rotation running")
    _degraded(writer, snap, clear_other=True)
    if keks.weak:
        writer.condition(KEK_WEAK, True, "KEKLooksLikeText",
                         f"the KEK from {', '.join(keks.weak)} is 32 printable characters, "
                         "taken as raw bytes: a passphrase-like key is far weaker than 256 bits; "
                         "generate one with `openssl rand -base64 32` and rekey to it")
    elif conditions.get(writer.conds, KEK_WEAK) is not None:
        writer.condition(KEK_WEAK, False, "KEKRandom", "the KEK does not look like text")
    request = policy.request()
    _usage(writer, snap, request)
    # Metrics first: whoever sees the status (kubectl wait) may scrape right after.
    metrics.observe_counts(policy.namespace, policy.name, snap)
    writer.patch({**snapshot_fields(snap), **kek_fields(snap, keks),
                  **schedule_fields(policy, snap, request)})


def _degraded(writer: StatusWriter, snap: Snapshot, *, clear_other: bool) -> None:
    """Degraded from the counts: rows under a retired key, with their own reason.
    ``clear_other``: also clear a Degraded set by an earlier failure."""
    if snap.retired_count and snap.running is None:
        writer.condition(DEGRADED, True, "RowsUnderRetiredKey",
                         f"{snap.retired_count} rows are under a retired key, or under the KEK "
                         "itself after a rotation (written by an application with a stale key "
                         "ring, or one that does not use DEKs); the refresh sweeps them onto "
                         f"DEK v{snap.active_version}")
        return
    current = conditions.get(writer.conds, DEGRADED) or {}
    if clear_other or current.get("reason") == "RowsUnderRetiredKey":
        writer.condition(DEGRADED, False, "AsExpected", "keys and data are consistent")


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
        ready.get("reason") in _TRANSIENT
    transient = recheck or failing
    cfg = policy.store_config()
    request = policy.request(now)
    lock = policy_lock(policy)
    if not lock.acquire(blocking=False):
        return False
    try:
        healed = False
        if transient:
            dsn, keks = read_secrets(policy)
            try:
                prepared = Engine(dsn, cfg, keks.current, actor=policy.actor,
                                  owner=policy.owner, previous=keks.previous).prepare()
            finally:
                keks.close()
            healed = failing and prepared.state.served is not None and \
                prepared.state.served >= policy.desired
        else:
            dsn = read_dsn(policy)
        counting = _counting(policy, settings, now)
        snap = snapshot(dsn, cfg, **counting)
        if snap.retired_count and snap.running is None and not policy.paused:
            interval = settings.control_interval if settings else 2.0
            snap = _sweep(policy, events, cfg, interval)
        outcome = _lifecycle(policy, events, dsn, cfg, snap, now)
        if outcome.done or outcome.changed:
            snap = snapshot(dsn, cfg, **counting)
        due = _scheduled_due(snap, request)
    finally:
        lock.release()
    if due and settings is not None:
        # A scheduled rotation is a reconcile like any other (decided there, by the same
        # pure function, on the wall clock: an injected ``now`` only serves this refresh's
        # own look); it writes the full status.
        reconcile(policy, settings, events)
        return True
    fields = {**snapshot_fields(snap), **kek_fields_from_status(snap, policy.status),
              **schedule_fields(policy, snap, request), "retention": retention_fields(outcome)}
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
    fresh = Policy(policy.namespace, policy.name, int(meta.get("generation") or 0),
                   current.get("spec") or {}, current.get("status") or {},
                   str(meta.get("uid") or ""))
    writer = StatusWriter(fresh)
    before = [dict(c) for c in writer.conds]
    if healed:
        writer.condition(READY, True, "KeysReady", f"active key v{snap.active_version}; "
                                                   "database and Secrets reachable again")
    _degraded(writer, snap, clear_other=healed)
    _usage(writer, snap, request)
    if writer.conds == before:
        writer.patch(fields, with_conditions=False)
        return
    try:
        writer.patch(fields, resource_version=str(meta.get("resourceVersion") or ""))
    except kube.Conflict:  # someone wrote meanwhile: counts now, conditions next time
        writer.patch(fields, with_conditions=False)


def _scheduled_due(snap: Snapshot, request: Request) -> bool:
    """Whether the policy's own schedule (age, usage) asks for a rotation now."""
    if snap.running is not None or request.paused or snap.active_key is None:
        return False
    active = snap.active_key
    state = State(active.version, snap.served_version, None, active_created=active.created_at,
                  active_encryptions=max(active.encryptions, active.rows),
                  rows=snap.secret_count)
    due = next_rotation_due(request, state)
    return (due is not None and request.now is not None and request.now >= due) or (
        request.rotate_on_usage and usage_high(request, state)
        and rotation_helps(request, state))


def _lifecycle(policy: Policy, events: Reporter, dsn: str, cfg: StoreConfig, snap: Snapshot,
               now: datetime) -> Outcome:
    """The census, and the retention steps that are due (none while paused)."""
    outcome = Lifecycle(dsn, cfg, actor=policy.actor, owner=policy.owner).run(
        policy.retention(), now, snap.rows_per_key(), apply=not policy.paused,
        exact=snap.exact)
    for step in outcome.done:
        what = "disabled (no ring unwraps it; `keys enable` undoes it)" \
            if step.action == "disable" else "destroyed (its wrapped bytes are erased)"
        events.warn("KeyDisabled" if step.action == "disable" else "KeyDestroyed",
                    f"DEK v{step.version} {what}: spec.retention")
    for message in outcome.refused:
        events.warn("KeyInUse", message)
    return outcome


def retention_fields(outcome: Outcome) -> dict[str, Any]:
    """``status.retention``: the next step of each key's end of life (the dry run)."""
    return {"steps": [{"version": s.version, "action": s.action, "due": rfc3339(s.due),
                       "ready": s.ready} for s in outcome.plan if s not in outcome.done]}


def _sweep(policy: Policy, events: Reporter, cfg: StoreConfig, interval: float) -> Snapshot:
    """Move rows under retired keys onto the active key, and say so."""
    dsn, keks = read_secrets(policy)
    engine = Engine(dsn, cfg, keks.current, actor=policy.actor, owner=policy.owner,
                    previous=keks.previous)
    labels = (policy.namespace, policy.name)
    metrics.rotation_started(*labels)
    try:
        result = engine.sweep(policy.options(), control=Control(policy, interval))
    finally:
        metrics.rotation_ended(*labels)
        keks.close()
    if result.performed:
        metrics.ROWS.labels(*labels).inc(result.re_encrypted)
        events.warn("StaleRowsSwept", _summary(result))
    return snapshot(dsn, cfg)


def fail(policy: Policy, exc: RotationOperatorError, events: Reporter,
         writer: StatusWriter) -> None:
    """The status write for a failure: Ready=False with the error's reason.

    ``writer``: the failing run's own, so a rotation it flagged (Rotating=True, written
    after Kopf took the body) is reported as RotationFailed rather than Idle.
    """
    was_rotating = (conditions.get(writer.conds, ROTATING) or {}).get("status") == "True"
    before = conditions.get(writer.conds, READY) or {}
    repeated = before.get("status") == "False" and before.get("reason") == exc.reason and \
        before.get("message") == str(exc)[:conditions.MAX_MESSAGE]
    writer.condition(READY, False, exc.reason, str(exc))
    writer.condition(ROTATING, False, "RotationFailed" if was_rotating else "Idle",
                     str(exc) if was_rotating else "no rotation running")
    writer.condition(DEGRADED, True, exc.reason, str(exc))
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


def snapshot_fields(snap: Snapshot) -> dict[str, Any]:
    return {**snap.summary(), "lastRefreshed": conditions.now()}


def kek_fields(snap: Snapshot, keks: Keks) -> dict[str, Any]:
    """``status.kek`` and each key's ``kek``: only fingerprints of KEKs presented are named
    (a stored fingerprint of an unknown KEK would let guesses be checked offline)."""
    return _kek_fields(snap, {k.fingerprint for k in keks.all}, keks.current.fingerprint,
                       keks.current.describe())


def kek_fields_from_status(snap: Snapshot, status: Mapping[str, Any]) -> dict[str, Any]:
    """The same from what the status already shows (the refresh reads no KEK): the current
    fingerprint, and the fingerprints already named, which were all presented once."""
    kek = status.get("kek") or {}
    current = kek.get("fingerprint")
    if not current:
        return {}
    shown = {k.get("kek") for k in status.get("keys") or []} - {None, "unknown"}
    return _kek_fields(snap, {current, *shown}, current, str(kek.get("source") or ""))


def _kek_fields(snap: Snapshot, presented: set[str], current: str, source: str
                ) -> dict[str, Any]:
    keys = snap.summary()["keys"]
    for key, status in zip(keys, snap.keys, strict=True):
        key["kek"] = None if status.state == "destroyed" else (
            status.kek_fingerprint if status.kek_fingerprint in presented else "unknown")
    # a destroyed key wraps nothing any more: it needs no KEK
    needed = any(k.kek_fingerprint != current for k in snap.keys if k.state != "destroyed")
    return {"keys": keys, "kek": {"fingerprint": current, "source": source,
                                  "previousKeksNeeded": needed}}


def _progress(done: int, total: int) -> str:
    if not total:
        return f"{done}/{total}"
    return f"{done}/{total} ({100.0 * done / total:.0f}%)"


def _summary(result: RotationResult) -> str:
    if result.rekeyed and not _rotated(result) and result.kind != "sweep":
        return (f"rewrapped DEK {', '.join(f'v{v}' for v in result.rekeyed)} under the new "
                "KEK" + (f"; {result.re_encrypted} legacy rows moved onto a DEK first"
                         if result.re_encrypted else ""))
    if not result.performed:
        return (result.decision.message if result.decision else
                f"version {result.requested_version} already served (key v{result.to_version})")
    if result.kind == "sweep":
        return (f"swept {result.re_encrypted} rows found under retired keys onto "
                f"v{result.to_version}")
    return (f"rotated v{result.from_version} -> v{result.to_version}: {result.re_encrypted} rows "
            f"re-encrypted ({result.legacy_migrated} legacy) in {result.seconds:.1f}s"
            + ("; resumed after an interruption" if result.resumed else "")
            + (f"; retired {', '.join(f'v{v}' for v in result.retired)}" if result.retired else ""))
