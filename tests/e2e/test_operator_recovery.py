"""Recovery within seconds of a fix (issue #12), with Kopf's retry delays left long (the
operator's cap is set to 10 minutes here): what heals a policy is the operator noticing
the fix (a spec change, a changed Secret, the repaired row), not a delay running out.
Also: a valid but different KEK put into the Secret shows as not Ready within seconds,
and plain log lines carry a timestamp, the level and the policy."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable

from rotation_operator.crypto import codec as crypto
from tests.fixtures.fix_operator import KEK_SECRET, MakeApp, StartOperator

SLOW = {"max_retry_delay": 600.0, "extra_args": ("--recheck-interval", "1")}


def _timed(fn: Callable[[], object]) -> float:
    t = time.monotonic()
    fn()
    return time.monotonic() - t


def test_a_wrong_kek_in_the_secret_shows_within_seconds_and_its_fix_heals(
        namespace: str, dsn: str, make_app: MakeApp, start_operator: StartOperator,
        report_measure: Callable[[str], None]) -> None:
    app = make_app(namespace, dsn, rows=50, legacy=5)
    start_operator([namespace], **SLOW)
    app.wait_condition("Ready", "True")
    time.sleep(2)  # the Secret's version is known
    app.set_secret(KEK_SECRET, "kek", os.urandom(32).hex())  # valid, but not the KEK
    took = _timed(lambda: app.wait_condition("Ready", "False", "KEKMismatch", current=False,
                                             timeout=15))
    assert took < 8, took
    report_measure(f"recovery: a wrong KEK put into the Secret shown as KEKMismatch in "
                   f"{took:.1f}s")
    app.set_secret(KEK_SECRET, "kek", app.kek.hex())
    took = _timed(lambda: app.wait_condition("Ready", "True", current=False, timeout=15))
    assert took < 8, took
    report_measure(f"recovery: the KEK Secret fixed, Ready again in {took:.1f}s")
    app.assert_intact()


def test_a_kek_secret_created_late_heals_at_once(
        namespace: str, dsn: str, make_app: MakeApp, start_operator: StartOperator,
        report_measure: Callable[[str], None]) -> None:
    app = make_app(namespace, dsn, rows=30, legacy=5, kek_secret=False)
    start_operator([namespace], **SLOW)
    app.wait_condition("Ready", "False", "SecretMissing")
    time.sleep(3)  # past the first quick retries: Kopf now waits up to its own delay
    app.set_secret(KEK_SECRET, "kek", app.kek.hex())
    took = _timed(lambda: app.wait_condition("Ready", "True", timeout=20))
    assert took < 8, took
    report_measure(f"recovery: a KEK Secret created late, Ready in {took:.1f}s")


def test_a_corrected_spec_is_a_fresh_start(
        namespace: str, dsn: str, make_app: MakeApp, start_operator: StartOperator,
        report_measure: Callable[[str], None]) -> None:
    app = make_app(namespace, dsn, rows=30, legacy=5, policy=False)
    manifest = app.policy_manifest(version=1)
    manifest["spec"]["targets"] = [{"table": "secrets_typo"}]
    app.kubectl.apply(manifest)
    start_operator([namespace], **SLOW)
    app.wait_condition("Ready", "False", "TargetInvalid")
    time.sleep(8)  # several failed retries: the backoff has grown
    def correct() -> None:
        app.patch_spec({"targets": [{"table": "secrets"}]})
        app.wait_condition("Ready", "True", timeout=20)

    took = _timed(correct)
    assert took < 6, took
    report_measure(f"recovery: a corrected spec, Ready in {took:.1f}s")
    app.assert_intact()


def test_a_repaired_row_resumes_the_rotation_within_seconds(
        namespace: str, dsn: str, make_app: MakeApp, start_operator: StartOperator,
        report_measure: Callable[[str], None]) -> None:
    app = make_app(namespace, dsn, rows=300, legacy=30, batch_size=100)
    op = start_operator([namespace], **SLOW)
    app.wait_condition("Ready", "True")
    bad_id = 150
    with app.connect() as conn:
        conn.execute("UPDATE secrets SET value = %s WHERE id = %s",
                     (b"RO\x01" + os.urandom(40), bad_id))
    app.patch_spec({"version": 2})
    app.wait_condition("Ready", "False", "RowDecryptFailed")
    time.sleep(8)  # the retry delay grows meanwhile
    with app.connect() as conn:
        conn.execute("UPDATE secrets SET value = %s, key_id = NULL WHERE id = %s",
                     (crypto.encrypt(app.kek, app.plaintexts[bad_id]), bad_id))
    took = _timed(lambda: app.wait_condition("Ready", "True", "RotationSucceeded",
                                             timeout=30))
    assert took < 10, took
    report_measure(f"recovery: a repaired row, the rotation finished in {took:.1f}s")
    assert app.active_version() == 2 and app.stale_count() == 0
    app.assert_intact()
    # plain logs: "[2026-12-02 10:11:12,345] logger [LEVEL   ] [ns/app] message"
    line = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\] \S+\s+\[(INFO|WARNING|ERROR)"
                      rf"\s*\] \[{re.escape(namespace)}/{app.name}\] ")
    lines = op.log().splitlines()
    assert any(line.match(x) and "retrying the reconcile now" in x for x in lines), \
        "\n".join(lines[-30:])
    assert any(line.match(x) and "RowDecryptFailed" in x for x in lines), \
        "\n".join(lines[-30:])
