"""Prometheus metrics: what a platform team alerts on (failed rotations, stale rows)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LABELS = ("namespace", "policy")

ROTATIONS = Counter("rotation_operator_rotations_total", "Rotations by result",
                    (*LABELS, "result"))
ROWS = Counter("rotation_operator_rows_reencrypted_total", "Rows re-encrypted", LABELS)
DURATION = Histogram("rotation_operator_rotation_duration_seconds", "Rotation wall time",
                     LABELS, buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 14400))
ACTIVE = Gauge("rotation_operator_active_key_version", "Version of the active DEK", LABELS)
SECRETS = Gauge("rotation_operator_secret_rows", "Rows in all targets", LABELS)
LEGACY = Gauge("rotation_operator_legacy_rows", "Rows still under the KEK directly", LABELS)
STALE = Gauge("rotation_operator_stale_rows", "Rows not under the active key", LABELS)


def observe_counts(namespace: str, name: str, active: int | None, secrets: int, legacy: int,
                   stale: int) -> None:
    if active is not None:
        ACTIVE.labels(namespace, name).set(active)
    SECRETS.labels(namespace, name).set(secrets)
    LEGACY.labels(namespace, name).set(legacy)
    STALE.labels(namespace, name).set(stale)
