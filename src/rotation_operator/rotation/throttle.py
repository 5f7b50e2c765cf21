"""Throttling: a rotation that does not hurt the live primary it runs on.

Why: every rotation rewrites every row, as fast as two backends can, on the primary the
application writes to.  What hurts there is known from tools that rewrite live tables
(gh-ost, pt-online-schema-change): replicas falling behind, and application sessions
waiting.  So between batches a rotation can wait, for three reasons, each observable and
said in status (``Throttled``, with the reason and the figure):

* **rate**: at most ``max_rows_per_second`` rows moved per second, over all workers (the
  parent hands out block ranges only as the budget allows).  A steady state, not a pause:
  status shows the limit beside the rate, and ``Throttled`` stays False;
* **replica lag**: no batch while a streaming replica replays more than
  ``max_replication_lag`` behind.  Measured on the primary, from ``pg_stat_replication``
  (no connection to the replicas): the larger of ``replay_lag`` and the age of the oldest
  WAL position the replica has not replayed (sampled here, so a replica whose replay is
  paused shows a lag that grows, where ``replay_lag`` stays at its last value).  A replica
  that disconnects is no longer measured: the rotation goes on, and throttles again if it
  comes back behind;
* **load**: back off while batches block more than ``max_blocked_sessions`` application
  sessions (``pg_blocking_pids``, counted inside each batch just before it commits).

Nothing here needs a privilege but replica lag, which needs ``pg_monitor`` (or
``pg_read_all_stats``): ``pg_stat_replication`` shows its positions to no one else.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from rotation_operator.errors import DatabaseForbidden
from rotation_operator.policy.config import RotationOptions
from rotation_operator.policy.reasons import Reason
from rotation_operator.store import load
from rotation_operator.store.database import Conn

log = logging.getLogger(__name__)
#: Called when throttling starts, changes or stops: (reason or None, message, lag seconds).
ThrottleFn = Callable[[str | None, str, float | None], None]
#: Seconds between looks at the replicas while waiting for them.
POLL = 0.25
#: At most this many seconds of rows may go faster than maxRowsPerSecond (a token bucket).
BURST = 1.0


@dataclass(frozen=True)
class Replica:
    name: str
    lag: float  # seconds
    bytes_behind: float


def _lsn(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) + int(low, 16)


class Throttle:
    """Between batches: wait as long as the policy's limits ask."""

    def __init__(self, conn: Conn, options: RotationOptions, report: ThrottleFn | None,
                 sleep: Callable[[float], None]) -> None:
        self.conn = conn
        self.rate = options.max_rows_per_second
        self.max_lag = options.max_replication_lag
        self.max_blocked = options.max_blocked_sessions
        self._report = report
        self._sleep = sleep
        self._t0 = time.monotonic()
        self._moved = 0
        self._blocked = 0
        self._backoff = POLL
        self._samples: deque[tuple[float, int]] = deque(maxlen=4096)
        self._reason: str | None = None
        self.max_lag_seen = 0.0
        if self.max_lag is not None:
            self._check_visible()

    @property
    def active(self) -> bool:
        return bool(self.rate) or self.max_lag is not None or self.max_blocked is not None

    def moved(self, rows: int, blocked: int = 0) -> None:
        """Account for one committed batch (``blocked``: sessions it blocked)."""
        self._moved += rows
        self._blocked = max(self._blocked, blocked)

    def wait(self) -> None:
        """Before the next batch: pay the rate, and wait out replica lag and load."""
        if not self.active:
            return
        paused = self._wait_replicas() | self._wait_load()
        if paused:  # time spent waiting is not a credit for a burst afterwards
            self._t0, self._moved = time.monotonic(), 0
        self._set(None, "", None)
        if self.rate:  # a steady state, shown as the limit and the rate, not as a pause
            now = time.monotonic()
            if self._t0 + self._moved / self.rate < now - BURST:
                # Idle time (counting, the handover, a retry) is no credit for a burst:
                # at most BURST seconds' worth of rows may go faster than the rate.
                self._t0, self._moved = now - BURST, 0
            ahead = self._t0 + self._moved / self.rate - now
            if ahead > 0:
                self._sleep(ahead)

    # -- replica lag -------------------------------------------------------------------
    def _check_visible(self) -> None:
        visible, role = load.may_read_replication(self.conn)
        if not visible:
            raise DatabaseForbidden(
                f"maxReplicationLag needs to read the replicas' positions in "
                f"pg_stat_replication, which role {role} may not: GRANT pg_monitor TO "
                f"{role}")

    def replicas(self) -> list[Replica]:
        """Every connected streaming replica, with its lag in seconds."""
        now = time.monotonic()
        rows = load.replicas(self.conn)
        current = rows[0][2] if rows else load.current_wal_lsn(self.conn)
        self._samples.append((now, _lsn(current)))
        out = []
        for name, replay_lag, _, replay_lsn, behind in rows:
            lag = float(replay_lag or 0.0)
            if replay_lsn is not None:
                replayed = _lsn(replay_lsn)
                oldest = next((t for t, lsn in self._samples if lsn > replayed), None)
                if oldest is not None:
                    lag = max(lag, now - oldest)
            out.append(Replica(str(name), lag, float(behind or 0.0)))
        return out

    def _wait_replicas(self) -> bool:
        if self.max_lag is None:
            return False
        paused = False
        while True:
            replicas = self.replicas()
            worst = max(replicas, key=lambda r: r.lag, default=None)
            lag = worst.lag if worst is not None else 0.0
            self.max_lag_seen = max(self.max_lag_seen, lag)
            if worst is None or lag <= self.max_lag:
                return paused
            paused = True
            self._set(Reason.REPLICATION_LAG, f"replica {worst.name} replays {lag:.1f}s behind "
                      f"(maxReplicationLag {self.max_lag:g}s); waiting", lag)
            self._sleep(POLL)

    # -- load --------------------------------------------------------------------------
    def _wait_load(self) -> bool:
        if self.max_blocked is None or self._blocked <= self.max_blocked:
            self._backoff = POLL
            self._blocked = 0
            return False
        self._set(Reason.LOAD, f"the last batches blocked {self._blocked} application sessions "
                  f"(maxBlockedSessions {self.max_blocked}); backing off "
                  f"{self._backoff:.2f}s", None)
        self._sleep(self._backoff)
        self._backoff = min(self._backoff * 2, 8.0)
        self._blocked = 0
        return True

    def _set(self, reason: str | None, message: str, lag: float | None) -> None:
        if reason == self._reason and reason != Reason.REPLICATION_LAG:
            return
        if reason is not None and reason != self._reason:
            log.info("throttled: %s", message)
        self._reason = reason
        if self._report is not None:
            self._report(reason, message, lag)
