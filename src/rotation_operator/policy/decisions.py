"""What a request means, given what the database says: the decision layer.

Pure functions of gathered state (cert-manager style).  State is gathered in one place
(:func:`gather`), from the keys and rotation records the store reads or from a status
snapshot, and :func:`decide` turns a request and that state into one :class:`Decision`.
The operator decides once to report, the engine once more under the rotation lock, on
fresh records, before it acts; each further step of one reconcile (a rekey that made room
for a rotation, a sweep before a scheduled rotation) is decided anew.  The rules around
the decision live here too: when a schedule is due, how close a key is to its usage
bound, which mode a step runs in, a key's zero-rows clock and its earliest destroy date.

The database's rotation records are the truth, not a custom resource's status: a lost
status write, an operator restart or a re-created policy can never cause a second rotation.

Requests come in five kinds: a **policy** version (``spec.version``, or the CLI's
``--policy-version``), a **manual** rotation (the CLI without a version: it never uses up a
policy version), a **sweep** (move rows that slipped in under a retired key onto the active
one, minting nothing), a **schedule** (the operator's timer, after its sweep: a rotation the
policy asks for by itself, its key too old or nearly used up, when one is due) and a
**rekey** (the CLI: rewrap the DEKs under the current KEK, nothing else).  A rekey comes
first whenever it is due: every key must be wrapped by the current KEK before anything
else happens.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Literal, Protocol, TypeVar

from rotation_operator.policy.config import Mode
from rotation_operator.policy.reasons import Reason

RequestKind = Literal["policy", "manual", "sweep", "schedule", "rekey"]


class Action(Enum):
    NONE = "none"          # nothing to do
    ROTATE = "rotate"      # mint a new key and move every row onto it
    RESUME = "resume"      # finish the interrupted rotation under the key it minted
    SWEEP = "sweep"        # move rows under retired keys onto the active key
    PAUSED = "paused"      # spec.rotation.paused: touch nothing
    BEHIND = "behind"      # spec.version is below what the database already served
    REKEY = "rekey"        # DEKs are wrapped by another KEK than the current one: rewrap


#: Fraction of ``max_encryptions`` at which a key counts as nearly used up.
USAGE_WARNING = 0.8


@dataclass(frozen=True)
class Request:
    kind: RequestKind
    version: int | None = None  # the policy version asked for (policy requests)
    paused: bool = False
    #: The clock, injected (scheduled rotations; None: never due).
    now: datetime | None = None
    #: Rotate by itself once the active key is this old (``spec.rotation.maxKeyAge``).
    max_key_age: timedelta | None = None
    #: Values one key may encrypt (``spec.rotation.maxEncryptionsPerKey``).
    max_encryptions: int | None = None
    #: Rotate by itself when the active key nears ``max_encryptions``.
    rotate_on_usage: bool = False


@dataclass(frozen=True)
class Running:
    """An unfinished rotation recorded in the database."""

    id: int
    kind: str
    version: int | None  # the policy version it serves (policy rotations)
    to_version: int      # the key it minted

    @classmethod
    def of(cls, record: RecordFacts | None) -> Running | None:
        if record is None:
            return None
        return cls(record.id, record.kind, record.requested_version, record.to_version)


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
    #: When the active key was created, and how many values it has encrypted (estimated).
    active_created: datetime | None = None
    active_encryptions: int = 0
    #: Rows in all targets (None: not counted): a rotation brings usage down to this.
    rows: int | None = None


class KeyFacts(Protocol):
    """What the decision layer reads of a key (a keys-table row or its status view)."""

    @property
    def version(self) -> int: ...
    @property
    def state(self) -> str: ...
    @property
    def kek_fingerprint(self) -> str: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def encryptions(self) -> int: ...


class RecordFacts(Protocol):
    """What the decision layer reads of a rotation record."""

    @property
    def id(self) -> int: ...
    @property
    def kind(self) -> str: ...
    @property
    def phase(self) -> str: ...
    @property
    def requested_version(self) -> int | None: ...
    @property
    def to_version(self) -> int: ...


R = TypeVar("R", bound=RecordFacts)


def served_version(records: Iterable[RecordFacts]) -> int | None:
    """The highest policy version the database has served (a baseline or a finished
    rotation): what ``observedVersion`` reports and bumps are compared with."""
    return max((r.requested_version for r in records
                if r.phase in ("baseline", "done") and r.requested_version is not None),
               default=None)


def running_record(records: Iterable[R]) -> R | None:
    """The unfinished rotation, if any (at most one: the rotation lock sees to it)."""
    return next((r for r in records if r.phase == "running"), None)


def encryptions(recorded: int, rows: int) -> int:
    """How many values a key has encrypted, as far as can be known: what the keys table
    recorded, and at least one per row under it now."""
    return max(recorded, rows)


def gather(keys: Sequence[KeyFacts], served: int | None, running: Running | None, *,
           current_kek: str | None = None, retired_rows: int | None = None,
           rows: int | None = None, key_rows: Mapping[int, int] | None = None) -> State:
    """The one place a :class:`State` is built.

    ``current_kek``: the current KEK's fingerprint, to see whether a rekey is due (None:
    not looked at); ``retired_rows``: rows under a non-active key, when counted; ``rows``:
    rows in all targets, when counted; ``key_rows``: rows per key version, when counted.
    """
    active = next((k for k in keys if k.state == "active"), None)
    rekey = current_kek is not None and any(
        k.kek_fingerprint != current_kek for k in keys if k.state != "destroyed")
    used = 0
    if active is not None:
        used = encryptions(active.encryptions, (key_rows or {}).get(active.version, 0))
    return State(active.version if active is not None else 0, served, running, retired_rows,
                 rekey, active.created_at if active is not None else None, used, rows)


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    message: str
    #: The unfinished rotation to resume (RESUME), for the engine.
    running: Running | None = None
    #: What a ROTATE is recorded as: ``policy`` (a version), ``manual`` or ``scheduled``.
    kind: str = "policy"


def decide(request: Request, state: State) -> Decision:
    """The action for ``request`` in ``state``."""
    decision = _unpaused(request, state)
    if request.paused and decision.action in (Action.ROTATE, Action.RESUME, Action.SWEEP,
                                              Action.REKEY):
        return Decision(Action.PAUSED, Reason.PAUSED, "spec.rotation.paused is set: would have "
                        f"acted ({decision.message}); clear it to go on")
    return decision


def _unpaused(request: Request, state: State) -> Decision:
    running = state.running
    if running is not None and running.to_version != state.active:
        running = None  # its key is not active any more: a new rotation supersedes it
    if request.kind == "sweep":
        return _sweep(state, running)
    if request.kind == "schedule":
        if running is not None:
            return Decision(Action.NONE, Reason.ROTATION_PENDING,
                            f"an unfinished {_describe(running)} runs first")
        return _scheduled(request, state) or Decision(Action.NONE, Reason.KEYS_READY,
                                                      "no rotation is due by schedule")
    if request.kind == "rekey" and not state.rekey:
        return Decision(Action.NONE, Reason.KEYS_READY, "every DEK is wrapped by the current KEK")
    if state.rekey:  # before anything else: every key must be readable with the current KEK
        return Decision(Action.REKEY, Reason.KEK_ROTATION,
                        "DEKs are wrapped by another KEK than the current one: rewrapping "
                        "them under it")
    if running is not None and _resumes(request, running):
        return Decision(Action.RESUME, Reason.ROTATION_RESUMED,
                        f"resuming the interrupted {_describe(running)}", running)
    if request.kind == "manual":
        return Decision(Action.ROTATE, Reason.ROTATION_REQUESTED,
                        "a manual rotation was requested (no policy version)", kind="manual")
    return _policy(request, state)


def _resumes(request: Request, running: Running) -> bool:
    """A running rotation is finished first, unless a newer policy version supersedes it
    (its rows then move once, straight onto the newer key)."""
    if request.kind == "manual" or running.kind != "policy" or running.version is None:
        return True  # a scheduled or manual one is finished (and adopted by a bump)
    return request.version is None or running.version >= request.version


def _policy(request: Request, state: State) -> Decision:
    desired, served = request.version, state.served
    assert desired is not None
    if served is not None and desired < served:
        return Decision(Action.BEHIND, Reason.VERSION_BELOW_SERVED,
                        f"spec.version {desired} is below {served}, which this database has "
                        f"already served: set it to {served} to adopt the current keys, or "
                        f"above {served} to rotate")
    if served is not None and desired == served:
        if state.retired_rows:
            return Decision(Action.SWEEP, Reason.ROWS_UNDER_RETIRED_KEY,
                            f"{state.retired_rows} rows are under a retired key: moving them "
                            f"onto DEK v{state.active}")
        return _scheduled(request, state) or Decision(Action.NONE, Reason.KEYS_READY,
                                                      f"version {desired} is served")
    before = "nothing" if served is None else f"version {served}"
    return Decision(Action.ROTATE, Reason.ROTATION_REQUESTED,
                    f"spec.version {desired} is newer than {before}: rotating")


def _scheduled(request: Request, state: State) -> Decision | None:
    """A rotation the policy asks for by itself: the active key too old, or nearly used
    up.  It serves no policy version (``observedVersion`` stays), so a later bump still
    rotates."""
    due = next_rotation_due(request, state)
    if due is not None and request.now is not None and request.now >= due:
        return Decision(Action.ROTATE, Reason.SCHEDULED_ROTATION,
                        f"DEK v{state.active} is older than maxKeyAge "
                        f"({_duration(request.max_key_age)}): rotating", kind="scheduled")
    if request.rotate_on_usage and usage_high(request, state) and rotation_helps(request, state):
        return Decision(Action.ROTATE, Reason.USAGE_BOUND,
                        f"DEK v{state.active} has encrypted about {state.active_encryptions} "
                        f"values of the {request.max_encryptions} allowed: rotating",
                        kind="scheduled")
    return None


def next_rotation_due(request: Request, state: State) -> datetime | None:
    """When the active key reaches ``max_key_age`` (None: no schedule)."""
    if request.max_key_age is None or state.active_created is None:
        return None
    return state.active_created + request.max_key_age


def usage_high(request: Request, state: State) -> bool:
    """The active key has encrypted most of what one key may (far below NIST SP 800-38D's
    2^32 random-nonce bound by default)."""
    return request.max_encryptions is not None and \
        state.active_encryptions >= USAGE_WARNING * request.max_encryptions


def rotation_helps(request: Request, state: State) -> bool:
    """A fresh key encrypts every row once: rotating for usage helps only while the rows
    are well below the bound (else each new key would be near it at once)."""
    return request.max_encryptions is not None and state.rows is not None and \
        state.rows < request.max_encryptions // 2


def adopts(running: Running, desired: int, served: int | None) -> bool:
    """A newer ``spec.version`` arriving while a scheduled or manual rotation runs is
    served by that rotation (its key is fresher than anything the bump could be about):
    no rotation too many."""
    return running.kind in ("scheduled", "manual") and (served is None or desired > served)


def _duration(value: timedelta | None) -> str:
    if value is None:
        return "none"
    seconds = int(value.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0 and seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


class Usage(Enum):
    """How much of ``maxEncryptionsPerKey`` the active key has used."""

    FAR = "far"                  # below the warning fraction
    NEAR = "near"                # near the bound: a rotation brings it down
    TABLE_NEAR_BOUND = "table"   # near the bound, and the targets alone nearly fill a key


def usage(request: Request, state: State) -> Usage | None:
    """The active key's usage against the policy's bound (None: no bound)."""
    if request.max_encryptions is None:
        return None
    if not usage_high(request, state):
        return Usage.FAR
    return Usage.NEAR if rotation_helps(request, state) else Usage.TABLE_NEAR_BOUND


def step_mode(decision: Decision, configured: Mode) -> Mode:
    """The mode a step runs in: a sweep is always online (it holds no table lock); a
    rotation runs in the policy's mode."""
    return "Online" if decision.action is Action.SWEEP else configured


# -- retention: the end of a key's life ------------------------------------------------------
@dataclass(frozen=True)
class Retention:
    """``spec.retention``: a retired key with no row for ``disable_after`` is disabled; a
    disabled one is destroyed ``destroy_after`` later."""

    disable_after: timedelta
    destroy_after: timedelta


@dataclass(frozen=True)
class KeyView:
    """What retention needs to know of a key."""

    version: int
    state: str
    rows: int
    zero_rows_since: datetime | None = None
    disabled_at: datetime | None = None
    destroy_after: datetime | None = None


@dataclass(frozen=True)
class Step:
    version: int
    action: Literal["disable", "destroy"]
    due: datetime
    ready: bool


def retention_plan(keys: Sequence[KeyView], retention: Retention | None, now: datetime
                   ) -> list[Step]:
    """The next step of every key's end of life, and whether it is due (the dry run).

    Nothing happens to a key any row references, and nothing at all without
    ``retention``: a key disabled by hand (``keys disable``) is destroyed only by hand.
    A disabled key's destroy is due after the policy's waiting period, and never before
    the date stored when it was disabled.
    """
    steps = []
    for k in keys:
        if k.rows:
            continue
        if k.state == "retired" and retention is not None and k.zero_rows_since is not None:
            due = k.zero_rows_since + retention.disable_after
            steps.append(Step(k.version, "disable", due, now >= due))
        elif k.state == "disabled" and retention is not None and k.disabled_at is not None:
            when = destroy_from(k.disabled_at, k.destroy_after, retention.destroy_after)
            steps.append(Step(k.version, "destroy", when, now >= when))
    return steps


def destroy_from(disabled_at: datetime, stored: datetime | None, wait: timedelta) -> datetime:
    """The earliest a disabled key may be destroyed: ``wait`` after it was disabled, and
    never before the date stored when it was disabled (``keys disable --destroy-after``)."""
    when = disabled_at + wait
    return when if stored is None else max(when, stored)


def zero_rows_clock(state: str, since: datetime | None, rows: int, now: datetime,
                    exact: bool) -> datetime | None:
    """Since when a retired or disabled key has had no row (retention counts from it).

    A row under the key stops the clock; an exact count of none starts it (an estimate of
    none does not: the statistics may be stale); other states keep what was stored.
    """
    if state not in ("retired", "disabled"):
        return since
    if rows:
        return None
    return since or (now if exact else None)


def _sweep(state: State, running: Running | None) -> Decision:
    if running is not None:
        return Decision(Action.NONE, Reason.ROTATION_PENDING,
                        f"an unfinished {_describe(running)} will move these rows")
    if state.retired_rows:
        return Decision(Action.SWEEP, Reason.ROWS_UNDER_RETIRED_KEY,
                        f"{state.retired_rows} rows are under a retired key: moving them "
                        f"onto DEK v{state.active}")
    return Decision(Action.NONE, Reason.KEYS_READY, "no row is under a retired key")


def _describe(running: Running) -> str:
    if running.kind == "policy" and running.version is not None:
        return f"rotation for version {running.version} (DEK v{running.to_version})"
    return f"{running.kind} rotation to DEK v{running.to_version}"


def wants_rotation(desired: int | None, observed: int | None) -> bool:
    """Cheap pre-check from the CR alone, to flag Rotating before any database work."""
    return desired is not None and observed is not None and desired > observed
