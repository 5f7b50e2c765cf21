"""How the store names tables: the one way SQL identifiers are built.

Why a module of its own: a keys table ``K`` brings three more tables (``K_rotations``,
``K_meta``, ``K_audit``), each optionally in a schema, and every statement must quote them
the same way.  :class:`Tables` derives them all from a keys table's name (a policy's
:class:`~rotation_operator.policy.config.StoreConfig`, or just the name, as the library has
it); :func:`ident` quotes any other relation (a target, a heap).  Names reach SQL only as
``psycopg.sql.Identifier``, never as text.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from psycopg import sql

from rotation_operator.policy.config import KEYS_TABLE, StoreConfig, Target, identifier


def ident(schema: str | None, name: str) -> sql.Identifier:
    """``schema.name``, or ``name`` found through the search_path when no schema is given."""
    return sql.Identifier(schema, name) if schema else sql.Identifier(name)


@dataclass(frozen=True)
class Tables:
    """The operator's own tables of one keys table."""

    keys_table: str
    schema: str | None = None

    def __post_init__(self) -> None:
        identifier(self.keys_table, "keysTable", KEYS_TABLE)
        if self.schema is not None:
            identifier(self.schema, "keys schema")

    @classmethod
    def of(cls, cfg: StoreConfig | Tables) -> Tables:
        return cfg if isinstance(cfg, Tables) else cls(cfg.keys_table, cfg.schema)

    @property
    def qualified_keys(self) -> str:
        """The keys table as users name it (messages, metrics labels)."""
        return f"{self.schema}.{self.keys_table}" if self.schema else self.keys_table

    @property
    def rotations_table(self) -> str:
        return f"{self.keys_table}_rotations"

    @property
    def meta_table(self) -> str:
        return f"{self.keys_table}_meta"

    @property
    def audit_table(self) -> str:
        return f"{self.keys_table}_audit"

    @cached_property
    def keys(self) -> sql.Identifier:
        return ident(self.schema, self.keys_table)

    @cached_property
    def rotations(self) -> sql.Identifier:
        return ident(self.schema, self.rotations_table)

    @cached_property
    def meta(self) -> sql.Identifier:
        return ident(self.schema, self.meta_table)

    @cached_property
    def audit(self) -> sql.Identifier:
        return ident(self.schema, self.audit_table)

    def table(self, name: str) -> sql.Identifier:
        """Another table of this keys table's schema (by its bare name)."""
        return ident(self.schema, name)

    @staticmethod
    def index(name: str) -> sql.Identifier:
        """An index or a constraint: it lives in its table's schema, named bare."""
        return sql.Identifier(name)


def target(t: Target) -> sql.Identifier:
    """A target table as its policy names it (through the search_path without a schema)."""
    return ident(t.schema, t.table)
