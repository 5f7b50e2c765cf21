"""What a request means, given what the database says: the one place that decides.

A pure function of observed state (cert-manager style): the engine calls it under the
rotation lock before it acts, the operator calls it to report, the CLI through the engine.
The database's rotation records are the truth, not a custom resource's status: a lost
status write, an operator restart or a re-created policy can never cause a second rotation.

Requests come in four kinds: a **policy** version (``spec.version``, or the CLI's
``--policy-version``), a **manual** rotation (the CLI without a version: it never uses up a
policy version), a **sweep** (the refresh timer: move rows that slipped in under a retired
key onto the active one, minting nothing), and a **rekey** (the CLI: rewrap the DEKs under
the current KEK, nothing else).  A rekey comes first whenever it is due: every key must be
wrapped by the current KEK before anything else happens.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Literal

RequestKind = Literal["policy", "manual", "sweep", "rekey"]


class Action(Enum):
    NONE = "none"          # nothing to do
    ROTATE = "rotate"      # mint a new key and move every row onto it
    RESUME = "resume"      # finish the interrupted rotation under the key it minted
    SWEEP = "sweep"        # move rows under retired keys onto the active key
    PAUSED = "paused"      # spec.rotation.paused: touch nothing
    BEHIND = "behind"      # spec.version is below what the database already served
    REKEY = "rekey"        # DEKs are wrapped by another KEK than the current one: rewrap


@dataclass(frozen=True)
class Request:
    kind: RequestKind
    version: int | None = None  # the policy version asked for (policy requests)
    paused: bool = False


@dataclass(frozen=True)
class Running:
    """An unfinished rotation recorded in the database."""

    id: int
    kind: str
    version: int | None  # the policy version it serves (policy rotations)
    to_version: int      # the key it minted


@dataclass(frozen=True)
class State:
    """What the database says."""

    active: int                 # the active key's version
    served: int | None          # the highest policy version served
    running: Running | None
    #: Rows under a non-active DEK (a retired or retiring key), None when not counted.
    retired_rows: int | None = None
    #: Some DEK is wrapped by another KEK than the current one.
    rekey: bool = False


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    message: str
    #: The unfinished rotation to resume (RESUME), for the engine.
    running: Running | None = None


def decide(request: Request, state: State) -> Decision:
    """The action for ``request`` in ``state``."""
    decision = _unpaused(request, state)
    if request.paused and decision.action in (Action.ROTATE, Action.RESUME, Action.SWEEP,
                                              Action.REKEY):
        return Decision(Action.PAUSED, "Paused", "spec.rotation.paused is set: would have "
                        f"acted ({decision.message}); clear it to go on")
    return decision


def _unpaused(request: Request, state: State) -> Decision:
    running = state.running
    if running is not None and running.to_version != state.active:
        running = None  # its key is not active any more: a new rotation supersedes it
    if request.kind == "sweep":
        return _sweep(state, running)
    if request.kind == "rekey" and not state.rekey:
        return Decision(Action.NONE, "KeysReady", "every DEK is wrapped by the current KEK")
    if state.rekey:  # before anything else: every key must be readable with the current KEK
        return Decision(Action.REKEY, "KEKRotation",
                        "DEKs are wrapped by another KEK than the current one: rewrapping "
                        "them under it")
    if running is not None and _resumes(request, running):
        return Decision(Action.RESUME, "RotationResumed",
                        f"resuming the interrupted {_describe(running)}", running)
    if request.kind == "manual":
        return Decision(Action.ROTATE, "RotationRequested",
                        "a manual rotation was requested (no policy version)")
    return _policy(request, state)


def _resumes(request: Request, running: Running) -> bool:
    """A running rotation is finished first, unless a newer policy version supersedes it
    (its rows then move once, straight onto the newer key)."""
    if request.kind == "manual" or running.kind != "policy" or running.version is None:
        return True
    return request.version is None or running.version >= request.version


def _policy(request: Request, state: State) -> Decision:
    desired, served = request.version, state.served
    assert desired is not None
    if served is not None and desired < served:
        return Decision(Action.BEHIND, "VersionBelowServed",
                        f"spec.version {desired} is below {served}, which this database has "
                        f"already served: set it to {served} to adopt the current keys, or "
                        f"above {served} to rotate")
    if served is not None and desired == served:
        if state.retired_rows:
            return Decision(Action.SWEEP, "RowsUnderRetiredKey",
                            f"{state.retired_rows} rows are under a retired key: moving them "
                            f"onto DEK v{state.active}")
        return Decision(Action.NONE, "KeysReady", f"version {desired} is served")
    before = "nothing" if served is None else f"version {served}"
    return Decision(Action.ROTATE, "RotationRequested",
                    f"spec.version {desired} is newer than {before}: rotating")


def _sweep(state: State, running: Running | None) -> Decision:
    if running is not None:
        return Decision(Action.NONE, "RotationPending",
                        f"an unfinished {_describe(running)} will move these rows")
    if state.retired_rows:
        return Decision(Action.SWEEP, "RowsUnderRetiredKey",
                        f"{state.retired_rows} rows are under a retired key: moving them "
                        f"onto DEK v{state.active}")
    return Decision(Action.NONE, "KeysReady", "no row is under a retired key")


def _describe(running: Running) -> str:
    if running.kind == "policy" and running.version is not None:
        return f"rotation for version {running.version} (DEK v{running.to_version})"
    return f"{running.kind} rotation to DEK v{running.to_version}"


def wants_rotation(desired: int | None, observed: int | None) -> bool:
    """Cheap pre-check from the CR alone, to flag Rotating before any database work."""
    return desired is not None and observed is not None and desired > observed
