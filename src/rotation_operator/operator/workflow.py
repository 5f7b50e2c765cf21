"""One policy's reconciliation: Secrets → engine → status.  No Kopf in here.

The handlers call :func:`reconcile` (create, resume, spec change) and :func:`refresh`
(timer).  Everything the user sees is written here: status fields, conditions, events
(through the ``Reporter`` the handler passes in, so this module stays free of Kopf).
Errors are raised as :class:`~rotation_operator.errors.RotationOperatorError`; the handler
boundary turns them into a condition, an event and a Kopf retry.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg

from .. import crypto
from ..config import RotationOptions, StoreConfig, Target
from ..engine import Engine, RotationResult
from ..errors import ConfigError, RotationOperatorError, SchemaError
from ..inspection import Snapshot, snapshot
from ..keystore import KeyStore, connect, db_errors, first_line
from . import conditions, kube, metrics
from .conditions import DEGRADED, READY, ROTATING
from .decisions import Action, decide, wants_rotation
from .settings import OperatorSettings

log = logging.getLogger(__name__)
_busy: dict[tuple[str, str], threading.Lock] = {}
_busy_guard = threading.Lock()
#: Ready reasons the refresh timer may clear once counts can be read again.
_TRANSIENT = ("DatabaseUnavailable", "SecretMissing", "Forbidden")


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

    @property
    def desired(self) -> int:
        version = self.spec.get("version")
        if not isinstance(version, int) or version < 1:
            raise ConfigError("spec.version must be a positive integer")
        return version

    @property
    def actor(self) -> str:
        return f"EncryptionPolicy {self.namespace}/{self.name} version={self.spec.get('version')}"

    def store_config(self) -> StoreConfig:
        db = self.spec.get("database") or {}
        targets = [Target.from_spec(t) for t in self.spec.get("targets") or []]
        return StoreConfig(targets, db.get("keysTable", "encryption_keys"), db.get("schema"))

    def options(self) -> RotationOptions:
        r = self.spec.get("rotation") or {}
        return RotationOptions(mode=r.get("mode", "Online"), batch_size=r.get("batchSize", 5000),
                               vacuum=r.get("vacuum", True), workers=r.get("workers", 2),
                               grace=r.get("graceSeconds", 2.0))

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

    def condition(self, type_: str, status: bool, reason: str, message: str) -> None:
        self.conds = conditions.set_condition(self.conds, type_, status, reason, message,
                                              self.policy.generation)

    def patch(self, fields: Mapping[str, Any] | None = None, *, with_conditions: bool = True
              ) -> None:
        body: dict[str, Any] = dict(fields or {})
        if with_conditions:
            body["conditions"] = self.conds
            body["observedGeneration"] = self.policy.generation
        kube.patch_status(self.policy.namespace, self.policy.name, body)


def read_secrets(policy: Policy) -> tuple[str, bytes]:
    kek_ref = (policy.spec.get("kek") or {}).get("secretRef") or {}
    db_ref = (policy.spec.get("database") or {}).get("secretRef") or {}
    if not kek_ref.get("name") or not db_ref.get("name"):
        raise ConfigError("spec.kek.secretRef.name and spec.database.secretRef.name are required")
    kek_key, db_key = kek_ref.get("key", "kek"), db_ref.get("key", "dsn")
    raw = kube.read_secret(policy.namespace, kek_ref["name"], kek_key, "KEK")
    kek = crypto.parse_kek(raw, f"Secret {policy.namespace}/{kek_ref['name']} key {kek_key}")
    dsn = kube.read_secret(policy.namespace, db_ref["name"], db_key, "database DSN")
    try:
        return dsn.decode().strip(), kek
    except UnicodeDecodeError:
        raise ConfigError(f"Secret {policy.namespace}/{db_ref['name']} key {db_key} is not "
                          "UTF-8 text") from None


def reconcile(policy: Policy, settings: OperatorSettings, events: Reporter,
              writer: StatusWriter | None = None) -> str:
    """Initialise, rotate if spec.version asks for it, and write the full status.

    Returns a short summary for the handler's log line.  ``writer`` is the handler
    boundary's: if this raises, the boundary reports the failure through the same writer,
    continuing from this run's own writes (the handler's body predates them).
    """
    writer = writer or StatusWriter(policy)
    desired = policy.desired
    if wants_rotation(desired, policy.status.get("observedVersion")):
        # Flag it before any slow work: pipelines watch for Rotating within a second.
        writer.condition(ROTATING, True, "RotationRequested",
                         f"spec.version {desired} requested; preparing the rotation")
        writer.condition(READY, False, "Rotating", f"rotating to version {desired}")
        writer.patch({"rotation": {"phase": "Pending", "policyVersion": desired}})
    cfg, options = policy.store_config(), policy.options()
    dsn, kek = read_secrets(policy)
    engine = Engine(dsn, cfg, kek, actor=policy.actor)
    with policy_lock(policy):
        engine.initialise(desired)
        snap = snapshot(dsn, cfg)
        decision = decide(desired, snap.served_version,
                          snap.running.requested_version if snap.running else None)
        result: RotationResult | None = None
        if decision.action is not Action.NONE:
            result = _rotate(policy, settings, events, writer, engine, options, decision.message)
            snap = snapshot(dsn, cfg)
    _write_ready(policy, writer, snap, result, decision.message)
    return decision.message if result is None else _summary(result)


def _rotate(policy: Policy, settings: OperatorSettings, events: Reporter, writer: StatusWriter,
            engine: Engine, options: RotationOptions, why: str) -> RotationResult:
    desired = policy.desired
    started = conditions.now()
    events.info("RotationStarted", f"{why} ({options.mode} mode, batches of "
                                   f"{options.batch_size})")
    writer.condition(ROTATING, True, "RotationRunning", why)
    writer.condition(READY, False, "Rotating", f"rotating to version {desired}")
    base = {"phase": "Running", "mode": options.mode, "policyVersion": desired,
            "startedAt": started, "finishedAt": None, "done": 0, "total": 0}
    writer.patch({"rotation": base})
    last = [0.0]
    seen = {"done": 0, "total": 0}  # the latest counts, for the Failed record too

    def progress(done: int, total: int) -> None:
        seen.update(done=done, total=total)
        if time.monotonic() - last[0] < settings.progress_interval and done < total:
            return
        last[0] = time.monotonic()
        try:
            writer.patch({"rotation": {**base, "done": done, "total": total,
                                       "progress": _progress(done, total)}},
                         with_conditions=False)
        except RotationOperatorError as exc:  # progress is best effort; the rotation goes on
            log.warning("progress update failed: %s", exc)

    labels = (policy.namespace, policy.name)
    t0 = time.monotonic()
    try:
        result = engine.rotate(desired, options, progress=progress)
    except RotationOperatorError as exc:
        metrics.ROTATIONS.labels(*labels, "failed").inc()
        # Keep the last counts (a merge patch of ``base`` would reset done/total to 0
        # under a stale ``progress`` string).
        writer.patch({"rotation": {**base, **seen, "phase": "Failed", "message": str(exc),
                                   "progress": _progress(seen["done"], seen["total"])}},
                     with_conditions=False)
        raise
    metrics.DURATION.labels(*labels).observe(time.monotonic() - t0)
    metrics.ROWS.labels(*labels).inc(result.re_encrypted)
    metrics.ROTATIONS.labels(*labels, "succeeded" if result.performed else "noop").inc()
    writer.patch({"rotation": {
        **base, "phase": "Succeeded", "fromVersion": result.from_version,
        "toVersion": result.to_version, "done": result.re_encrypted,
        "total": result.re_encrypted, "progress": _progress(result.re_encrypted,
                                                            result.re_encrypted),
        "reEncrypted": result.re_encrypted, "legacyMigrated": result.legacy_migrated,
        "resumed": result.resumed, "finishedAt": conditions.now(),
        "seconds": round(result.seconds, 3), "message": _summary(result)}},
        with_conditions=False)
    events.info("RotationFinished", _summary(result))
    return result


def _write_ready(policy: Policy, writer: StatusWriter, snap: Snapshot,
                 result: RotationResult | None, message: str) -> None:
    reason = "RotationSucceeded" if result and result.performed else "KeysReady"
    text = _summary(result) if result and result.performed else (
        f"active key v{snap.active_version}; {message}")
    writer.condition(READY, True, reason, text)
    writer.condition(ROTATING, False, "Idle", "no rotation running")
    writer.condition(DEGRADED, False, "AsExpected", "keys and data are consistent")
    # Metrics first: whoever sees the status (kubectl wait) may scrape right after.
    metrics.observe_counts(policy.namespace, policy.name, snap.active_version,
                           snap.secret_count, snap.legacy_count, snap.stale_count)
    writer.patch(snapshot_fields(snap))


def refresh(policy: Policy) -> bool:
    """Timer: refresh counts and keys.  False if a rotation is busy.

    Counting needs the DSN only.  Clearing a transient failure (Ready=False because a
    Secret, the RBAC grant or the database was missing) needs everything reconcile
    needs: both Secrets readable, the KEK well-formed and matching the stored keys.
    Checking the DSN alone made Ready flap to True every refresh while the KEK Secret
    was still missing.
    """
    if policy.status.get("observedVersion") is None:
        # Never initialised (e.g. the KEK Secret is missing): there are no key tables to
        # count yet, and creating them is reconcile's job, after it has proved the KEK.
        return True
    ready = conditions.get(policy.conditions(), READY)
    transient = ready is not None and ready.get("reason") in _TRANSIENT
    cfg = policy.store_config()
    kek: bytes | None = None
    lock = policy_lock(policy)
    if not lock.acquire(blocking=False):
        return False
    try:
        if transient:
            dsn, kek = read_secrets(policy)
        else:
            db_ref = (policy.spec.get("database") or {}).get("secretRef") or {}
            dsn = kube.read_secret(policy.namespace, db_ref.get("name", ""),
                                   db_ref.get("key", "dsn"), "database DSN").decode().strip()
        try:
            snap = snapshot(dsn, cfg)
        except psycopg.Error as exc:  # e.g. a target or key table dropped by hand
            raise SchemaError(f"cannot count keys and rows: {first_line(exc)}") from None
        healed = transient and snap.served_version is not None and \
            snap.served_version >= policy.desired
        if healed and kek is not None:
            with db_errors(), connect(dsn) as conn:
                KeyStore(cfg).load_ring(conn, kek)  # fail closed: KekMismatchError
    finally:
        lock.release()
    writer = StatusWriter(policy)
    if healed:
        writer.condition(READY, True, "KeysReady", f"active key v{snap.active_version}; "
                                                   "database and Secrets reachable again")
        writer.condition(DEGRADED, False, "AsExpected", "keys and data are consistent")
    metrics.observe_counts(policy.namespace, policy.name, snap.active_version,
                           snap.secret_count, snap.legacy_count, snap.stale_count)
    writer.patch(snapshot_fields(snap), with_conditions=healed)
    return True


def fail(policy: Policy, exc: RotationOperatorError, events: Reporter,
         writer: StatusWriter) -> None:
    """The status write for a failure: Ready=False with the error's reason.

    ``writer``: the failing run's own, so a rotation it flagged (Rotating=True, written
    after Kopf took the body) is reported as RotationFailed rather than Idle.
    """
    was_rotating = (conditions.get(writer.conds, ROTATING) or {}).get("status") == "True"
    writer.condition(READY, False, exc.reason, str(exc))
    writer.condition(ROTATING, False, "RotationFailed" if was_rotating else "Idle",
                     str(exc) if was_rotating else "no rotation running")
    writer.condition(DEGRADED, True, exc.reason, str(exc))
    events.warn(exc.reason, str(exc))
    try:
        writer.patch()
    except RotationOperatorError as second:
        log.error("could not write the failure to status: %s", second)


def snapshot_fields(snap: Snapshot) -> dict[str, Any]:
    return {**snap.summary(), "lastRefreshed": conditions.now()}


def _progress(done: int, total: int) -> str:
    pct = 100.0 * done / total if total else 100.0
    return f"{done}/{total} ({pct:.0f}%)"


def _summary(result: RotationResult) -> str:
    if not result.performed:
        return f"version {result.requested_version} already served (key v{result.to_version})"
    return (f"rotated v{result.from_version} -> v{result.to_version}: {result.re_encrypted} rows "
            f"re-encrypted ({result.legacy_migrated} legacy) in {result.seconds:.1f}s"
            + ("; resumed after an interruption" if result.resumed else "")
            + (f"; retired {', '.join(f'v{v}' for v in result.retired)}" if result.retired else ""))
