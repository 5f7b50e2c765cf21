"""Every condition and Event reason that is not an error's: one table.

Errors carry their own reason (``RotationOperatorError.reason`` and its subclasses in
:mod:`rotation_operator.errors`); everything else a user can see as a ``reason`` (a
condition's, an Event's, a decision's) is a member of :class:`Reason`.  It is a ``str``,
so it is written to status and Events as its value.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    # decisions
    KEYS_READY = "KeysReady"
    ROTATION_REQUESTED = "RotationRequested"
    ROTATION_RESUMED = "RotationResumed"
    ROTATION_PENDING = "RotationPending"
    ROWS_UNDER_RETIRED_KEY = "RowsUnderRetiredKey"
    VERSION_BELOW_SERVED = "VersionBelowServed"
    SCHEDULED_ROTATION = "ScheduledRotation"
    USAGE_BOUND = "UsageBound"
    KEK_ROTATION = "KEKRotation"
    PAUSED = "Paused"
    # Ready / Rotating
    ROTATING = "Rotating"
    ROTATION_RUNNING = "RotationRunning"
    ROTATION_SUCCEEDED = "RotationSucceeded"
    ROTATION_FAILED = "RotationFailed"
    REKEYING = "Rekeying"
    KEK_ROTATED = "KEKRotated"
    IDLE = "Idle"
    # Degraded
    AS_EXPECTED = "AsExpected"
    # KEKWeak
    KEK_LOOKS_LIKE_TEXT = "KEKLooksLikeText"
    KEK_RANDOM = "KEKRandom"
    # LegacyReadsOpen (and Degraded, an Event: late legacy rows)
    LEGACY_KEPT_OPEN = "LegacyKeptOpen"
    LEGACY_CLOSED = "LegacyClosed"
    LATE_LEGACY_ROWS = "LegacyRowsAfterMigration"
    # KeyUsageHigh
    USAGE_BOUND_NEAR = "UsageBoundNear"
    TABLE_NEAR_BOUND = "TableNearBound"
    USAGE_BOUND_FAR = "UsageBoundFar"
    # Throttled
    NOT_THROTTLED = "NotThrottled"
    REPLICATION_LAG = "ReplicationLag"
    LOAD = "Load"
    # Events only
    ROTATION_STARTED = "RotationStarted"
    ROTATION_FINISHED = "RotationFinished"
    STALE_ROWS_SWEPT = "StaleRowsSwept"
    OLD_KEY_WRITES_CAUGHT = "OldKeyWritesCaught"
    KEY_DISABLED = "KeyDisabled"
    KEY_DESTROYED = "KeyDestroyed"
    KEY_IN_USE = "KeyInUse"
