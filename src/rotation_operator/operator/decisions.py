"""Should the operator act now?  A pure function of observed state (cert-manager style).

Inputs are what the handler has already gathered; the result names the action and a
reason/message pair that goes straight into conditions and events.  No I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Action(Enum):
    NONE = "none"          # database already serves spec.version
    ROTATE = "rotate"      # spec.version is newer than what the database served
    RESUME = "resume"      # an interrupted rotation for spec.version exists: finish it


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    message: str


def decide(desired: int, served: int | None, running: int | None) -> Decision:
    """Compare ``spec.version`` with the database's served and running versions.

    ``served`` is the highest policy version the database finished (or recorded as the
    baseline); ``running`` the policy version of an unfinished online rotation, if any.
    The database is the source of truth, not the CR's status: a lost status write, an
    operator restart or a re-created CR can never cause a second rotation.
    """
    if running is not None and running == desired:
        return Decision(Action.RESUME, "RotationResumed",
                        f"resuming the interrupted rotation for version {desired}")
    if served is not None and desired <= served:
        note = "" if desired == served else f" (the database already served {served})"
        return Decision(Action.NONE, "KeysReady", f"version {desired} is served{note}")
    before = "nothing" if served is None else f"version {served}"
    return Decision(Action.ROTATE, "RotationRequested",
                    f"spec.version {desired} is newer than {before}: rotating")


def wants_rotation(desired: int | None, observed: int | None) -> bool:
    """Cheap pre-check from the CR alone, to flag Rotating before any database work."""
    return desired is not None and observed is not None and desired > observed
