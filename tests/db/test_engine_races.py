"""Deterministic races between one online batch and the application (and VACUUM).

A batch reads rows, re-encrypts them in Python, then updates them by ``ctid``.  These tests
make the application act exactly in that gap, through the fault point between the two
statements (``batch-read`` of :mod:`rotation_operator.faults`, armed to run the
application's step on its own connection).  The database is real; only the timing is
forced.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg

from rotation_operator.library import Encryptor
from rotation_operator.policy.config import RotationOptions
from tests.fixtures.fix_app import App, make_app, plaintext_for, read_rows
from tests.fixtures.fix_faults import FaultHook
from tests.fixtures.roles import app_dsn

ONLINE = RotationOptions(mode="Online", batch_size=5000, vacuum=False, grace=0.0)


def _between_select_and_update(fault_hook: FaultHook, step: Callable[[], None]) -> list[int]:
    """Run ``step`` once, inside the first batch, after its SELECT and before its UPDATE;
    returns the list of batches that reached that point (1, 2, ...)."""
    calls: list[int] = []

    def hook() -> None:
        if not calls:
            step()
        calls.append(len(calls) + 1)

    fault_hook("batch-read", hook)
    return calls


def _ctid(conn: psycopg.Connection[Any], row_id: int) -> str:
    row = conn.execute("SELECT ctid::text FROM secrets WHERE id = %s", (row_id,)).fetchone()
    assert row is not None
    return str(row[0])


def _write(app: App, enc: Encryptor, conn: psycopg.Connection[Any], row_id: int) -> None:
    pt = plaintext_for(row_id)
    value, kid = enc.encrypt(pt)
    conn.execute("UPDATE secrets SET value = %s, key_id = %s WHERE id = %s",
                 (value, kid, row_id))
    app.expected[app.target][row_id] = pt


def test_application_update_between_select_and_update_is_kept(
        dsn: str, fault_hook: FaultHook) -> None:
    app = make_app(dsn, 200, legacy_every=0)
    enc = Encryptor(app_dsn(dsn), app.kek, max_age=0)
    with psycopg.connect(app_dsn(dsn), autocommit=True) as conn:
        calls = _between_select_and_update(fault_hook, lambda: _write(app, enc, conn, 10))
        app.engine().rotate(2, ONLINE)
    enc.close()
    assert calls
    app.assert_rotated()


def test_reused_line_pointer_is_not_overwritten(dsn: str, fault_hook: FaultHook) -> None:
    """In the gap, the application deletes row A, VACUUM tries to free A's line pointer,
    and the application rewrites row B (same page: a HOT update), whose new version would
    take A's old ctid if VACUUM succeeded.  The batch must not write A's old plaintext into
    B, and A must stay deleted."""
    app = make_app(dsn, 200, legacy_every=0)
    enc = Encryptor(app_dsn(dsn), app.kek, max_age=0)
    seen: dict[str, str] = {}
    with psycopg.connect(app_dsn(dsn), autocommit=True) as conn:  # the application owns it
        a_ctid = _ctid(conn, 5)

        def step() -> None:
            conn.execute("DELETE FROM secrets WHERE id = 5")
            del app.expected[app.target][5]
            conn.execute("VACUUM (INDEX_CLEANUP ON) secrets")
            _write(app, enc, conn, 6)
            seen["b_ctid"] = _ctid(conn, 6)

        calls = _between_select_and_update(fault_hook, step)
        app.engine().rotate(2, ONLINE)
    enc.close()
    assert calls
    # Today the batch's SELECT portal holds back the xmin horizon until the UPDATE, so
    # VACUUM cannot free A's slot and B lands elsewhere.  Should that ever change (another
    # statement between the two, a different protocol), B takes A's ctid and only a
    # ctid+xmin match in the UPDATE keeps A's plaintext out of B: checked below.
    print(f"A was at {a_ctid}; B's new version is at {seen['b_ctid']}")
    assert read_rows(dsn, app.target).keys() == app.expected[app.target].keys()
    app.assert_rotated()
