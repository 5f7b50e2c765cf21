"""config.py: identifiers from a CR or the command line are untrusted."""

from __future__ import annotations

from typing import Any

import pytest

from rotation_operator.errors import ConfigError
from rotation_operator.policy.config import (
    MAX_BATCH,
    MIN_BATCH,
    RotationOptions,
    StoreConfig,
    Target,
    targets_from_spec,
)

HOSTILE = [
    "x; DROP TABLE y",
    'a"b',
    "a'b",
    "ñame",
    "таблица",
    "表",
    "a" * 64,
    "",
    "1abc",
    "a b",
    "a-b",
    "a.b",
    "a\nb",
    "a\x00b",
    "secrets--",
    "x/*",
    "$1",
    " secrets",
    "secrets ",
    "ﬁ",  # NFKC-folds to "fi"; must not be accepted either
]


@pytest.mark.parametrize("name", HOSTILE, ids=repr)
@pytest.mark.parametrize(
    ("field", "build", "named"),
    [
        ("table", lambda n: Target(n), "target table"),
        ("id_column", lambda n: Target("t", id_column=n), "idColumn of table t"),
        ("value_column", lambda n: Target("t", value_column=n), "valueColumn of table t"),
        ("key_id_column", lambda n: Target("t", key_id_column=n), "keyIdColumn of table t"),
        ("schema", lambda n: Target("t", schema=n), "schema of table t"),
        ("keys_table", lambda n: StoreConfig([Target("t")], keys_table=n), "keysTable"),
        ("keys_schema", lambda n: StoreConfig([Target("t")], schema=n), "keys schema"),
    ],
)
def test_hostile_identifiers_are_refused_naming_the_field(name: str, field: str,
                                                          build: Any, named: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(name)
    assert str(info.value).startswith(named + " ")
    assert info.value.reason == "InvalidSpec" and not info.value.retryable


@pytest.mark.parametrize("value", [None, 5, b"secrets", ["secrets"]])
def test_non_string_identifiers_are_refused(value: Any) -> None:
    with pytest.raises(ConfigError, match="target table"):
        Target(value)


@pytest.mark.parametrize("name", ["secrets", "Select", "user", "_x", "a1", "A" * 63, "order"])
def test_plain_identifiers_are_accepted(name: str) -> None:
    t = Target(name, id_column=name + "_id" if len(name) < 60 else "id")
    assert t.table == name


def test_length_limits() -> None:
    Target("a" * 63)
    with pytest.raises(ConfigError, match="at most 63"):
        Target("a" * 64)
    StoreConfig([Target("t")], keys_table="k" * 48)
    with pytest.raises(ConfigError, match=r"keysTable .* at most 48"):
        StoreConfig([Target("t")], keys_table="k" * 49)


def test_columns_must_differ() -> None:
    with pytest.raises(ConfigError, match="must differ"):
        Target("t", id_column="v", value_column="v")


def test_store_config_rules() -> None:
    with pytest.raises(ConfigError, match="at least one target"):
        StoreConfig([])
    with pytest.raises(ConfigError, match="listed twice"):
        StoreConfig([Target("t"), Target("t")])
    StoreConfig([Target("t"), Target("t", schema="other")])
    for own in ("encryption_keys", "encryption_keys_audit", "encryption_keys_rotations"):
        with pytest.raises(ConfigError, match="operator's own tables"):
            StoreConfig([Target(own)])
    cfg = StoreConfig([Target("t")], keys_table="keys", schema="ops")
    assert (cfg.audit_table, cfg.rotations_table, cfg.qualified_keys) == (
        "keys_audit", "keys_rotations", "ops.keys")


def test_target_from_spec() -> None:
    t = Target.from_spec({"table": "creds", "idColumn": "cid", "valueColumn": "blob",
                          "keyIdColumn": "kv", "schema": "app"})
    assert (t.table, t.id_column, t.value_column, t.key_id_column, t.schema) == (
        "creds", "cid", "blob", "kv", "app")
    assert t.name == "app.creds"
    assert targets_from_spec([{"table": "a"}, {"table": "b"}]) == [Target("a"), Target("b")]
    with pytest.raises(ConfigError, match="at least a table"):
        Target.from_spec({"idColumn": "x"})
    with pytest.raises(ConfigError, match="idColumn of table creds"):
        Target.from_spec({"table": "creds", "idColumn": "x; DROP TABLE y"})


def test_target_parse() -> None:
    assert Target.parse("secrets") == Target("secrets")
    assert Target.parse("app.secrets") == Target("secrets", schema="app")
    assert Target.parse("app.creds:cid:blob:kv") == Target("creds", "cid", "blob", "kv",
                                                             schema="app")
    with pytest.raises(ConfigError, match="expected"):
        Target.parse("creds:a:b")
    with pytest.raises(ConfigError, match="target table"):
        Target.parse("x; DROP TABLE y")
    with pytest.raises(ConfigError, match="keyIdColumn of table creds"):
        Target.parse("creds:id:value:k; DROP TABLE y")
    with pytest.raises(ConfigError, match="schema of table"):
        Target.parse('a"b.creds')


@pytest.mark.parametrize("size", [MIN_BATCH, 5000, MAX_BATCH])
def test_batch_size_in_bounds(size: int) -> None:
    assert RotationOptions(batch_size=size).batch_size == size


@pytest.mark.parametrize("size", [MIN_BATCH - 1, 0, -5, MAX_BATCH + 1, 10**9])
def test_batch_size_out_of_bounds(size: int) -> None:
    with pytest.raises(ConfigError, match=f"batchSize {size} is outside"):
        RotationOptions(batch_size=size)


@pytest.mark.parametrize("size", ["5000", 5000.0, None, True])
def test_batch_size_must_be_an_integer(size: Any) -> None:
    with pytest.raises(ConfigError, match="batchSize"):
        RotationOptions(batch_size=size)


@pytest.mark.parametrize("workers", [0, 1000, -1, "2", 1.5, None, True])
def test_workers_bounds(workers: Any) -> None:
    with pytest.raises(ConfigError, match="workers"):
        RotationOptions(workers=workers)
    assert RotationOptions(workers=1).workers == 1


@pytest.mark.parametrize("mode", ["online", "ATOMIC", "", None, "Offline"])
def test_mode_must_be_known(mode: Any) -> None:
    with pytest.raises(ConfigError, match="rotation mode"):
        RotationOptions(mode=mode)
    assert RotationOptions(mode="Atomic").mode == "Atomic"
    assert RotationOptions().mode == "Online"


def test_one_retention_rule_for_the_operator_and_the_cli() -> None:
    from datetime import timedelta

    from rotation_operator.policy.config import MIN_RETENTION_DAYS, retention_from_days

    ret = retention_from_days(30, MIN_RETENTION_DAYS)
    assert (ret.disable_after, ret.destroy_after) == (timedelta(days=30), timedelta(days=7))
    with pytest.raises(ConfigError, match=r"^retention.disableAfterDays 6 is below 7 days"):
        retention_from_days(6, 30)
    with pytest.raises(ConfigError, match=r"^retention.destroyAfterDays True is below"):
        retention_from_days(30, True)
    with pytest.raises(ConfigError, match=r"^retention.destroyAfterDays '9' is below"):
        retention_from_days(30, "9")
    with pytest.raises(ConfigError, match=r"^--destroy-after-days 36501 is more than 36500"):
        retention_from_days(30, 36501, names=("--disable-after-days", "--destroy-after-days"))
