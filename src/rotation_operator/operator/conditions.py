"""Status conditions, kubebuilder style: type, status, reason, message,
lastTransitionTime, observedGeneration.  Pure functions over plain dicts.

``observedGeneration`` on every condition is what makes ``kubectl wait
--for=condition=Ready`` correct after a bump: kubectl ignores a condition whose
observedGeneration is older than ``metadata.generation``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

READY, ROTATING, DEGRADED = "Ready", "Rotating", "Degraded"
KEK_WEAK, KEY_USAGE, THROTTLED = "KEKWeak", "KeyUsageHigh", "Throttled"
#: A warning: every legacy row was migrated, but the policy keeps legacy reads open.
LEGACY_OPEN = "LegacyReadsOpen"
_ORDER = (READY, ROTATING, DEGRADED, THROTTLED, KEK_WEAK, KEY_USAGE, LEGACY_OPEN)
MAX_MESSAGE = 1024


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(conditions: Iterable[Mapping[str, Any]], type_: str, status: bool | str,
                  reason: str, message: str, generation: int | None, *,
                  at: str | None = None) -> list[dict[str, Any]]:
    """Return a new list with ``type_`` set; lastTransitionTime moves only on a change."""
    status_s = status if isinstance(status, str) else ("True" if status else "False")
    result, found = [], False
    for cond in conditions:
        c = dict(cond)
        if c.get("type") == type_:
            found = True
            if c.get("status") != status_s or "lastTransitionTime" not in c:
                c["lastTransitionTime"] = at or now()
            c.update(status=status_s, reason=reason, message=message[:MAX_MESSAGE])
            if generation is not None:
                c["observedGeneration"] = generation
        result.append(c)
    if not found:
        c = {"type": type_, "status": status_s, "reason": reason,
             "message": message[:MAX_MESSAGE], "lastTransitionTime": at or now()}
        if generation is not None:
            c["observedGeneration"] = generation
        result.append(c)
    return sorted(result, key=lambda c: _ORDER.index(c["type"]) if c["type"] in _ORDER else 99)


def get(conditions: Iterable[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions or () if c.get("type") == type_), None)
