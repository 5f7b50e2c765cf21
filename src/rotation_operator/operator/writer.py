"""Writing one policy's status and Events: what the workflow and the handler boundary share.

:class:`StatusWriter` keeps the conditions this process wrote, so successive patches of
one run compose, and a failure is reported through the same writer (continuing from the
run's own writes).  What the conditions say is :mod:`.status`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from rotation_operator.operator import conditions, kube, metrics, status
from rotation_operator.operator.spec import Policy

log = logging.getLogger(__name__)


class Reporter(Protocol):
    """Posts Kubernetes Events for the policy (Kopf's ``kopf.info``/``kopf.warn``)."""

    def info(self, reason: str, message: str) -> None: ...
    def warn(self, reason: str, message: str) -> None: ...


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
