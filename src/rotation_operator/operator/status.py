"""What an EncryptionPolicy's status says: pure functions, no I/O.

Snapshot, result and decision in; condition changes and status fields out.  The workflow
gathers the input and writes what these functions return (through its ``StatusWriter``),
so every rule of what a user sees is here and tested without a cluster
(``tests/unit/test_status.py``).  Condition reasons come from the error classes or from
:class:`~rotation_operator.policy.reasons.Reason`, never literals.

Condition functions take the conditions as they are now (some only clear a condition that
is there) and return a list of :class:`Change`, applied in order.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rotation_operator.operator import conditions
from rotation_operator.operator.conditions import (
    DEGRADED,
    KEK_WEAK,
    KEY_USAGE,
    LEGACY_OPEN,
    READY,
    ROTATING,
    THROTTLED,
)
from rotation_operator.policy.decisions import (
    Action,
    Decision,
    Request,
    Usage,
    next_rotation_due,
    usage,
)
from rotation_operator.policy.reasons import Reason
from rotation_operator.rotation.inspection import Snapshot, rfc3339
from rotation_operator.rotation.lifecycle import Outcome
from rotation_operator.rotation.results import RotationResult

Conditions = Iterable[Mapping[str, Any]]
#: Every field of ``status.rotation``: each write names all of them (None deletes one in a
#: merge patch), so the object always describes the one rotation it names.
ROTATION_FIELDS = ("phase", "kind", "mode", "policyVersion", "fromVersion", "toVersion", "done",
                   "total", "progress", "reEncrypted", "legacyMigrated", "resumed", "startedAt",
                   "finishedAt", "seconds", "message", "handover", "caughtInHandover",
                   "sweptAfter", "rowsPerSecond", "maxRowsPerSecond", "throttle")


@dataclass(frozen=True)
class Change:
    """One condition to set."""

    type: str
    status: bool
    reason: str
    message: str


# -- conditions --------------------------------------------------------------------------
def requested(desired: int) -> list[Change]:
    """A bump seen: flagged before any slow work (pipelines watch for Rotating)."""
    return [Change(ROTATING, True, Reason.ROTATION_REQUESTED,
                   f"spec.version {desired} requested; preparing the rotation"),
            Change(READY, False, Reason.ROTATING, f"rotating to version {desired}")]


def started(decision: Decision, desired: int) -> list[Change]:
    """A step begins: a rekey or a rotation (a sweep changes no condition)."""
    if decision.action is Action.REKEY:
        return [Change(ROTATING, True, Reason.REKEYING, decision.message),
                Change(READY, False, Reason.REKEYING, decision.message)]
    if decision.action is Action.SWEEP:
        return []
    return [Change(ROTATING, True, Reason.ROTATION_RUNNING, decision.message),
            Change(READY, False, Reason.ROTATING, f"rotating to version {desired}"
                   if decision.kind == "policy" else decision.message)]


def ready(decision: Decision, result: RotationResult | None, snap: Snapshot) -> list[Change]:
    """Ready and Rotating once a reconcile has acted (or found nothing to do)."""
    if decision.action is Action.BEHIND:
        return [Change(READY, False, decision.reason, decision.message),
                Change(ROTATING, False, Reason.IDLE, "no rotation running")]
    if decision.action is Action.PAUSED:
        return [Change(READY, False, Reason.PAUSED, decision.message),
                Change(ROTATING, False, Reason.PAUSED, decision.message)]
    performed = result is not None and rotated(result)
    rekeyed = result is not None and bool(result.rekeyed)
    text = summary(result) if result is not None and (performed or rekeyed) else (
        f"active key v{snap.active_version}; {decision.message}")
    reason = Reason.ROTATION_SUCCEEDED if performed else \
        Reason.KEK_ROTATED if rekeyed else Reason.KEYS_READY
    return [Change(READY, True, reason, text),
            Change(ROTATING, False, Reason.IDLE, "no rotation running")]


def healed(snap: Snapshot) -> list[Change]:
    """A transient failure is over (the refresh proved the KEK and the database)."""
    return [Change(READY, True, Reason.KEYS_READY, f"active key v{snap.active_version}; "
                                                   "database and Secrets reachable again")]


def degraded(snap: Snapshot, current: Conditions, *, clear_other: bool) -> list[Change]:
    """Degraded from the counts: late legacy rows (refused, named), or rows under a retired
    key, each with its own reason.  ``clear_other``: also clear a Degraded set by an
    earlier failure."""
    if snap.legacy.closed and snap.late_legacy_count:
        return [Change(DEGRADED, True, Reason.LATE_LEGACY_ROWS, late_legacy_message(snap))]
    if snap.retired_count and snap.running is None:
        return [Change(DEGRADED, True, Reason.ROWS_UNDER_RETIRED_KEY,
                       f"{snap.retired_count} rows are under a retired key, or under the KEK "
                       "itself after a rotation (written by an application with a stale key "
                       "ring, or one that does not use DEKs); the refresh sweeps them onto "
                       f"DEK v{snap.active_version}")]
    now = conditions.get(current, DEGRADED) or {}
    if clear_other or now.get("reason") in (Reason.ROWS_UNDER_RETIRED_KEY,
                                            Reason.LATE_LEGACY_ROWS):
        return [Change(DEGRADED, False, Reason.AS_EXPECTED, "keys and data are consistent")]
    return []


def late_legacy_message(snap: Snapshot) -> str:
    """What a late legacy row is and what to do, naming the rows (table and id)."""
    named = ", ".join(f"{t} id {i}" for t, i in snap.late_legacy)
    more = snap.late_legacy_count - len(snap.late_legacy)
    return (f"{snap.late_legacy_count} legacy rows (key_id NULL) were written after every "
            f"legacy row was migrated onto a DEK ({named}{f' and {more} more' if more > 0 else ''}"
            "): key rings refuse them (spec.legacy.reads is Closed) and no sweep moves them. "
            "Each is a rollback (an old ciphertext put back) or an application still writing "
            "without DEKs: delete or rewrite it, or, if it is genuine, move it with "
            "`rotation-operator sweep --legacy-kek SOURCE` (docs/format.md section 8)")


def late_legacy_news(before: Conditions, after: Conditions) -> str | None:
    """The Event to post when Degraded newly names late legacy rows (or other ones)."""
    now = conditions.get(after, DEGRADED) or {}
    if now.get("status") != "True" or now.get("reason") != Reason.LATE_LEGACY_ROWS:
        return None
    was = conditions.get(before, DEGRADED) or {}
    if was.get("reason") == now.get("reason") and was.get("message") == now.get("message") \
            and was.get("status") == "True":
        return None
    return str(now.get("message"))


def legacy_reads(snap: Snapshot, current: Conditions) -> list[Change]:
    """LegacyReadsOpen: a warning while the policy keeps legacy reads open after every
    legacy row was migrated (a database writer can then put an old KEK-direct ciphertext
    back and have it read, and swept onto the active key)."""
    legacy = snap.legacy
    if legacy.open_after_migration:
        return [Change(LEGACY_OPEN, True, Reason.LEGACY_KEPT_OPEN,
                       f"every legacy row was migrated onto a DEK at "
                       f"{rfc3339(legacy.migrated_at)}, but spec.legacy.reads is Open: key "
                       "rings still read rows with key_id NULL and sweeps move them, so an "
                       "old KEK-direct ciphertext put back by a database writer is accepted; "
                       "set it to Closed once no application writes without DEKs")]
    if legacy.migrated or conditions.get(current, LEGACY_OPEN) is not None:
        return [Change(LEGACY_OPEN, False, Reason.LEGACY_CLOSED,
                       "key rings refuse legacy rows (key_id NULL): every one was migrated"
                       if legacy.migrated else "legacy rows are not migrated yet")]
    return []


def kek_weak(weak: Sequence[str], current: Conditions) -> list[Change]:
    """KEKWeak: the KEK's bytes look like text (a passphrase taken as a key)."""
    if weak:
        return [Change(KEK_WEAK, True, Reason.KEK_LOOKS_LIKE_TEXT,
                       f"the KEK from {', '.join(weak)} is 32 printable characters, taken as "
                       "raw bytes: a passphrase-like key is far weaker than 256 bits; generate "
                       "one with `openssl rand -base64 32` and rekey to it")]
    if conditions.get(current, KEK_WEAK) is not None:
        return [Change(KEK_WEAK, False, Reason.KEK_RANDOM, "the KEK does not look like text")]
    return []


def key_usage(snap: Snapshot, request: Request, current: Conditions) -> list[Change]:
    """KeyUsageHigh: the active key against ``maxEncryptionsPerKey``."""
    active = snap.active_key
    if active is None:
        return []
    state = snap.state()
    level = usage(request, state)
    if level is None:
        return []
    used = state.active_encryptions
    if level is Usage.FAR:
        if conditions.get(current, KEY_USAGE) is None:
            return []
        return [Change(KEY_USAGE, False, Reason.USAGE_BOUND_FAR,
                       f"DEK v{active.version} has encrypted about {used} values")]
    table = level is Usage.TABLE_NEAR_BOUND
    hint = (" (the targets hold so many rows that every new key starts near the bound: "
            "raise maxEncryptionsPerKey)" if table else "")
    return [Change(KEY_USAGE, True, Reason.TABLE_NEAR_BOUND if table else Reason.USAGE_BOUND_NEAR,
                   f"DEK v{active.version} has encrypted about {used} values of the "
                   f"{request.max_encryptions} one key may (maxEncryptionsPerKey): rotate it"
                   + (", as the policy does by itself" if request.rotate_on_usage
                      else " (or set rotation.rotateOnUsage)") + hint)]


def throttled(reason: str | None, message: str) -> list[Change]:
    """Throttled: the rotation waits for a limit (``reason``), or stopped waiting."""
    if reason is None:
        return [Change(THROTTLED, False, Reason.NOT_THROTTLED,
                       "the rotation is not waiting for a limit")]
    return [Change(THROTTLED, True, reason, message)]


def throttle_ended(current: Conditions) -> list[Change]:
    """A rotation ended: a Throttled condition that is there says so."""
    if conditions.get(current, THROTTLED) is None:
        return []
    return [Change(THROTTLED, False, Reason.NOT_THROTTLED, "no rotation is running")]


def failed(reason: str, message: str, current: Conditions) -> tuple[list[Change], bool]:
    """Ready=False with the error's reason, and whether it repeats the failure already
    shown (a retry that fails the same way posts no new Event)."""
    before = conditions.get(current, READY) or {}
    repeated = before.get("status") == "False" and before.get("reason") == reason and \
        before.get("message") == message[:conditions.MAX_MESSAGE]
    was_rotating = (conditions.get(current, ROTATING) or {}).get("status") == "True"
    return [Change(READY, False, reason, message),
            Change(ROTATING, False, Reason.ROTATION_FAILED if was_rotating else Reason.IDLE,
                   message if was_rotating else "no rotation running"),
            Change(DEGRADED, True, reason, message)], repeated


# -- fields ------------------------------------------------------------------------------
def rotation_status(**fields: Any) -> dict[str, Any]:
    """A complete ``status.rotation``: unnamed fields are None (removed by the patch)."""
    unknown = set(fields) - set(ROTATION_FIELDS)
    assert not unknown, unknown
    return {name: fields.get(name) for name in ROTATION_FIELDS}


def snapshot_fields(snap: Snapshot, now: str) -> dict[str, Any]:
    return {**snap.summary(), "lastRefreshed": now}


def schedule_fields(snap: Snapshot, request: Request) -> dict[str, Any]:
    """``status.nextRotationDue``."""
    return {"nextRotationDue": rfc3339(next_rotation_due(request, snap.state()))}


def retention_fields(outcome: Outcome) -> dict[str, Any]:
    """``status.retention``: the next step of each key's end of life (the dry run)."""
    return {"steps": [{"version": s.version, "action": s.action, "due": rfc3339(s.due),
                       "ready": s.ready} for s in outcome.plan if s not in outcome.done]}


#: ``status.kek`` fields only a PKCS#11 KEK has: what the token says of the key.
KEK_PROTECTION_FIELDS = ("alwaysSensitive", "neverExtractable")


def kek_protection(kek: object) -> dict[str, bool | None]:
    """``CKA_ALWAYS_SENSITIVE`` and ``CKA_NEVER_EXTRACTABLE`` of a PKCS#11 KEK as
    ``status.kek`` fields; None for a KEK held in memory (the merge patch removes them)."""
    values = (getattr(kek, "always_sensitive", None), getattr(kek, "never_extractable", None))
    return {name: value if isinstance(value, bool) else None
            for name, value in zip(KEK_PROTECTION_FIELDS, values, strict=True)}


def kek_fields(snap: Snapshot, presented: Collection[str], current: str, source: str,
               protection: Mapping[str, bool | None] | None = None) -> dict[str, Any]:
    """``status.kek`` and each key's ``kek``: only fingerprints of KEKs presented are named
    (a stored fingerprint of an unknown KEK would let guesses be checked offline).
    ``protection``: :func:`kek_protection` of the current KEK, if known."""
    keys = snap.summary()["keys"]
    for key, status in zip(keys, snap.keys, strict=True):
        key["kek"] = None if status.state == "destroyed" else (
            status.kek_fingerprint if status.kek_fingerprint in presented else "unknown")
    # a destroyed key wraps nothing any more: it needs no KEK
    needed = any(k.kek_fingerprint != current for k in snap.keys if k.state != "destroyed")
    return {"keys": keys, "kek": {"fingerprint": current, "source": source,
                                  "previousKeksNeeded": needed, **(protection or {})}}


def kek_fields_from_status(snap: Snapshot, status: Mapping[str, Any]) -> dict[str, Any]:
    """The same from what the status already shows (the refresh reads no KEK): the current
    fingerprint, and the fingerprints already named, which were all presented once."""
    kek = status.get("kek") or {}
    current = kek.get("fingerprint")
    if not current:
        return {}
    shown = {k.get("kek") for k in status.get("keys") or []} - {None, "unknown"}
    protection = {name: kek[name] for name in KEK_PROTECTION_FIELDS if name in kek}
    return kek_fields(snap, {current, *shown}, current, str(kek.get("source") or ""),
                      protection)


def progress(done: int, total: int) -> str:
    if not total:
        return f"{done}/{total}"
    return f"{done}/{total} ({100.0 * done / total:.0f}%)"


def rotated(result: RotationResult) -> bool:
    """Whether ``result`` includes a rotation (not only a rekey or a sweep)."""
    return result.performed and result.decision is not None and \
        result.decision.action in (Action.ROTATE, Action.RESUME)


def summary(result: RotationResult) -> str:
    """One line on what a step did: the Ready message, Events and the handler's log."""
    if result.rekeyed and not rotated(result) and result.kind != "sweep":
        return (f"rewrapped DEK {', '.join(f'v{v}' for v in result.rekeyed)} under the new "
                "KEK" + (f"; {result.re_encrypted} legacy rows moved onto a DEK first"
                         if result.re_encrypted else ""))
    if not result.performed:
        return (result.decision.message if result.decision else
                f"version {result.requested_version} already served (key v{result.to_version})")
    if result.kind == "sweep":
        return (f"swept {result.re_encrypted} rows found under retired keys onto "
                f"v{result.to_version}")
    return (f"rotated v{result.from_version} -> v{result.to_version}: {result.re_encrypted} rows "
            f"re-encrypted ({result.legacy_migrated} legacy) in {result.seconds:.1f}s"
            + ("; resumed after an interruption" if result.resumed else "")
            + (f"; retired {', '.join(f'v{v}' for v in result.retired)}" if result.retired else ""))


def finished_rotation(base: Mapping[str, Any], result: RotationResult, kind: str, now: str
                      ) -> dict[str, Any]:
    """``status.rotation`` once a step is over."""
    return rotation_status(**{
        **base, "phase": "Succeeded" if result.performed else "Skipped", "kind": kind,
        "policyVersion": result.requested_version, "fromVersion": result.from_version,
        "toVersion": result.to_version, "done": result.re_encrypted,
        "total": result.re_encrypted, "progress": progress(result.re_encrypted,
                                                           result.re_encrypted),
        "reEncrypted": result.re_encrypted, "legacyMigrated": result.legacy_migrated,
        "resumed": result.resumed, "finishedAt": now,
        "seconds": round(result.seconds, 3), "message": summary(result),
        "handover": result.handover or None, "caughtInHandover": result.caught_in_handover,
        "sweptAfter": result.swept_after})
