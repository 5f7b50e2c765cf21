"""The one decision function: what a request means given the database's records."""

from __future__ import annotations

import itertools

import pytest

from rotation_operator.policy.decisions import (
    Action,
    Request,
    Running,
    State,
    decide,
    wants_rotation,
)


def policy(version: int, paused: bool = False) -> Request:
    return Request("policy", version, paused)


def running(version: int | None, to: int = 2, kind: str = "policy") -> Running:
    return Running(id=7, kind=kind, version=version, to_version=to)


@pytest.mark.parametrize(("desired", "served"), [(3, 3), (1, 1)])
def test_none_when_the_database_already_served_the_version(desired: int, served: int) -> None:
    d = decide(policy(desired), State(active=2, served=served, running=None))
    assert d.action is Action.NONE and d.reason == "KeysReady"


@pytest.mark.parametrize(("desired", "served"), [(2, 5), (1, 4)])
def test_a_version_below_the_served_one_is_reported_not_ready(desired: int,
                                                              served: int) -> None:
    """Finding 11: a re-created policy with a lower spec.version, or a bump that does not
    go above what was served, is said so."""
    d = decide(policy(desired), State(active=2, served=served, running=None))
    assert d.action is Action.BEHIND and d.reason == "VersionBelowServed"
    assert str(served) in d.message and str(desired) in d.message


@pytest.mark.parametrize(("desired", "served"), [(2, 1), (9, 3), (1, None)])
def test_rotate_when_spec_is_newer(desired: int, served: int | None) -> None:
    d = decide(policy(desired), State(active=1, served=served, running=None))
    assert d.action is Action.ROTATE and d.reason == "RotationRequested"


def test_resume_an_interrupted_rotation_of_the_same_version() -> None:
    r = running(4)
    d = decide(policy(4), State(active=2, served=3, running=r))
    assert d.action is Action.RESUME and d.running == r


def test_an_interrupted_higher_version_is_finished_rather_than_undone() -> None:
    d = decide(policy(3), State(active=2, served=1, running=running(6)))
    assert d.action is Action.RESUME


def test_a_newer_version_supersedes_an_interrupted_older_one() -> None:
    d = decide(policy(5), State(active=2, served=1, running=running(4)))
    assert d.action is Action.ROTATE


def test_a_running_record_whose_key_is_not_active_is_superseded() -> None:
    d = decide(policy(4), State(active=3, served=3, running=running(4, to=2)))
    assert d.action is Action.ROTATE


def test_an_interrupted_manual_rotation_is_finished_first() -> None:
    d = decide(policy(5), State(active=2, served=4, running=running(None, kind="manual")))
    assert d.action is Action.RESUME


def test_manual_requests_rotate_or_resume_and_use_no_version() -> None:
    assert decide(Request("manual"), State(2, 7, None)).action is Action.ROTATE
    r = running(8)
    assert decide(Request("manual"), State(2, 7, r)) == decide(Request("manual"),
                                                               State(2, 7, r))
    assert decide(Request("manual"), State(2, 7, r)).action is Action.RESUME


def test_sweeps_move_rows_under_retired_keys_and_wait_for_a_running_rotation() -> None:
    assert decide(Request("sweep"), State(2, 2, None, retired_rows=0)).action is Action.NONE
    assert decide(Request("sweep"), State(2, 2, None, retired_rows=5)).action is Action.SWEEP
    d = decide(Request("sweep"), State(2, 2, running(3), retired_rows=5))
    assert d.action is Action.NONE and d.reason == "RotationPending"
    # a served policy version with rows under retired keys also sweeps
    d = decide(policy(2), State(2, 2, None, retired_rows=3))
    assert d.action is Action.SWEEP and d.reason == "RowsUnderRetiredKey"


def test_paused_stops_only_what_would_act() -> None:
    d = decide(policy(5, paused=True), State(2, 4, None))
    assert d.action is Action.PAUSED and "rotating" in d.message
    d = decide(policy(4, paused=True), State(2, 4, running(4)))
    assert d.action is Action.PAUSED
    # nothing to do: paused changes nothing
    assert decide(policy(4, paused=True), State(2, 4, None)).action is Action.NONE
    assert decide(policy(3, paused=True), State(2, 4, None)).action is Action.BEHIND


def test_decide_is_pure_and_deterministic() -> None:
    states = [State(a, s, r, n) for a, s, r, n in itertools.product(
        (1, 2), (None, 1, 3), (None, running(3), running(None, kind="sweep")), (None, 0, 4))]
    requests = [policy(v, p) for v in (1, 3, 5) for p in (False, True)] + [
        Request("manual"), Request("sweep")]
    for state, request in itertools.product(states, requests):
        assert decide(request, state) == decide(request, state)


def test_wants_rotation() -> None:
    assert wants_rotation(3, 2)
    assert not wants_rotation(2, 2)
    assert not wants_rotation(2, None)
    assert not wants_rotation(None, 1)


# -- the policy's own schedule and the end of a key's life (issue #10) ------------------------
def test_a_schedule_is_due_on_the_injected_clock_not_before() -> None:
    from datetime import UTC, datetime, timedelta

    made = datetime(2026, 1, 1, tzinfo=UTC)
    state = State(2, 3, None, active_created=made)
    age = timedelta(days=90)
    before = decide(Request("policy", 3, now=made + age - timedelta(seconds=1),
                            max_key_age=age), state)
    due = decide(Request("policy", 3, now=made + age, max_key_age=age), state)
    assert before.action is Action.NONE
    assert (due.action, due.kind, due.reason) == (Action.ROTATE, "scheduled",
                                                 "ScheduledRotation")
    # a newer spec.version wins over the schedule (one rotation, recorded as the policy's)
    bump = decide(Request("policy", 4, now=made + age, max_key_age=age), state)
    assert (bump.action, bump.kind) == (Action.ROTATE, "policy")
    paused = decide(Request("policy", 3, paused=True, now=made + age, max_key_age=age), state)
    assert paused.action is Action.PAUSED


def test_usage_bound_warns_and_rotates_only_when_allowed() -> None:
    state = State(2, 3, None, active_encryptions=850, rows=100)
    assert decide(Request("policy", 3, max_encryptions=1000), state).action is Action.NONE
    d = decide(Request("policy", 3, max_encryptions=1000, rotate_on_usage=True), state)
    assert (d.action, d.reason, d.kind) == (Action.ROTATE, "UsageBound", "scheduled")
    low = State(2, 3, None, active_encryptions=700, rows=100)
    assert decide(Request("policy", 3, max_encryptions=1000, rotate_on_usage=True),
                  low).action is Action.NONE
    # with rows near the bound a fresh key would be near it at once: no rotation loop
    full = State(2, 3, None, active_encryptions=850, rows=600)
    assert decide(Request("policy", 3, max_encryptions=1000, rotate_on_usage=True),
                  full).action is Action.NONE
    unknown = State(2, 3, None, active_encryptions=850)
    assert decide(Request("policy", 3, max_encryptions=1000, rotate_on_usage=True),
                  unknown).action is Action.NONE


def test_a_bump_adopts_a_running_scheduled_or_manual_rotation() -> None:
    from rotation_operator.policy.decisions import adopts

    assert adopts(running(None, kind="scheduled"), 5, 4)
    assert adopts(running(None, kind="manual"), 5, 4)
    assert not adopts(running(5, kind="policy"), 6, 4)
    assert not adopts(running(None, kind="scheduled"), 4, 4)  # not a bump


def test_the_retention_plan_is_the_dry_run() -> None:
    from datetime import UTC, datetime, timedelta

    from rotation_operator.policy.decisions import KeyView, Retention, retention_plan

    t = datetime(2026, 6, 1, tzinfo=UTC)
    ret = Retention(timedelta(days=30), timedelta(days=7))
    keys = [KeyView(1, "retired", 0, zero_rows_since=t - timedelta(days=31)),
            KeyView(2, "retired", 0, zero_rows_since=t - timedelta(days=3)),
            KeyView(3, "retired", 5, zero_rows_since=None),
            KeyView(4, "disabled", 0, disabled_at=t - timedelta(days=8),
                    destroy_after=t - timedelta(days=1)),
            KeyView(5, "disabled", 2, disabled_at=t - timedelta(days=9)),
            KeyView(6, "active", 100)]
    plan = [(s.version, s.action, s.ready) for s in retention_plan(keys, ret, t)]
    assert plan == [(1, "disable", True), (2, "disable", False), (4, "destroy", True)]
    # without a retention policy nothing happens by itself, not even a stored destroy date
    assert retention_plan(keys, None, t) == []


def test_durations_beyond_a_century_are_a_clear_config_error() -> None:
    import pytest

    from rotation_operator.errors import ConfigError
    from rotation_operator.policy.config import RotationOptions, key_age, parse_duration

    assert parse_duration("36500d", "x").days == 36500
    for text in ("36501d", "9999999999d", "4000000d"):
        with pytest.raises(ConfigError, match="longer than 100 years"):
            key_age(text)
    with pytest.raises(ConfigError, match="maxReplicationLag"):
        RotationOptions(max_replication_lag=0)
    with pytest.raises(ConfigError, match="maxRowsPerSecond"):
        RotationOptions(max_rows_per_second=-1)
    assert RotationOptions(max_rows_per_second=2000, batch_size=5000).effective_batch_size \
        == 500
    assert RotationOptions(max_rows_per_second=40, batch_size=5000).effective_batch_size == 100


def test_without_retention_nothing_is_ever_planned_even_for_a_disabled_key() -> None:
    from datetime import UTC, datetime, timedelta

    from rotation_operator.policy.decisions import KeyView, Retention, retention_plan

    t = datetime(2026, 1, 1, tzinfo=UTC)
    disabled = KeyView(1, "disabled", 0, t, t, t + timedelta(days=7))
    assert retention_plan([disabled], None, t + timedelta(days=400)) == []
    slow = Retention(timedelta(days=10), timedelta(days=30))
    (step,) = retention_plan([disabled], slow, t + timedelta(days=8))
    assert (step.action, step.due, step.ready) == ("destroy", t + timedelta(days=30), False)
