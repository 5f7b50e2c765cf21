"""operator/status.py: what the status says, from snapshot, result and decision (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from rotation_operator.errors import DatabaseUnavailable, LockHeld
from rotation_operator.operator import conditions, status
from rotation_operator.operator.conditions import (
    DEGRADED,
    KEK_WEAK,
    KEY_USAGE,
    READY,
    ROTATING,
    THROTTLED,
)
from rotation_operator.policy.decisions import Action, Decision, Request
from rotation_operator.policy.reasons import Reason
from rotation_operator.rotation.inspection import KeyStatus, Snapshot, TargetCounts
from rotation_operator.rotation.results import RotationResult

T0 = datetime(2026, 1, 1, tzinfo=UTC)
NOTHING = Decision(Action.NONE, Reason.KEYS_READY, "version 3 is served")


def snap(*, retired: int = 0, rows: int = 10, encryptions: int = 0,
         running: Any = None) -> Snapshot:
    keys = [KeyStatus(1, "retired", T0, T0, "cli", retired, "fp-old"),
            KeyStatus(2, "active", T0, None, "policy", rows - retired, "fp-new",
                      encryptions=encryptions)]
    return Snapshot(2, 3, keys, [TargetCounts("secrets", "table", rows, 0, retired, retired)],
                    None, running)


def result(**changes: Any) -> RotationResult:
    fields: dict[str, Any] = dict(requested_version=4, performed=True, resumed=False,
                                  mode="Online", from_version=2, to_version=3,
                                  decision=Decision(Action.ROTATE, Reason.ROTATION_REQUESTED,
                                                    ""),
                                  re_encrypted=10, seconds=1.25)
    fields.update(changes)
    return RotationResult(**fields)


def applied(changes: list[status.Change], conds: list[dict[str, Any]] | None = None
            ) -> dict[str, tuple[str, str]]:
    out = list(conds or [])
    for c in changes:
        out = conditions.set_condition(out, c.type, c.status, c.reason, c.message, 1)
    return {c["type"]: (c["status"], c["reason"]) for c in out}


def test_a_rotation_that_ran_is_ready_with_its_summary() -> None:
    changes = status.ready(Decision(Action.ROTATE, Reason.ROTATION_REQUESTED, ""), result(),
                           snap())
    assert applied(changes) == {READY: ("True", "RotationSucceeded"), ROTATING: ("False", "Idle")}
    assert changes[0].message.startswith("rotated v2 -> v3: 10 rows re-encrypted")


def test_nothing_to_do_is_keys_ready_naming_the_active_key() -> None:
    changes = status.ready(NOTHING, None, snap())
    assert applied(changes)[READY] == ("True", "KeysReady")
    assert changes[0].message == "active key v2; version 3 is served"


def test_a_rekey_alone_is_kek_rotated() -> None:
    rekey = result(decision=Decision(Action.REKEY, Reason.KEK_ROTATION, ""), rekeyed=(1, 2),
                   re_encrypted=0, kind="rekey")
    changes = status.ready(Decision(Action.REKEY, Reason.KEK_ROTATION, ""), rekey, snap())
    assert applied(changes)[READY] == ("True", "KEKRotated")
    assert "rewrapped DEK v1, v2" in changes[0].message


def test_behind_and_paused_are_not_ready() -> None:
    behind = Decision(Action.BEHIND, Reason.VERSION_BELOW_SERVED, "spec.version 1 is below 3")
    assert applied(status.ready(behind, None, snap())) == {
        READY: ("False", "VersionBelowServed"), ROTATING: ("False", "Idle")}
    paused = Decision(Action.PAUSED, Reason.PAUSED, "paused")
    assert applied(status.ready(paused, None, snap())) == {READY: ("False", "Paused"),
                                                            ROTATING: ("False", "Paused")}


def test_rows_under_a_retired_key_degrade_until_swept() -> None:
    degraded = applied(status.degraded(snap(retired=4), [], clear_other=False))
    assert degraded == {DEGRADED: ("True", "RowsUnderRetiredKey")}
    conds = conditions.set_condition([], DEGRADED, True, "RowsUnderRetiredKey", "", 1)
    assert applied(status.degraded(snap(), conds, clear_other=False), conds)[DEGRADED] == (
        "False", "AsExpected")
    # while a rotation runs, its passes move them: not degraded
    assert status.degraded(snap(retired=4, running=object()), [], clear_other=False) == []


def test_a_failure_degraded_is_cleared_only_when_asked() -> None:
    conds = conditions.set_condition([], DEGRADED, True, "DatabaseUnavailable", "", 1)
    assert status.degraded(snap(), conds, clear_other=False) == []
    assert applied(status.degraded(snap(), conds, clear_other=True), conds)[DEGRADED] == (
        "False", "AsExpected")


def test_a_weak_kek_is_flagged_and_cleared() -> None:
    weak = status.kek_weak(["Secret ns/k key kek"], [])
    assert applied(weak) == {KEK_WEAK: ("True", "KEKLooksLikeText")}
    assert "Secret ns/k key kek" in weak[0].message
    conds = conditions.set_condition([], KEK_WEAK, True, "KEKLooksLikeText", "", 1)
    assert applied(status.kek_weak([], conds), conds)[KEK_WEAK] == ("False", "KEKRandom")
    assert status.kek_weak([], []) == []  # never flagged: nothing to clear


def test_key_usage_near_the_bound_and_a_table_that_fills_a_key() -> None:
    request = Request("policy", 3, max_encryptions=1000)
    near = status.key_usage(snap(rows=10, encryptions=900), request, [])
    assert applied(near) == {KEY_USAGE: ("True", "UsageBoundNear")}
    assert "rotation.rotateOnUsage" in near[0].message
    table = status.key_usage(snap(rows=900), request, [])
    assert applied(table) == {KEY_USAGE: ("True", "TableNearBound")}
    assert "raise maxEncryptionsPerKey" in table[0].message
    conds = conditions.set_condition([], KEY_USAGE, True, "UsageBoundNear", "", 1)
    assert applied(status.key_usage(snap(), request, conds), conds)[KEY_USAGE] == (
        "False", "UsageBoundFar")
    assert status.key_usage(snap(), request, []) == []
    assert status.key_usage(snap(encryptions=10**9), Request("policy", 3), []) == []


def test_a_failure_names_its_reason_and_a_repeat_is_recognised() -> None:
    exc = DatabaseUnavailable("the database at db:5432 is unreachable")
    rotating = conditions.set_condition([], ROTATING, True, "RotationRunning", "", 1)
    changes, repeated = status.failed(exc.reason, str(exc), rotating)
    conds = rotating
    for c in changes:
        conds = conditions.set_condition(conds, c.type, c.status, c.reason, c.message, 1)
    assert applied([], conds) == {READY: ("False", "DatabaseUnavailable"),
                                  ROTATING: ("False", "RotationFailed"),
                                  DEGRADED: ("True", "DatabaseUnavailable")}
    assert not repeated
    again, repeated = status.failed(exc.reason, str(exc), conds)
    assert repeated and applied(again, conds)[ROTATING] == ("False", "Idle")
    _other, repeated = status.failed(LockHeld.reason, "held", conds)
    assert not repeated


def test_throttled_and_its_end() -> None:
    assert applied(status.throttled("ReplicationLag", "lag 3s")) == {
        THROTTLED: ("True", "ReplicationLag")}
    conds = conditions.set_condition([], THROTTLED, True, "ReplicationLag", "", 1)
    assert applied(status.throttled(None, ""), conds)[THROTTLED] == ("False", "NotThrottled")
    assert applied(status.throttle_ended(conds), conds)[THROTTLED] == ("False", "NotThrottled")
    assert status.throttle_ended([]) == []


def test_the_rotation_status_names_every_field() -> None:
    fields = status.rotation_status(phase="Pending", policyVersion=4)
    assert set(fields) == set(status.ROTATION_FIELDS)
    assert fields["phase"] == "Pending" and fields["done"] is None
    done = status.finished_rotation({"mode": "Online"}, result(), "policy", "now")
    assert (done["phase"], done["reEncrypted"], done["progress"]) == ("Succeeded", 10,
                                                                      "10/10 (100%)")
    assert status.progress(0, 0) == "0/0"


def test_kek_fields_name_only_presented_fingerprints() -> None:
    fields = status.kek_fields(snap(), {"fp-new"}, "fp-new", "Secret ns/k key kek")
    assert [k["kek"] for k in fields["keys"]] == ["unknown", "fp-new"]
    assert fields["kek"] == {"fingerprint": "fp-new", "source": "Secret ns/k key kek",
                             "previousKeksNeeded": True}
    again = status.kek_fields_from_status(snap(), {"kek": fields["kek"], "keys": fields["keys"]})
    assert again == fields
    assert status.kek_fields_from_status(snap(), {}) == {}


def test_the_schedule_is_due_max_key_age_after_the_active_key() -> None:
    request = Request("policy", 3, now=T0, max_key_age=timedelta(days=30))
    assert status.schedule_fields(snap(), request) == {"nextRotationDue": "2026-01-31T00:00:00Z"}
    assert status.schedule_fields(snap(), Request("policy", 3)) == {"nextRotationDue": None}


# -- legacy reads (issue #17) --------------------------------------------------------------
def legacy_snap(reads: str, *, migrated: bool = True, late: int = 0) -> Snapshot:
    from rotation_operator.store.legacy import LegacyState

    ids = tuple(str(9000 + i) for i in range(min(late, 5)))
    keys = [KeyStatus(2, "active", T0, None, "policy", 10, "fp-new")]
    return Snapshot(2, 3, keys, [TargetCounts("secrets", "table", 10 + late, late, late,
                                              late if reads == "open" else 0, ids)],
                    None, None, legacy=LegacyState(T0 if migrated else None,
                                                   "open" if reads == "open" else "closed"))


def test_late_legacy_rows_are_degraded_by_name_with_an_event_once() -> None:
    s = legacy_snap("closed", late=7)
    changes = status.degraded(s, [], clear_other=False)
    assert [(c.type, c.status, c.reason) for c in changes] == [
        (DEGRADED, True, Reason.LATE_LEGACY_ROWS)]
    assert "secrets id 9000" in changes[0].message and "and 2 more" in changes[0].message
    assert "sweep --legacy-kek" in changes[0].message
    after = conditions.set_condition([], DEGRADED, True, changes[0].reason,
                                     changes[0].message, 1)
    assert status.late_legacy_news([], after) == changes[0].message
    assert status.late_legacy_news(after, after) is None  # no second Event
    assert s.summary()["legacy"] == {"reads": "Closed", "migratedAt": "2026-01-01T00:00:00Z",
                                     "lateRows": 7, "lateRowIds": [
                                         {"table": "secrets", "id": str(9000 + i)}
                                         for i in range(5)]}
    # gone: Degraded clears
    cleared = status.degraded(legacy_snap("closed"), after, clear_other=False)
    assert [(c.status, c.reason) for c in cleared] == [(False, Reason.AS_EXPECTED)]


def test_legacy_reads_open_after_migration_warns_and_before_it_says_nothing() -> None:
    opened = status.legacy_reads(legacy_snap("open"), [])
    assert [(c.type, c.status, c.reason) for c in opened] == [
        (conditions.LEGACY_OPEN, True, Reason.LEGACY_KEPT_OPEN)]
    assert status.legacy_reads(legacy_snap("open", migrated=False), []) == []
    closed = status.legacy_reads(legacy_snap("closed"), [])
    assert [(c.status, c.reason) for c in closed] == [(False, Reason.LEGACY_CLOSED)]
    # open with late rows: the old behaviour, rows under a retired key (swept)
    s = legacy_snap("open", late=1)
    assert [c.reason for c in status.degraded(s, [], clear_other=False)] == [
        Reason.ROWS_UNDER_RETIRED_KEY]
