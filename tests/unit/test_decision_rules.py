"""The rules around the decision: the one gatherer, the refresh's steps, usage, mode and the
end-of-life dates (pure, no database)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from rotation_operator.policy.decisions import (
    Action,
    Decision,
    Request,
    Running,
    State,
    Usage,
    decide,
    destroy_from,
    encryptions,
    gather,
    running_record,
    served_version,
    step_mode,
    usage,
    zero_rows_clock,
)
from rotation_operator.policy.reasons import Reason

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Key:
    version: int
    state: str
    kek_fingerprint: str = "fp-a"
    created_at: datetime = T0
    encryptions: int = 0


@dataclass(frozen=True)
class Record:
    id: int
    kind: str
    phase: str
    requested_version: int | None
    to_version: int


def test_gather_reads_the_active_key_its_usage_and_whether_a_rekey_is_due() -> None:
    keys = [Key(1, "retired", "fp-old"), Key(2, "active", created_at=T0, encryptions=10),
            Key(3, "destroyed", "fp-gone")]
    state = gather(keys, 4, None, current_kek="fp-a", key_rows={2: 25})
    assert (state.active, state.served, state.active_created) == (2, 4, T0)
    assert state.active_encryptions == 25  # at least one encryption per row under it
    assert state.rekey  # v1 is wrapped by another KEK (a destroyed key wraps nothing)
    assert not gather(keys[1:], 4, None, current_kek="fp-a").rekey
    assert not gather(keys, 4, None).rekey  # no KEK presented: not looked at


def test_gather_without_keys_has_no_active_key() -> None:
    state = gather([], None, None)
    assert (state.active, state.active_created, state.active_encryptions) == (0, None, 0)


def test_served_version_and_the_running_record_come_from_the_records() -> None:
    records = [Record(1, "policy", "baseline", 1, 1), Record(2, "policy", "done", 3, 2),
               Record(3, "manual", "done", None, 3), Record(4, "policy", "superseded", 9, 4),
               Record(5, "policy", "running", 5, 5)]
    assert served_version(records) == 3  # running and superseded serve nothing yet
    assert running_record(records) is records[4]
    assert Running.of(running_record(records)) == Running(5, "policy", 5, 5)
    assert served_version([]) is None and running_record([]) is None


def test_encryptions_are_at_least_the_rows() -> None:
    assert encryptions(5, 9) == 9 and encryptions(12, 9) == 12


def schedule(now: datetime = T0, age: timedelta | None = None,
             paused: bool = False) -> Request:
    return Request("schedule", 3, paused, now, age, None, False)


def test_the_timer_sweeps_first_and_rows_under_a_retired_key_never_wait_for_a_schedule(
        ) -> None:
    """The timer's two steps: a sweep, then the schedule (a review finding: a due schedule
    that preferred a reconcile left rows unswept when that reconcile could not act, e.g.
    spec.version below the served version)."""
    state = State(2, 3, None, retired_rows=4, active_created=T0)
    swept = decide(Request("sweep", 1, now=T0 + timedelta(days=2)), state)
    assert (swept.action, swept.reason) == (Action.SWEEP, Reason.ROWS_UNDER_RETIRED_KEY)
    due = decide(schedule(T0 + timedelta(days=2), timedelta(days=1)), state)
    assert (due.action, due.kind, due.reason) == (Action.ROTATE, "scheduled",
                                                   Reason.SCHEDULED_ROTATION)


def test_the_schedule_leaves_a_running_rotation_alone() -> None:
    state = State(2, 3, Running(1, "policy", 3, 2), active_created=T0)
    d = decide(schedule(T0 + timedelta(days=2), timedelta(days=1)), state)
    assert (d.action, d.reason) == (Action.NONE, Reason.ROTATION_PENDING)


def test_the_schedule_does_nothing_while_paused_or_when_nothing_is_due() -> None:
    state = State(2, 3, None, active_created=T0)
    assert decide(schedule(T0 + timedelta(days=2), timedelta(days=1), paused=True),
                  state).action is Action.PAUSED
    assert decide(schedule(T0, timedelta(days=1)), state).action is Action.NONE
    assert decide(schedule(), State(2, 3, None, retired_rows=4)).action is Action.NONE
    # a bump is the reconcile's, never the timer's
    assert decide(Request("schedule", 9), State(2, 3, None)).action is Action.NONE


@pytest.mark.parametrize(("used", "rows", "level"), [
    (100, 10, Usage.FAR), (850, 100, Usage.NEAR), (850, 600, Usage.TABLE_NEAR_BOUND),
    (850, None, Usage.TABLE_NEAR_BOUND)])
def test_usage_levels(used: int, rows: int | None, level: Usage) -> None:
    request = Request("policy", 1, max_encryptions=1000)
    assert usage(request, State(2, 1, None, active_encryptions=used, rows=rows)) is level


def test_no_usage_level_without_a_bound() -> None:
    assert usage(Request("policy", 1), State(2, 1, None, active_encryptions=10**12)) is None


def test_a_sweep_always_runs_online() -> None:
    sweep = Decision(Action.SWEEP, Reason.ROWS_UNDER_RETIRED_KEY, "")
    rotate = Decision(Action.ROTATE, Reason.ROTATION_REQUESTED, "")
    assert step_mode(sweep, "Atomic") == "Online"
    assert step_mode(rotate, "Atomic") == "Atomic" and step_mode(rotate, "Online") == "Online"


def test_destroy_from_is_the_later_of_the_wait_and_the_stored_date() -> None:
    wait = timedelta(days=7)
    assert destroy_from(T0, None, wait) == T0 + wait
    assert destroy_from(T0, T0 + timedelta(days=30), wait) == T0 + timedelta(days=30)
    assert destroy_from(T0, T0 + timedelta(days=1), wait) == T0 + wait


@pytest.mark.parametrize(("state", "since", "rows", "exact", "after"), [
    ("retired", None, 0, True, T0 + timedelta(hours=1)),   # an exact zero starts the clock
    ("retired", None, 0, False, None),                     # an estimate does not
    ("retired", T0, 0, False, T0),                         # a running clock keeps its start
    ("disabled", T0, 3, True, None),                       # a row stops it
    ("active", T0, 0, True, T0),                           # other states keep what is stored
    ("retiring", None, 0, True, None)])
def test_zero_rows_clock(state: str, since: datetime | None, rows: int, exact: bool,
                         after: datetime | None) -> None:
    assert zero_rows_clock(state, since, rows, T0 + timedelta(hours=1), exact) == after
