"""The application library reads the operator's keys table, never one a search path finds.

The attacker is the application's own role: it owns the database, so it may create a
schema named after itself, which PostgreSQL's default search path (``"$user", public``)
puts first.  It copies the keys table there with an old key whose DEK leaked marked active,
hoping the library encrypts new values under it.  It never holds the KEK.
"""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql

from rotation_operator.crypto import codec
from rotation_operator.errors import InvalidToken, KeysTableAmbiguous
from rotation_operator.library import Encryptor
from tests.fixtures.fix_app import App, make_app
from tests.fixtures.roles import APP_ROLE

COLUMNS = sql.SQL(", ").join(sql.Identifier(c) for c in (
    "version", "wrapped_dek", "kek_fingerprint", "state", "rotated_by", "policy_version",
    "created_at", "retired_at"))


def rotated_app(dsn: str) -> tuple[App, bytes]:
    """Keys v1 (retired) and v2 (active); returns the app and the leaked DEK of v1."""
    app = make_app(dsn, 20)
    app.engine().rotate(2)
    return app, app.ring().deks[1]


def shadow(app_dsn: str) -> None:
    """As the application role: ``"$user".encryption_keys`` with v1 active again."""
    with psycopg.connect(app_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(APP_ROLE)))
        shadow_table = sql.Identifier(APP_ROLE, "encryption_keys")
        conn.execute(sql.SQL("CREATE TABLE {} (LIKE public.encryption_keys INCLUDING ALL)"
                             ).format(shadow_table))
        conn.execute(sql.SQL("INSERT INTO {} ({}) SELECT {} FROM public.encryption_keys"
                             ).format(shadow_table, COLUMNS, COLUMNS))
        conn.execute(sql.SQL("UPDATE {} SET state = 'retired'").format(shadow_table))
        conn.execute(sql.SQL("UPDATE {} SET state = 'active' WHERE version = 1"
                             ).format(shadow_table))


def attacker_reads(leaked: bytes, value: bytes) -> bool:
    try:
        codec.decrypt(leaked, value)
    except InvalidToken:
        return False
    return True


def test_a_shadow_keys_table_on_the_search_path_is_refused(dsn: str, app_dsn: str) -> None:
    app, leaked = rotated_app(dsn)
    shadow(app_dsn)
    with Encryptor(app_dsn, app.kek) as enc, pytest.raises(KeysTableAmbiguous) as caught:
        enc.encrypt(b"a new customer token")
    assert "pass schema=" in str(caught.value)
    # Named explicitly, the operator's table is read, whatever the search path holds.
    with Encryptor(app_dsn, app.kek, schema="public") as enc:
        value, key_id = enc.encrypt(b"a new customer token")
        assert key_id == 2 and enc.decrypt(value, key_id) == b"a new customer token"
    assert not attacker_reads(leaked, value)


def test_a_shadow_created_after_the_first_load_is_never_read(dsn: str, app_dsn: str) -> None:
    app, leaked = rotated_app(dsn)
    with Encryptor(app_dsn, app.kek) as enc:
        enc.encrypt(b"warm the ring")
        assert enc.schema == "public"  # resolved once, then pinned
        shadow(app_dsn)
        enc.refresh()
        value, key_id = enc.encrypt(b"a new customer token")
        assert key_id == 2
    assert not attacker_reads(leaked, value)
    # the attack does work on an unpinned, search-path-resolved name: the test is real
    with psycopg.connect(app_dsn) as conn:
        row = conn.execute("SELECT version FROM encryption_keys WHERE active").fetchone()
    assert row == (1,)
