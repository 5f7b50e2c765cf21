"""Leader election on a ``coordination.k8s.io`` Lease: of N replicas, exactly one acts.

Why not Kopf's peering: with equal priorities every Kopf peer freezes (the cluster goes
unserved), and unequal ones need a priority per pod that a restarted pod must not win
mid-rotation.  A Lease is what controller-runtime and client-go use, and what a platform
team already knows how to read (``kubectl get lease``).

How (client-go's algorithm):

* a replica that does not hold the Lease runs no Kopf at all: no watch, no handler, no
  timer, no Event, no status write.  It serves ``/healthz`` and its metrics
  (``rotation_operator_leader 0``) and retries every ``retry_period``;
* it takes the Lease when the holder has not renewed it for ``lease_duration``, judged by
  when *this* replica last saw the record change (its own clock, so clocks need not
  agree), with an update conditional on the ``resourceVersion`` it read: of two
  candidates, one wins;
* the leader renews every ``retry_period``; if it cannot renew for ``renew_deadline``
  (shorter than ``lease_duration``, so it stops before anyone else may start), or finds
  another holder, it exits at once and comes back as a candidate.  Every status patch and
  Event first checks :func:`may_act`: an old leader that wakes up after a pause (SIGSTOP, a
  frozen VM) refuses to write before its renewal loop has even noticed;
* every Lease call has a request timeout shorter than the renew deadline, so a
  black-holed API server connection cannot keep the renewal loop from noticing the
  deadline;
* the renew deadline is measured on two clocks, ``CLOCK_BOOTTIME`` (which, unlike
  ``CLOCK_MONOTONIC``, counts a suspend) and the wall clock, and the larger elapsed time
  counts: a pause one of them misses still ends this replica's right to act;
* a rotation checks :func:`may_act` between batches (the workflow's ``Control``) and
  stops when it no longer holds, also while the process is stopping (:func:`stop_acting`),
  so a clean handover does not leave the old leader moving rows behind the new one;
* the database fences rotations on its own (advisory lock + fence token), so an old
  leader's batch cannot land after another rotator took over.

Failover after the leader dies: at most ``lease_duration + retry_period`` (17 s with the
defaults of 15 s and 2 s); a leader that stops cleanly releases the Lease, and its
successor takes it within ``retry_period``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from rotation_operator.operator import metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseConfig:
    namespace: str
    name: str = "rotation-operator"
    identity: str = ""
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError("leader election needs 0 < retry period < renew deadline < "
                             "lease duration")


def default_identity() -> str:
    """The pod's name (downward API) or the host name, plus a random suffix: two
    processes never share an identity, not even after a restart in the same pod."""
    base = os.environ.get("POD_NAME") or socket.gethostname()
    return f"{base}_{uuid.uuid4().hex[:8]}"


#: The elector of this process, once leader election is on (None: standalone, always acts).
_current: LeaderElector | None = None
_stopping = threading.Event()


def may_act() -> bool:
    """Whether this process may write to the cluster now, and go on rotating: when
    standalone, until it stops; as leader, only while its last renewal is younger than
    the renew deadline."""
    return not _stopping.is_set() and (_current is None or _current.valid())


def stop_acting() -> None:
    """The process is stopping: from now on :func:`may_act` is False (a rotation stops
    between batches, and nothing more is written)."""
    _stopping.set()


def _clocks() -> tuple[float, float]:
    """(boot time, wall time): the first counts a suspend, the second a VM pause that
    the host corrects on resume; elapsed time is the larger of the two."""
    return time.clock_gettime(time.CLOCK_BOOTTIME), time.time()


def _now() -> datetime:
    return datetime.now(UTC)


class LeaderElector:
    def __init__(self, cfg: LeaseConfig, api: Any | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 deadline_clocks: Callable[[], tuple[float, ...]] = _clocks) -> None:
        self.cfg = cfg
        self.identity = cfg.identity or default_identity()
        self.api = api or client.CoordinationV1Api()
        self.clock = clock  # for the lease expiry this replica observes (client-go's)
        self.deadline_clocks = deadline_clocks  # for this replica's own renew deadline
        # A request must fail well before the deadline, so that the loop can still act.
        self.timeout = max(0.5, cfg.renew_deadline - cfg.retry_period) / 2
        self._renewed: tuple[float, ...] | None = None  # deadline_clocks() at the last renewal
        self._observed: tuple[str, str] | None = None  # (holder, renewTime) last seen
        self._observed_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- state -------------------------------------------------------------------------
    def valid(self) -> bool:
        if self._renewed is None:
            return False
        elapsed = max(now - then for now, then in zip(self.deadline_clocks(), self._renewed,
                                                       strict=True))
        return elapsed < self.cfg.renew_deadline

    # -- acquiring ---------------------------------------------------------------------
    def acquire(self, stop: threading.Event | None = None) -> bool:
        """Block until this process holds the Lease (True), or ``stop`` is set (False)."""
        global _current
        metrics.LEADER.set(0)
        announced = False
        while not (stop and stop.is_set()):
            try:
                if self._try():
                    _current = self
                    metrics.LEADER.set(1)
                    log.info("leading: holds Lease %s/%s as %s", self.cfg.namespace,
                             self.cfg.name, self.identity)
                    return True
            except ApiException as exc:
                log.warning("leader election: the Lease could not be read or written "
                            "(HTTP %s); retrying", exc.status)
            except Exception as exc:  # the API server unreachable: retry like client-go
                log.warning("leader election: %s; retrying", type(exc).__name__)
            if not announced:
                log.info("standby: Lease %s/%s is held by another replica; waiting to lead",
                         self.cfg.namespace, self.cfg.name)
                announced = True
            (stop or self._stop).wait(self.cfg.retry_period)
        return False

    def _try(self) -> bool:
        """One attempt to acquire or renew; True if this process holds the Lease now."""
        ns, name = self.cfg.namespace, self.cfg.name
        started = self.deadline_clocks()
        try:
            lease = self.api.read_namespaced_lease(name, ns, _request_timeout=self.timeout)
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = client.V1Lease(metadata=client.V1ObjectMeta(name=name, namespace=ns),
                                  spec=self._spec(transitions=0, acquired=_now()))
            try:
                self.api.create_namespaced_lease(ns, body, _request_timeout=self.timeout)
            except ApiException as exc2:
                if exc2.status == 409:  # another candidate created it first
                    return False
                raise
            self._renewed = started
            return True
        spec = lease.spec or client.V1LeaseSpec()
        holder = spec.holder_identity or ""
        renew = str(spec.renew_time or "")
        if self._observed != (holder, renew):
            self._observed, self._observed_at = (holder, renew), self.clock()
        duration = float(spec.lease_duration_seconds or self.cfg.lease_duration)
        if holder and holder != self.identity and \
                self.clock() < self._observed_at + duration:
            return False  # held, and renewed within its duration as far as we have seen
        transitions = int(spec.lease_transitions or 0)
        mine = holder == self.identity
        lease.spec = self._spec(
            transitions=transitions if mine else transitions + 1,
            acquired=spec.acquire_time if mine and spec.acquire_time else _now())
        try:
            self.api.replace_namespaced_lease(name, ns, lease,  # carries resourceVersion
                                              _request_timeout=self.timeout)
        except ApiException as exc:
            if exc.status == 409:  # someone else wrote it since we read it
                return False
            raise
        self._renewed = started
        return True

    def _spec(self, *, transitions: int, acquired: datetime) -> Any:
        return client.V1LeaseSpec(
            holder_identity=self.identity,
            lease_duration_seconds=max(1, round(self.cfg.lease_duration)),
            acquire_time=acquired, renew_time=_now(), lease_transitions=transitions)

    # -- keeping it --------------------------------------------------------------------
    def keep(self, on_lost: Callable[[str], None]) -> None:
        """Renew every ``retry_period`` in a daemon thread; ``on_lost(why)`` when the
        renew deadline passes without a renewal, or another replica holds the Lease."""
        def loop() -> None:
            while not self._stop.wait(self.cfg.retry_period):
                try:
                    if self._try():
                        continue
                    why = f"Lease {self.cfg.namespace}/{self.cfg.name} is now held by " \
                          f"{self._observed[0] if self._observed else 'another replica'}"
                except Exception as exc:  # keep trying until the deadline
                    why = f"could not renew the Lease ({type(exc).__name__})"
                    if self.valid():
                        log.warning("leader election: %s; retrying", why)
                        continue
                metrics.LEADER.set(0)
                on_lost(why)
                return

        self._thread = threading.Thread(target=loop, name="lease-renewal", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """On a clean stop: give the Lease up so the standby takes over at once."""
        self._stop.set()
        if not self.valid():
            return
        try:
            lease = self.api.read_namespaced_lease(self.cfg.name, self.cfg.namespace,
                                                   _request_timeout=self.timeout)
            if lease.spec and lease.spec.holder_identity == self.identity:
                lease.spec.holder_identity = None
                lease.spec.renew_time = None
                self.api.replace_namespaced_lease(self.cfg.name, self.cfg.namespace, lease,
                                                  _request_timeout=self.timeout)
                log.info("released Lease %s/%s", self.cfg.namespace, self.cfg.name)
        except Exception as exc:  # it expires by itself
            log.warning("could not release the Lease (%s); it expires in %gs",
                        type(exc).__name__, self.cfg.lease_duration)
        metrics.LEADER.set(0)
        self._renewed = None
