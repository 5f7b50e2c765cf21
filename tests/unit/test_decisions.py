"""The one decision function: what a request means given the database's records."""

from __future__ import annotations

import itertools

import pytest

from rotation_operator.decisions import (
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
