"""The runbook for a leaked DEK, end to end (docs/runbook.md, "A DEK leaked").

The attacker holds one DEK's 32 bytes (a heap dump, a debug log of another tool) and keeps
what a backup reader has: a dump of the keys table and of the application's table taken
while that DEK was in use.  The runbook: rotate (every row moves off the DEK), disable and,
after the waiting period, destroy it (its wrapped bytes leave every page), then rekey the
KEK and retire the old KEK with the backups that need it.  Asserted: what the attacker can
still open with what it holds.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import psycopg

from rotation_operator.crypto import codec
from rotation_operator.errors import InvalidToken
from rotation_operator.policy.decisions import Request
from rotation_operator.rotation.engine import Engine
from rotation_operator.rotation.lifecycle import Lifecycle
from rotation_operator.store.keystore import KeyStore
from tests.fixtures.fix_app import (
    ONLINE,
    App,
    db_now,
    make_app,
    new_kek,
    read_rows,
    relation_on_disk,
)
from tests.fixtures.keks import keks
from tests.fixtures.roles import admin_dsn

Backup = tuple[dict[int, bytes], dict[object, tuple[bytes, int | None]]]


def _backup(app: App) -> Backup:
    """What a backup reader keeps: every wrapped DEK by version, and every stored value."""
    with psycopg.connect(app.dsn) as conn:
        wrapped = {k.version: k.wrapped_dek for k in KeyStore(app.cfg).list_keys(conn)}
    return wrapped, read_rows(app.dsn, app.target)


def _opens(key: bytes, value: bytes) -> bool:
    try:
        codec.decrypt(key, value)
    except InvalidToken:
        return False
    return True


def _unwraps(kek: bytes, wrapped: bytes, version: int) -> bool:
    try:
        codec.unwrap_dek(kek, wrapped, version)
    except InvalidToken:
        return False
    return True




def test_a_leaked_dek_opens_no_live_value_and_its_wraps_stop_opening(dsn: str) -> None:
    app = make_app(dsn, 200, legacy_every=0)  # every value under DEK v1
    old_kek = app.kek
    leaked = app.ring().deks[1]
    before_wraps, before_rows = _backup(app)
    assert all(_opens(leaked, v) for v, _ in before_rows.values())  # the leak is real

    # 1. rotate: every value moves onto a fresh DEK
    app.engine().rotate(2, ONLINE)
    # 2. disable the leaked DEK; after the waiting period, destroy it
    life = Lifecycle(dsn, app.cfg, actor="runbook")
    life.disable(1, db_now(dsn))
    with psycopg.connect(admin_dsn(dsn), autocommit=True) as conn:  # 8 days pass
        conn.execute("UPDATE encryption_keys SET disabled_at = disabled_at - interval '8 days', "
                     "destroy_after = destroy_after - interval '8 days' WHERE version = 1")
    life.destroy(1, db_now(dsn) + timedelta(seconds=1))
    # 3. rekey: every DEK left is rewrapped under a new KEK; the old KEK is then retired
    new_kek_bytes = new_kek()
    rekeyed = Engine(dsn, app.cfg, keks(new_kek_bytes, old_kek), actor="runbook").execute(
        Request("rekey"), ONLINE)
    assert rekeyed.rekeyed == (2,)

    # The live database: no value opens with the leaked DEK, and its wrap is on no page.
    live_rows = read_rows(dsn, app.target)
    assert live_rows and not any(_opens(leaked, v) for v, _ in live_rows.values())
    assert all(kid == 2 for _, kid in live_rows.values())
    assert before_wraps[1] not in relation_on_disk(dsn, "public.encryption_keys")
    dataclasses.replace(app, kek=new_kek_bytes).assert_rotated()  # every value reads back
    # A backup taken now holds nothing the old KEK opens: once the old KEK is destroyed,
    # only the new one opens the keys, and the leaked DEK is in no backup of them.
    after_wraps, _ = _backup(app)
    assert after_wraps[1] == b""  # destroyed
    assert not _unwraps(old_kek, after_wraps[2], 2)
    assert _unwraps(new_kek_bytes, after_wraps[2], 2)
    # The backup from before: its wraps open only with the old KEK, so destroying the old
    # KEK (with the backups that need it) is what makes them stop opening.
    assert _unwraps(old_kek, before_wraps[1], 1)
    assert not _unwraps(new_kek_bytes, before_wraps[1], 1)
