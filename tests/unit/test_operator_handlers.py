"""The operator's handler boundary and settings, without a cluster.

``kube.patch_status`` is replaced by a recorder, so what the boundary would write to the
status subresource (and which Kopf retry it asks for) is checked directly.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any, cast

import kopf
import psycopg
import pytest
import urllib3

from rotation_operator.errors import (
    AccessDenied,
    ConfigError,
    DatabaseUnavailable,
    KekMismatchError,
    SecretError,
)
from rotation_operator.operator import handlers, kube, settings, spec


class Recorder:
    def __init__(self) -> None:
        self.patches: list[dict[str, Any]] = []
        self.events: list[tuple[str, str, str]] = []

    def info(self, reason: str, message: str) -> None:
        self.events.append(("Normal", reason, message))

    def warn(self, reason: str, message: str) -> None:
        self.events.append(("Warning", reason, message))


@pytest.fixture
def rec(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    r = Recorder()
    monkeypatch.setattr(kube, "patch_status",
                        lambda ns, name, status, rv=None: r.patches.append(status))
    monkeypatch.setattr(settings, "current", settings.OperatorSettings())
    yield r


def _policy(generation: int = 3, conditions: list[dict[str, Any]] | None = None
            ) -> spec.Policy:
    return spec.Policy("ns", "app", generation, {"version": 2},
                           {"conditions": conditions or []})


def _cond(patch: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in patch["conditions"] if c["type"] == type_)


def test_retryable_error_becomes_temporary_error_with_its_delay(rec: Recorder) -> None:
    with pytest.raises(kopf.TemporaryError) as info, \
            handlers.boundary(_policy(), rec):  # type: ignore[arg-type]
        raise SecretError("KEK: Secret ns/app-kek does not exist")
    assert info.value.delay == 2.0  # the first retry comes soon: a fix is picked up fast
    assert str(info.value).startswith("SecretMissing: KEK: Secret ns/app-kek")
    (patch,) = rec.patches
    ready = _cond(patch, "Ready")
    assert (ready["status"], ready["reason"], ready["observedGeneration"]) == (
        "False", "SecretMissing", 3)
    assert _cond(patch, "Degraded")["status"] == "True"
    assert patch["observedGeneration"] == 3
    assert rec.events == [("Warning", "SecretMissing", "KEK: Secret ns/app-kek does not exist")]


def test_retries_back_off_up_to_the_errors_own_delay(rec: Recorder) -> None:
    exc = SecretError("missing")
    assert [handlers.retry_delay(exc, r) for r in range(6)] == [2, 4, 8, 16, 30, 30]
    assert SecretError.retry_delay == 30
    with pytest.raises(kopf.TemporaryError) as info, \
            handlers.boundary(_policy(), rec, retry=9):  # type: ignore[arg-type]
        raise SecretError("KEK: Secret ns/app-kek does not exist")
    assert info.value.delay == SecretError.retry_delay


def test_retry_delay_is_capped_by_the_setting(rec: Recorder,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings, "current", settings.OperatorSettings(max_retry_delay=1.5))
    with pytest.raises(kopf.TemporaryError) as info, \
            handlers.boundary(_policy(), rec, retry=9):  # type: ignore[arg-type]
        raise KekMismatchError("the KEK does not match")
    assert info.value.delay == 1.5
    with pytest.raises(kopf.TemporaryError) as info, \
            handlers.boundary(_policy(), rec):  # type: ignore[arg-type]
        raise DatabaseUnavailable("down")
    assert info.value.delay == 1.5


def test_permanent_error_for_a_bad_spec(rec: Recorder) -> None:
    with pytest.raises(kopf.PermanentError), \
            handlers.boundary(_policy(), rec):  # type: ignore[arg-type]
        raise ConfigError("spec.version must be a positive integer")
    assert _cond(rec.patches[0], "Ready")["reason"] == "InvalidSpec"


ROW_DETAIL = "DETAIL:  Failing row contains (7, app-secret-7, 1)."


@pytest.mark.parametrize(("raised", "reason"), [
    (psycopg.errors.CheckViolation(
        'new row for relation "secrets" violates check constraint "c"\n' + ROW_DETAIL),
     "DatabaseRejected"),
    (psycopg.errors.DeadlockDetected("deadlock detected\n" + ROW_DETAIL), "DatabaseError"),
    (psycopg.errors.InsufficientPrivilege("permission denied for table secrets"),
     "DatabasePermissionDenied"),
    (psycopg.errors.LockNotAvailable("canceling statement due to lock timeout"),
     "LockTimeout"),
    (urllib3.exceptions.ReadTimeoutError(urllib3.HTTPConnectionPool("127.0.0.1"), "/api",
                                         "read timed out"),
     "KubernetesUnavailable"),
    (ZeroDivisionError("division by zero"), "InternalError"),
], ids=["check-violation", "deadlock", "permission", "lock-timeout", "api-timeout", "bug"])
def test_every_exception_becomes_a_condition_and_an_event(rec: Recorder, raised: Exception,
                                                          reason: str) -> None:
    """Finding 6: errors outside the package's hierarchy reach status and Events too, with
    a sanitized message: never psycopg's DETAIL line (it may quote a whole row)."""
    with pytest.raises(kopf.TemporaryError), \
            handlers.boundary(_policy(), rec):  # type: ignore[arg-type]
        raise raised
    ready = _cond(rec.patches[0], "Ready")
    assert (ready["status"], ready["reason"]) == ("False", reason)
    assert [(t, r) for t, r, _ in rec.events] == [("Warning", reason)]
    for text in (ready["message"], rec.events[0][2], _cond(rec.patches[0], "Degraded")["message"]):
        assert "DETAIL" not in text and "app-secret" not in text and "Failing row" not in text


def test_failure_during_a_rotation_marks_it_failed(rec: Recorder) -> None:
    rotating = [{"type": "Rotating", "status": "True", "reason": "RotationRunning",
                 "message": "m", "lastTransitionTime": "2024-01-01T00:00:00Z",
                 "observedGeneration": 3}]
    with pytest.raises(kopf.TemporaryError), \
            handlers.boundary(_policy(conditions=rotating), rec):  # type: ignore[arg-type]
        raise DatabaseUnavailable("cannot connect to PostgreSQL: refused")
    cond = _cond(rec.patches[0], "Rotating")
    assert (cond["status"], cond["reason"]) == ("False", "RotationFailed")


def test_a_failing_status_write_does_not_hide_the_error(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    def denied(*_: Any) -> None:
        raise AccessDenied("may not patch")
    monkeypatch.setattr(kube, "patch_status", denied)
    r = Recorder()
    with pytest.raises(kopf.TemporaryError, match="SecretMissing"), \
            handlers.boundary(_policy(), r):  # type: ignore[arg-type]
        raise SecretError("gone")
    assert r.events[0][1] == "SecretMissing"


def test_reconcile_is_one_handler_for_create_update_and_resume() -> None:
    """One id: Kopf deduplicates it, so a restart after a spec change runs it once."""
    registry = kopf.get_default_registry()
    found = [h for h in registry._changing.get_all_handlers() if h.fn is handlers.reconcile]
    assert {h.id for h in found} == {"reconcile"}
    assert sorted(str(h.reason) for h in found) == sorted(["None", "create", "update"])


def _diff(*fields: tuple[str, ...]) -> kopf.Diff:
    return kopf.Diff([kopf.DiffItem(kopf.DiffOperation.CHANGE, f, 1, 2) for f in fields])


def test_only_spec_changes_trigger_reconcile() -> None:
    assert handlers._spec_changed(_diff(("spec", "version")))
    assert handlers._spec_changed(_diff(("metadata", "labels", "a"), ("spec",)))
    assert handlers._spec_changed(_diff(()))  # the whole object
    assert not handlers._spec_changed(_diff(("metadata", "labels", "a")))


@pytest.mark.parametrize(("namespaces", "disabled"), [
    ((), False), (("a",), True), (("a", "b"), True), (("a-*",), False), (("!b",), False)])
def test_scanning_is_off_for_exact_namespaces(monkeypatch: pytest.MonkeyPatch,
                                             namespaces: tuple[str, ...],
                                             disabled: bool) -> None:
    """Watching named namespaces must not need cluster-wide list/watch on namespaces."""
    monkeypatch.setattr(settings, "current", settings.OperatorSettings(namespaces=namespaces))
    s = kopf.OperatorSettings()
    cast(Any, handlers.configure)(settings=s)
    assert s.scanning.disabled is disabled


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    settings.add_run_arguments(p)
    return p.parse_args(list(argv))


def test_settings_from_flags_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("WATCH_NAMESPACES", "REFRESH_INTERVAL", "PROGRESS_INTERVAL",
                "MAX_RETRY_DELAY", "LIVENESS_ENDPOINT", "METRICS_PORT", "LOG_FORMAT"):
        monkeypatch.delenv(var, raising=False)
    s = settings.from_args(_args())
    assert (s.namespaces, s.refresh_interval, s.progress_interval, s.max_retry_delay) == (
        (), 60.0, 2.0, None)
    s = settings.from_args(_args("-n", "a", "-n", "b", "--progress-interval", "0",
                                 "--refresh-interval", "5", "--max-retry-delay", "3"))
    assert (s.namespaces, s.refresh_interval, s.progress_interval, s.max_retry_delay) == (
        ("a", "b"), 5.0, 0.0, 3.0)  # 0 is a value, not "unset"
    monkeypatch.setenv("WATCH_NAMESPACES", "x, y")
    monkeypatch.setenv("MAX_RETRY_DELAY", "7")
    s = settings.from_args(_args())
    assert (s.namespaces, s.max_retry_delay) == (("x", "y"), 7.0)


@pytest.mark.parametrize("argv", [["--refresh-interval", "0"], ["--progress-interval", "-1"],
                                  ["--max-retry-delay", "0"]])
def test_settings_reject_nonsense(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        _args(*argv)
