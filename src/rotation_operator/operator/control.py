"""What a running rotation obeys between its batches, and one reconcile per policy at a time.

:class:`Control` is the engine's ``control`` callback: it stops the rotation when this
replica no longer leads or is stopping (every call), and when its policy is paused or
deleted (looked up at most every ``interval`` seconds).  No Kubernetes call happens inside
a database transaction: the engine calls back only between them.
"""

from __future__ import annotations

import logging
import threading
import time

from rotation_operator.errors import (
    KubernetesUnavailable,
    NotLeading,
    RotationCancelled,
    RotationPaused,
)
from rotation_operator.operator import kube, leader
from rotation_operator.operator.spec import Policy

log = logging.getLogger(__name__)


_busy: dict[tuple[str, str], threading.Lock] = {}


_busy_guard = threading.Lock()


def policy_lock(policy: Policy) -> threading.Lock:
    with _busy_guard:
        return _busy.setdefault((policy.namespace, policy.name), threading.Lock())


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
