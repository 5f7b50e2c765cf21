"""set_condition(): kubebuilder-style conditions as pure functions over dicts."""

from __future__ import annotations

import re

from rotation_operator.operator import conditions
from rotation_operator.operator.conditions import DEGRADED, READY, ROTATING, get, set_condition

T0, T1 = "2024-01-01T00:00:00Z", "2024-01-01T00:05:00Z"


def test_new_condition_has_every_field() -> None:
    conds = set_condition([], READY, True, "KeysReady", "ok", 3, at=T0)
    assert conds == [{"type": READY, "status": "True", "reason": "KeysReady", "message": "ok",
                      "lastTransitionTime": T0, "observedGeneration": 3}]


def test_status_strings_and_bools() -> None:
    assert set_condition([], READY, False, "R", "m", 1)[0]["status"] == "False"
    assert set_condition([], READY, "Unknown", "R", "m", 1)[0]["status"] == "Unknown"


def test_unchanged_status_keeps_last_transition_time_but_updates_the_rest() -> None:
    first = set_condition([], READY, True, "KeysReady", "v1", 1, at=T0)
    second = set_condition(first, READY, True, "RotationSucceeded", "rotated", 2, at=T1)
    (ready,) = second
    assert ready["lastTransitionTime"] == T0  # status did not change
    assert ready["reason"] == "RotationSucceeded" and ready["message"] == "rotated"
    assert ready["observedGeneration"] == 2  # but it now describes generation 2


def test_changed_status_moves_last_transition_time() -> None:
    first = set_condition([], READY, True, "KeysReady", "ok", 1, at=T0)
    second = set_condition(first, READY, False, "Rotating", "rotating", 2, at=T1)
    assert second[0]["lastTransitionTime"] == T1
    assert second[0]["status"] == "False"


def test_missing_last_transition_time_is_filled_in() -> None:
    conds = [{"type": READY, "status": "True", "reason": "x", "message": "y"}]
    assert set_condition(conds, READY, True, "x", "y", 1, at=T1)[0]["lastTransitionTime"] == T1


def test_observed_generation_is_set_and_none_keeps_the_old_one() -> None:
    conds = set_condition([], ROTATING, False, "Idle", "idle", 4, at=T0)
    assert conds[0]["observedGeneration"] == 4
    assert set_condition(conds, ROTATING, False, "Idle", "idle", None)[0][
        "observedGeneration"] == 4
    assert "observedGeneration" not in set_condition([], ROTATING, False, "Idle", "i", None)[0]


def test_input_is_not_mutated() -> None:
    original = [{"type": READY, "status": "True", "reason": "a", "message": "b",
                 "lastTransitionTime": T0, "observedGeneration": 1}]
    snapshot = [dict(c) for c in original]
    set_condition(original, READY, False, "c", "d", 2, at=T1)
    assert original == snapshot


def test_other_conditions_are_kept_and_order_is_stable() -> None:
    conds = set_condition([], DEGRADED, False, "AsExpected", "fine", 1, at=T0)
    conds = set_condition(conds, ROTATING, True, "RotationRunning", "moving", 1, at=T0)
    conds = set_condition(conds, READY, False, "Rotating", "rotating", 1, at=T0)
    conds = set_condition([*conds, {"type": "Custom", "status": "True"}], READY, False,
                          "Rotating", "rotating", 1, at=T0)
    assert [c["type"] for c in conds] == [READY, ROTATING, DEGRADED, "Custom"]
    degraded = get(conds, DEGRADED)
    assert degraded is not None and degraded["message"] == "fine"


def test_message_is_truncated() -> None:
    conds = set_condition([], READY, False, "Boom", "x" * 5000, 1)
    assert len(conds[0]["message"]) == conditions.MAX_MESSAGE


def test_get() -> None:
    conds = set_condition([], READY, True, "KeysReady", "ok", 1)
    ready = get(conds, READY)
    assert ready is not None and ready["reason"] == "KeysReady"
    assert get(conds, ROTATING) is None
    assert get(None, READY) is None


def test_now_is_rfc3339_utc() -> None:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", conditions.now())
