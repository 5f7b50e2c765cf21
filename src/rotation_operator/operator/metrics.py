"""Prometheus metrics: what a platform team alerts on and graphs.

Symptoms first (``manifests/monitoring/rules.yml`` alerts on these): a rotation that stops
progressing or fails, rows under a retired key, an old active key, legacy rows long after a
rotation, decrypt failures, no replica leading.  Gauges per policy are set from the same
snapshot that writes status, before the status write, so whoever sees the status can
scrape matching figures.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from rotation_operator import __version__
from rotation_operator.policy.reasons import Reason

LABELS = ("namespace", "policy")

ROTATIONS = Counter("rotation_operator_rotations_total", "Rotations by result",
                    (*LABELS, "result"))
ROWS = Counter("rotation_operator_rows_reencrypted_total", "Rows re-encrypted", LABELS)
DURATION = Histogram("rotation_operator_rotation_duration_seconds", "Rotation wall time",
                     LABELS, buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 14400))
IN_PROGRESS = Gauge("rotation_operator_rotation_in_progress",
                    "1 while a rotation or sweep of the policy runs", LABELS)
ROWS_DONE = Gauge("rotation_operator_rotation_rows_done",
                  "Rows the running rotation has moved", LABELS)
ROWS_TOTAL = Gauge("rotation_operator_rotation_rows_total",
                   "Rows the running rotation has to move (grows if rows arrive)", LABELS)
LAST_PROGRESS = Gauge("rotation_operator_rotation_last_progress_timestamp_seconds",
                      "When the running rotation last committed a batch (unix time)", LABELS)
LAST_FINISHED = Gauge("rotation_operator_last_rotation_finished_timestamp_seconds",
                      "When the last rotation finished (unix time)", LABELS)
ACTIVE = Gauge("rotation_operator_active_key_version", "Version of the active DEK", LABELS)
ACTIVE_CREATED = Gauge("rotation_operator_active_key_created_timestamp_seconds",
                       "When the active DEK was created (unix time)", LABELS)
MAX_KEY_AGE = Gauge("rotation_operator_max_key_age_seconds",
                    "spec.rotation.maxKeyAge, when the policy sets one", LABELS)
SECRETS = Gauge("rotation_operator_secret_rows", "Rows in all targets", LABELS)
LEGACY = Gauge("rotation_operator_legacy_rows", "Rows still under the KEK directly", LABELS)
STALE = Gauge("rotation_operator_stale_rows", "Rows not under the active key", LABELS)
RETIRED = Gauge("rotation_operator_retired_key_rows",
                "Rows under a retired key (none may stay there after a rotation)", LABELS)
KEY_ROWS = Gauge("rotation_operator_rows_keys", "Rows per key version",
                 (*LABELS, "key_version", "state"))
DECRYPT_FAILURES = Counter("rotation_operator_decrypt_failures_total",
                           "Rows that did not decrypt during rotations, sweeps or verify",
                           LABELS)
CONDITION = Gauge("rotation_operator_policy_condition",
                  "1 for the current status and reason of each condition",
                  (*LABELS, "condition", "status", "reason"))
THROTTLED = Gauge("rotation_operator_throttled",
                  "1 while the running rotation waits for a limit, by reason "
                  "(ReplicationLag, Load)", (*LABELS, "reason"))
REPLICATION_LAG = Gauge("rotation_operator_replication_lag_seconds",
                        "The largest streaming-replica lag the running rotation measured "
                        "(with maxReplicationLag)", LABELS)
LEADER = Gauge("rotation_operator_leader", "1 on the replica that is active (leading)")
API = Histogram("rotation_operator_api_request_duration_seconds",
                "Latency of the operator's own calls", ("api", "operation"),
                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
BUILD = Gauge("rotation_operator_build_info", "The running version", ("version",))
BUILD.labels(__version__).set(1)


_known: set[tuple[str, str]] = set()


def _initialise(labels: tuple[str, str]) -> None:
    """Every counter of a policy exists from its first observation, at 0: ``increase()``
    and ``rate()`` then see the first failure too (a series born at 1 shows no increase)."""
    if labels in _known:
        return
    _known.add(labels)
    for result in ("succeeded", "failed", "noop"):
        ROTATIONS.labels(*labels, result)
    ROWS.labels(*labels)
    DECRYPT_FAILURES.labels(*labels)


def observe_counts(namespace: str, name: str, snap: Any) -> None:
    """Gauges from an :class:`~rotation_operator.rotation.inspection.Snapshot`."""
    labels = (namespace, name)
    _initialise(labels)
    if snap.active_version is not None:
        ACTIVE.labels(*labels).set(snap.active_version)
    active = next((k for k in snap.keys if k.state == "active"), None)
    if active is not None:
        ACTIVE_CREATED.labels(*labels).set(active.created_at.timestamp())
    SECRETS.labels(*labels).set(snap.secret_count)
    LEGACY.labels(*labels).set(snap.legacy_count)
    STALE.labels(*labels).set(snap.stale_count)
    RETIRED.labels(*labels).set(snap.retired_count)
    KEY_ROWS.labels(*labels, "legacy", "legacy").set(snap.legacy_count)
    for k in snap.keys:
        KEY_ROWS.labels(*labels, str(k.version), k.state).set(k.rows)
    last = snap.last_rotation
    if last is not None and last.finished_at is not None:
        LAST_FINISHED.labels(*labels).set(_ts(last.finished_at))


_done: dict[tuple[str, str], int] = {}


def rotation_started(namespace: str, name: str) -> None:
    IN_PROGRESS.labels(namespace, name).set(1)
    LAST_PROGRESS.labels(namespace, name).set(time.time())
    ROWS_DONE.labels(namespace, name).set(0)
    _done[(namespace, name)] = 0


def rotation_progress(namespace: str, name: str, done: int, total: int) -> None:
    if done != _done.get((namespace, name)):
        LAST_PROGRESS.labels(namespace, name).set(time.time())
        _done[(namespace, name)] = done
    ROWS_DONE.labels(namespace, name).set(done)
    ROWS_TOTAL.labels(namespace, name).set(total)


def rotation_ended(namespace: str, name: str) -> None:
    IN_PROGRESS.labels(namespace, name).set(0)


THROTTLE_REASONS = (Reason.REPLICATION_LAG, Reason.LOAD)


def throttled(namespace: str, name: str, reason: str | None, lag: float | None) -> None:
    for each in THROTTLE_REASONS:
        THROTTLED.labels(namespace, name, each).set(1 if each == reason else 0)
    if lag is not None:
        REPLICATION_LAG.labels(namespace, name).set(lag)


def observe_conditions(namespace: str, name: str,
                       conditions: Iterable[Mapping[str, Any]]) -> None:
    """One series per condition, for its current (status, reason) only."""
    for cond in conditions:
        type_ = str(cond.get("type"))
        for labels in list(CONDITION._metrics):
            if labels[:3] == (namespace, name, type_):
                CONDITION.remove(*labels)
        CONDITION.labels(namespace, name, type_, str(cond.get("status")),
                         str(cond.get("reason"))).set(1)


def clear_max_key_age(namespace: str, name: str) -> None:
    if (namespace, name) in MAX_KEY_AGE._metrics:
        MAX_KEY_AGE.remove(namespace, name)


def forget(namespace: str, name: str) -> None:
    """Drop every series of a policy that is gone."""
    _known.discard((namespace, name))
    for metric in (IN_PROGRESS, ROWS_DONE, ROWS_TOTAL, LAST_PROGRESS, LAST_FINISHED, ACTIVE,
                   ACTIVE_CREATED, SECRETS, LEGACY, STALE, RETIRED, KEY_ROWS, CONDITION,
                   MAX_KEY_AGE, THROTTLED, REPLICATION_LAG, ROTATIONS, ROWS, DECRYPT_FAILURES):
        for labels in list(metric._metrics):
            if labels[:2] == (namespace, name):
                metric.remove(*labels)


@contextmanager
def timed(api: str, operation: str) -> Iterator[None]:
    """Observe the latency of one call of the operator's own."""
    started = time.monotonic()
    try:
        yield
    finally:
        API.labels(api, operation).observe(time.monotonic() - started)


def _ts(value: datetime) -> float:
    return value.timestamp()
