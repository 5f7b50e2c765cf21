"""store.names: the one way table identifiers are built; and SQL stays in the store."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from psycopg import sql

from rotation_operator.errors import ConfigError
from rotation_operator.policy.config import StoreConfig, Target
from rotation_operator.store import names
from rotation_operator.store.names import Tables

PACKAGE = Path(names.__file__).resolve().parent.parent
#: A string that starts like an SQL statement.
STATEMENT = re.compile(
    # statement openings, in any case, that no English sentence starts with ...
    r"^\s*\(?\s*(?i:select\s|insert\s+into\s|update\s+\S+\s+set\s|delete\s+from\s|copy\s|"
    r"truncate\s|vacuum\s*[({]|vacuum\s+(full|analyze|verbose)\b|merge\s+into\s|"
    r"lock\s+table\s|with\s+\w+\s+as\s*\(|"
    r"(create|alter|drop)\s+(table|index|unique|schema|role|view|function|trigger|or\s))"
    # ... and, in capitals, every other statement's first word
    r"|^\s*\(?\s*(SELECT|INSERT|UPDATE|DELETE|WITH|CREATE|ALTER|LOCK|SET|DROP|"
    r"TRUNCATE|COPY|MERGE|ANALYZE|CLUSTER|REINDEX|GRANT|REVOKE|EXPLAIN|SHOW|RESET|DO|CALL|"
    r"LISTEN|NOTIFY|COMMENT|DISCARD|PREPARE|EXECUTE|DECLARE|FETCH|REFRESH)\b")
LOG_CALLS = {"debug", "info", "warning", "error", "exception", "critical"}


@pytest.mark.parametrize("schema", [None, "keystore"])
def test_tables_name_what_the_store_config_names(schema: str | None) -> None:
    cfg = StoreConfig([Target("secrets")], keys_table="app_keys", schema=schema)
    tables = Tables.of(cfg)
    prefix = (schema,) if schema else ()
    assert tables == Tables("app_keys", schema)
    assert tables.qualified_keys == cfg.qualified_keys
    assert tables.keys == sql.Identifier(*prefix, cfg.keys_table)
    assert tables.rotations == sql.Identifier(*prefix, cfg.rotations_table)
    assert tables.audit == sql.Identifier(*prefix, cfg.audit_table)
    assert tables.meta == sql.Identifier(*prefix, "app_keys_meta")
    assert Tables.of(tables) is tables


def test_a_target_is_named_as_its_policy_names_it() -> None:
    assert names.target(Target("secrets")) == sql.Identifier("secrets")
    assert names.target(Target("secrets", schema="app")) == sql.Identifier("app", "secrets")


@pytest.mark.parametrize(("table", "schema"), [("x; DROP TABLE y", None), ('a"b', None),
                                               ("keys", "s t"), ("keys", "")])
def test_tables_refuse_what_is_not_a_plain_identifier(table: str, schema: str | None) -> None:
    with pytest.raises(ConfigError, match="not a plain SQL identifier"):
        Tables(table, schema)


def _statements(path: Path) -> list[int]:
    """Lines of string literals that start like an SQL statement (not docstrings, not log
    messages)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef) and body and \
                isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            skip.add(id(body[0].value))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in LOG_CALLS:
            skip.update(id(sub) for arg in node.args for sub in ast.walk(arg))
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in skip and STATEMENT.match(node.value)]


def test_the_scan_finds_a_statement() -> None:
    # The check below would pass vacuously if the scan found nothing anywhere.
    assert _statements(PACKAGE / "store" / "keys.py")


def test_sql_lives_only_in_the_store_package() -> None:
    outside = {str(p.relative_to(PACKAGE)): lines
               for p in sorted(PACKAGE.rglob("*.py"))
               if p.relative_to(PACKAGE).parts[0] != "store" and (lines := _statements(p))}
    assert outside == {}
