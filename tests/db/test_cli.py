"""The break-glass CLI on a real database, as the operator role: one line and the right exit
code for every bad input, in every subcommand, never a traceback (finding 10 and 11)."""

from __future__ import annotations

import subprocess

import psycopg
import pytest

from rotation_operator.crypto import codec as crypto
from rotation_operator.policy.config import Target
from tests.fixtures.fix_app import create_table, fill, make_app, run_cli
from tests.fixtures.roles import app_dsn


def _one_line_error(proc: subprocess.CompletedProcess[str], code: int, reason: str) -> None:
    stdout, stderr = proc.stdout, proc.stderr
    assert proc.returncode == code, (stdout, stderr)
    assert "Traceback" not in stderr and "Traceback" not in stdout
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"[{reason}]" in lines[0], \
        stderr


@pytest.mark.parametrize("command", ["status", "verify", "rotate", "sweep", "init"])
def test_a_missing_table_or_column_is_named_by_every_subcommand(dsn: str,
                                                                command: str) -> None:
    app = make_app(dsn, 20)
    kek = None if command == "status" else app.kek
    proc = run_cli(command, "--target", "nosuch", dsn=dsn, kek=kek)
    _one_line_error(proc, 2, "TargetInvalid")
    assert "target table nosuch does not exist" in proc.stderr
    proc = run_cli(command, "--target", "secrets:id:nope:key_id", dsn=dsn, kek=kek)
    _one_line_error(proc, 2, "TargetInvalid")
    assert "has no column nope" in proc.stderr


@pytest.mark.parametrize("command", ["status", "verify"])
def test_a_database_without_keys_tables_says_so(dsn: str, command: str) -> None:
    create_table(dsn)
    fill(dsn, Target("secrets"), crypto.new_key(), 5, ring=None)
    proc = run_cli(command, dsn=dsn, kek=None if command == "status" else crypto.new_key())
    _one_line_error(proc, 2, "NotInitialised")
    assert "keys table encryption_keys does not exist" in proc.stderr


@pytest.mark.parametrize("command", ["status", "verify", "rotate", "sweep", "init"])
def test_an_unreachable_database_is_retry_later(command: str) -> None:
    bad = "postgresql://ro_operator:hunter2@127.0.0.1:1/nowhere"
    proc = run_cli(command, dsn=bad, kek=None if command == "status" else crypto.new_key())
    _one_line_error(proc, 3, "DatabaseUnavailable")
    assert "hunter2" not in proc.stderr + proc.stdout


def test_a_missing_grant_is_named_with_the_grant_that_fixes_it(dsn: str) -> None:
    app = make_app(dsn, 10)
    with psycopg.connect(app_dsn(dsn), autocommit=True) as conn:
        conn.execute("REVOKE UPDATE (value) ON secrets FROM ro_operator")
    proc = run_cli("rotate", "--policy-version", "2", dsn=dsn, kek=app.kek)
    _one_line_error(proc, 2, "DatabasePermissionDenied")
    assert "lacks UPDATE on public.secrets.value" in proc.stderr
    proc = run_cli("rotate", "--policy-version", "2", "--mode", "Atomic", dsn=dsn, kek=app.kek)
    _one_line_error(proc, 2, "DatabasePermissionDenied")


def test_versions_below_the_served_one_and_manual_rotations(dsn: str) -> None:
    app = make_app(dsn, 30)
    app.engine().initialise(policy_version=3)
    proc = run_cli("rotate", "--policy-version", "2", dsn=dsn, kek=app.kek)
    assert proc.returncode == 2 and "below 3, which this database has already served" \
        in proc.stdout, proc.stdout + proc.stderr
    proc = run_cli("rotate", dsn=dsn, kek=app.kek)  # manual: uses up no policy version
    assert proc.returncode == 0 and "manual rotation" in proc.stdout, proc.stderr
    proc = run_cli("status", "-o", "json", dsn=dsn, kek=None)
    assert '"observedVersion": 3' in proc.stdout and '"activeKeyVersion": 2' in proc.stdout
    proc = run_cli("rotate", "--policy-version", "4", dsn=dsn, kek=app.kek)
    assert proc.returncode == 0 and "policy version 4" in proc.stdout
    proc = run_cli("sweep", dsn=dsn, kek=app.kek)
    assert proc.returncode == 0 and "no row is under a retired key" in proc.stdout
