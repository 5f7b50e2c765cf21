"""The operator's KEKs: Secret bytes read through kube, then parsed by crypto.sources."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from rotation_operator.crypto import codec
from rotation_operator.errors import ConfigError, KekFormatError
from rotation_operator.operator import kube, secrets
from rotation_operator.operator.spec import Policy
from rotation_operator.policy.config import MIN_RETENTION_DAYS

KEY, OLD = bytes(range(32)), b"correct horse battery staple 123"
SECRETS = {("app-kek", "kek"): base64.b64encode(KEY), ("old-kek", "key"): OLD,
           ("bad-kek", "kek"): b"short", ("hsm-pin", "pin"): b" 1234\n"}


@pytest.fixture(autouse=True)
def fake_secrets(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, str, str]]:
    reads: list[tuple[str, str, str, str]] = []

    def read_secret(namespace: str, name: str, key: str, what: str) -> bytes:
        reads.append((namespace, name, key, what))
        return SECRETS[(name, key)]

    monkeypatch.setattr(kube, "read_secret", read_secret)
    return reads


def policy(**spec: Any) -> Policy:
    return Policy("ns", "app", 1, spec, {})


def test_current_then_previous_keks_from_secrets(
        fake_secrets: list[tuple[str, str, str, str]]) -> None:
    keks = secrets.read_keks(policy(kek={"secretRef": {"name": "app-kek"}},
                                     previousKeks=[{"secretRef": {"name": "old-kek",
                                                                  "key": "key"}}]))
    assert [k.fingerprint for k in keks.all] == [codec.kek_fingerprint(KEY),
                                                 codec.kek_fingerprint(OLD)]
    assert keks.current.describe() == "Secret ns/app-kek key kek"
    assert keks.weak == ["Secret ns/old-kek key key"]
    assert fake_secrets == [("ns", "app-kek", "kek", "KEK"), ("ns", "old-kek", "key", "KEK")]


def test_a_malformed_secret_names_it_and_the_length() -> None:
    with pytest.raises(KekFormatError, match=r"^Secret ns/bad-kek key kek: .*found 5 bytes"):
        secrets.read_keks(policy(kek={"secretRef": {"name": "bad-kek"}}))


@pytest.mark.parametrize("source", [{}, {"pkcs11": {"module": "/m.so", "tokenLabel": "t",
                                                    "keyLabel": "k"}}])
def test_an_incomplete_source_says_what_it_needs(source: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"^spec.kek needs secretRef.name, or pkcs11 with"):
        secrets.read_keks(policy(kek=source))


def test_a_pkcs11_kek_reads_its_pin_secret_then_the_module(
        fake_secrets: list[tuple[str, str, str, str]]) -> None:
    from rotation_operator.crypto.pkcs11 import HSMModuleMissing

    hsm = {"module": "/nowhere/lib.so", "tokenLabel": "t", "keyLabel": "k",
           "pinSecretRef": {"name": "hsm-pin"}}
    with pytest.raises(HSMModuleMissing, match=r"/nowhere/lib\.so"):
        secrets.read_keks(policy(kek={"pkcs11": hsm}))
    assert fake_secrets == [("ns", "hsm-pin", "pin", "HSM PIN")]


def test_the_policy_retention_is_the_shared_rule() -> None:
    ret = policy(retention={"disableAfterDays": 30}).retention()
    assert ret is not None and ret.destroy_after.days == MIN_RETENTION_DAYS
    assert policy().retention() is None
    with pytest.raises(ConfigError, match=r"^retention.destroyAfterDays 3 is below 7 days: a "
                                          "key destroyed early cannot be brought back$"):
        policy(retention={"destroyAfterDays": 3}).retention()
    with pytest.raises(ConfigError, match=r"^retention.disableAfterDays 40000 is more than "
                                          "36500 days$"):
        policy(retention={"disableAfterDays": 40000}).retention()


def test_spec_legacy_reads_is_closed_by_default_and_checked() -> None:
    from rotation_operator.errors import ConfigError

    assert policy().legacy_reads == "closed"
    assert policy(legacy={"reads": "Open"}).legacy_reads == "open"
    assert policy(legacy={"reads": "Closed"}).legacy_reads == "closed"
    with pytest.raises(ConfigError, match=r"spec\.legacy\.reads 'open' is not Open or Closed"):
        _ = policy(legacy={"reads": "open"}).legacy_reads
