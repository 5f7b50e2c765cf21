"""The Lease elector's rules without a cluster (the e2e tests prove it on the real API
server): expiry judged on this replica's clock, conditional updates, a renew deadline that
a pause on either clock ends, request timeouts on every call, and stopping."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from rotation_operator.operator import leader


def _meta(lease: client.V1Lease) -> client.V1ObjectMeta:
    assert lease.metadata is not None
    return lease.metadata


def _spec(lease: client.V1Lease) -> client.V1LeaseSpec:
    assert lease.spec is not None
    return lease.spec


class FakeLeases:
    """One Lease with resourceVersion semantics; records each call's request timeout."""

    def __init__(self) -> None:
        self.lease: client.V1Lease | None = None
        self.version = 0
        self.timeouts: list[Any] = []
        self.fail: Exception | None = None

    def _check(self, kwargs: dict[str, Any]) -> None:
        self.timeouts.append(kwargs.get("_request_timeout"))
        if self.fail is not None:
            raise self.fail

    def read_namespaced_lease(self, name: str, ns: str, **kw: Any) -> client.V1Lease:
        self._check(kw)
        if self.lease is None:
            raise ApiException(status=404)
        return copy.deepcopy(self.lease)

    def create_namespaced_lease(self, ns: str, body: client.V1Lease, **kw: Any) -> None:
        self._check(kw)
        if self.lease is not None:
            raise ApiException(status=409)
        self._store(body)

    def replace_namespaced_lease(self, name: str, ns: str, body: client.V1Lease,
                                 **kw: Any) -> None:
        self._check(kw)
        assert self.lease is not None
        if _meta(body).resource_version != _meta(self.lease).resource_version:
            raise ApiException(status=409)
        self._store(body)

    def _store(self, body: client.V1Lease) -> None:
        self.version += 1
        body = copy.deepcopy(body)
        _meta(body).resource_version = str(self.version)
        self.lease = body


class Clock:
    def __init__(self) -> None:
        self.mono = 100.0
        self.boot = 1000.0
        self.wall = 1.7e9

    def advance(self, s: float, *, boot: bool = True, wall: bool = True) -> None:
        self.mono += s
        self.boot += s if boot else 0
        self.wall += s if wall else 0


CFG = leader.LeaseConfig("ns", lease_duration=15, renew_deadline=10, retry_period=2)


def _elector(api: FakeLeases, clock: Clock, identity: str) -> leader.LeaderElector:
    return leader.LeaderElector(leader.LeaseConfig(**{**CFG.__dict__, "identity": identity}),
                                api=api, clock=lambda: clock.mono,
                                deadline_clocks=lambda: (clock.boot, clock.wall))


@pytest.fixture(autouse=True)
def _reset() -> Any:
    yield
    leader._current = None
    leader._stopping.clear()


def test_one_candidate_wins_and_the_other_waits_out_the_lease() -> None:
    api, clock = FakeLeases(), Clock()
    a, b = _elector(api, clock, "a"), _elector(api, clock, "b")
    assert a._try() is True
    assert b._try() is False  # held, just renewed
    clock.advance(14)
    assert b._try() is False  # b has seen the record for 14 s < 15 s
    clock.advance(2)
    assert b._try() is True  # unrenewed for 16 s as b saw it: b takes it
    assert api.lease is not None and _spec(api.lease).holder_identity == "b"
    assert _spec(api.lease).lease_transitions == 1
    assert a._try() is False  # a now sees b's fresh renewal


def test_a_stale_read_loses_the_conditional_update() -> None:
    api, clock = FakeLeases(), Clock()
    a, b = _elector(api, clock, "a"), _elector(api, clock, "b")
    assert a._try()
    assert b._try() is False  # b starts watching the record
    clock.advance(20)
    stale = api.read_namespaced_lease("rotation-operator", "ns")
    assert b._try()  # b took it meanwhile
    _spec(stale).holder_identity = "a"
    with pytest.raises(ApiException) as info:
        api.replace_namespaced_lease("rotation-operator", "ns", stale)
    assert info.value.status == 409


def test_every_call_has_a_request_timeout_shorter_than_the_renew_deadline() -> None:
    api, clock = FakeLeases(), Clock()
    a = _elector(api, clock, "a")
    a._try()
    a._try()
    a.release()
    assert api.timeouts and all(t is not None and 0 < t < CFG.renew_deadline
                                for t in api.timeouts), api.timeouts


@pytest.mark.parametrize("pause", [
    {"boot": True, "wall": True},    # both clocks see it (a plain stall)
    {"boot": True, "wall": False},   # a suspend: CLOCK_BOOTTIME counts it
    {"boot": False, "wall": True},   # a VM pause that only the wall clock catches up on
])
def test_a_pause_on_either_clock_ends_the_right_to_act(pause: dict[str, bool]) -> None:
    api, clock = FakeLeases(), Clock()
    a = _elector(api, clock, "a")
    assert a._try()
    leader._current = a
    assert leader.may_act()
    clock.advance(9, **pause)
    assert leader.may_act()
    clock.advance(2, **pause)
    assert not leader.may_act()


def test_a_failing_renewal_keeps_the_right_only_until_the_deadline() -> None:
    api, clock = FakeLeases(), Clock()
    a = _elector(api, clock, "a")
    assert a._try()
    api.fail = TimeoutError()
    clock.advance(5)
    with pytest.raises(TimeoutError):
        a._try()
    assert a.valid()
    clock.advance(6)
    assert not a.valid()


def test_stopping_ends_the_right_to_act_at_once() -> None:
    assert leader.may_act()  # standalone: acts
    leader.stop_acting()
    assert not leader.may_act()


def test_release_hands_the_lease_over() -> None:
    api, clock = FakeLeases(), Clock()
    a, b = _elector(api, clock, "a"), _elector(api, clock, "b")
    assert a._try()
    assert b._try() is False
    a.release()
    assert not a.valid()
    assert b._try() is True  # no wait for the lease duration


def test_a_rotation_stops_between_batches_once_the_replica_may_not_act() -> None:
    from rotation_operator.errors import NotLeading
    from rotation_operator.operator import spec
    from rotation_operator.operator.control import Control

    control = Control(spec.Policy("ns", "app", 1, {"version": 2}, {}), interval=3600)
    leader.stop_acting()
    with pytest.raises(NotLeading):
        control()  # every call checks, whatever the interval of the policy look-ups


def test_not_leading_at_the_boundary_writes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    import kopf

    from rotation_operator.errors import NotLeading
    from rotation_operator.operator import handlers, spec, workflow

    failed: list[object] = []
    monkeypatch.setattr(workflow, "fail", lambda *a, **k: failed.append(a))
    policy = spec.Policy("ns", "app", 1, {"version": 2}, {})
    with pytest.raises(kopf.TemporaryError), \
            handlers.boundary(policy, handlers._Events({})):  # type: ignore[arg-type]
        raise NotLeading("stopping")
    assert failed == []
