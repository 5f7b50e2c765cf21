"""The Secrets a policy names, read when a step needs them: the DSN, the KEK (or its HSM
PIN) and the previous KEKs.

Each read goes through :mod:`.kube` (request timeouts, errors mapped to the package's);
parsing a KEK is the crypto layer's (:mod:`rotation_operator.crypto.sources`).  Nothing
read here is logged or cached.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rotation_operator.crypto import sources
from rotation_operator.crypto.kek import Kek
from rotation_operator.errors import (
    ConfigError,
)
from rotation_operator.operator import kube
from rotation_operator.operator.spec import Policy

log = logging.getLogger(__name__)


@dataclass
class Keks:
    """The policy's KEKs as read now: the current one, the previous ones, and the sources
    whose bytes look like text (a weak, passphrase-like KEK)."""

    current: Kek
    previous: list[Kek]
    weak: list[str]

    @property
    def all(self) -> list[Kek]:
        return [self.current, *self.previous]

    def close(self) -> None:
        for kek in self.all:
            close = getattr(kek, "close", None)
            if close is not None:
                close()


def read_keks(policy: Policy) -> Keks:
    """``spec.kek`` and ``spec.previousKeks``, from Secrets or PKCS#11 tokens."""
    spec = policy.spec.get("kek") or {}
    weak: list[str] = []
    current = _kek(policy, spec, "spec.kek", weak)
    previous = [_kek(policy, item, f"spec.previousKeks[{i}]", weak)
                for i, item in enumerate(policy.spec.get("previousKeks") or [])]
    return Keks(current, previous, weak)


def _kek(policy: Policy, source: Mapping[str, Any], where: str, weak: list[str]) -> Kek:
    ns = policy.namespace
    ref = source.get("secretRef") or {}
    if ref.get("name"):
        key = ref.get("key", "kek")
        raw = kube.read_secret(ns, ref["name"], key, "KEK")
        return sources.secret_kek(raw, f"Secret {ns}/{ref['name']} key {key}",
                                  on_weak=weak.append)
    hsm = source.get("pkcs11") or {}
    pin_ref = hsm.get("pinSecretRef") or {}
    if not (hsm.get("module") and hsm.get("tokenLabel") and hsm.get("keyLabel")
            and pin_ref.get("name")):
        raise ConfigError(f"{where} needs secretRef.name, or pkcs11 with module, tokenLabel, "
                          "keyLabel and pinSecretRef.name")
    pin = kube.read_secret(ns, pin_ref["name"], pin_ref.get("key", "pin"), "HSM PIN")
    return sources.pkcs11_kek(hsm["module"], hsm["tokenLabel"], hsm["keyLabel"], pin)


def referenced_secrets(policy: Policy) -> list[str]:
    """Names of the Secrets the policy reads: the DSN's, the KEK's (or its HSM PIN's), and
    those of ``previousKeks``, without duplicates."""
    names = [((policy.spec.get("database") or {}).get("secretRef") or {}).get("name")]
    for source in [policy.spec.get("kek") or {}, *(policy.spec.get("previousKeks") or [])]:
        names.append((source.get("secretRef") or {}).get("name"))
        names.append(((source.get("pkcs11") or {}).get("pinSecretRef") or {}).get("name"))
    return sorted({n for n in names if isinstance(n, str) and n})


def read_secrets(policy: Policy) -> tuple[str, Keks]:
    db_ref = (policy.spec.get("database") or {}).get("secretRef") or {}
    if not db_ref.get("name"):
        raise ConfigError("spec.database.secretRef.name is required")
    keks = read_keks(policy)  # the KEK first: its absence is the likelier mistake
    return read_dsn(policy), keks


def read_dsn(policy: Policy) -> str:
    db_ref = (policy.spec.get("database") or {}).get("secretRef") or {}
    db_key = db_ref.get("key", "dsn")
    dsn = kube.read_secret(policy.namespace, db_ref.get("name", ""), db_key, "database DSN")
    try:
        return dsn.decode().strip()
    except UnicodeDecodeError:
        raise ConfigError(f"Secret {policy.namespace}/{db_ref.get('name')} key {db_key} is not "
                          "UTF-8 text") from None
