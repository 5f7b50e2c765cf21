"""decide(): the operator's pure "should we act?" function, case by case."""

from __future__ import annotations

import pytest

from rotation_operator.operator.decisions import Action, decide, wants_rotation


@pytest.mark.parametrize(("desired", "served"), [(1, 1), (4, 4), (1, 3), (2, 5)])
def test_none_when_the_database_already_served_the_version(desired: int, served: int) -> None:
    d = decide(desired, served, None)
    assert d.action is Action.NONE
    assert d.reason == "KeysReady"
    assert f"version {desired} is served" in d.message
    # A lower spec.version than served (a re-created CR with an old manifest) never
    # rotates, and says why.
    assert ("already served" in d.message) == (desired < served)


@pytest.mark.parametrize(("desired", "served"), [(2, 1), (7, 3), (1, None), (5, None)])
def test_rotate_when_spec_is_newer(desired: int, served: int | None) -> None:
    d = decide(desired, served, None)
    assert d.action is Action.ROTATE
    assert d.reason == "RotationRequested"
    assert f"spec.version {desired} is newer than" in d.message
    assert ("nothing" if served is None else f"version {served}") in d.message


def test_resume_an_interrupted_rotation_of_the_same_version() -> None:
    d = decide(3, 2, 3)
    assert d.action is Action.RESUME
    assert d.reason == "RotationResumed"
    assert "version 3" in d.message


def test_resume_wins_even_without_a_served_version() -> None:
    assert decide(2, None, 2).action is Action.RESUME


def test_a_running_rotation_for_another_version_is_not_resumed() -> None:
    # The spec moved on past the interrupted rotation: rotate to the new version (the
    # engine supersedes the running record).
    d = decide(4, 2, 3)
    assert d.action is Action.ROTATE
    # An interrupted rotation for a version the spec no longer asks for, with the spec
    # already served, does nothing.
    assert decide(2, 2, 3).action is Action.NONE


def test_decide_is_pure_and_deterministic() -> None:
    assert decide(5, 4, None) == decide(5, 4, None)


@pytest.mark.parametrize(("desired", "observed", "expected"), [
    (2, 1, True), (1, 1, False), (1, 2, False), (None, 1, False), (2, None, False),
    (None, None, False),
])
def test_wants_rotation(desired: int | None, observed: int | None, expected: bool) -> None:
    assert wants_rotation(desired, observed) is expected
