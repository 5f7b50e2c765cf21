"""The CLI package without a database: flags, their defaults, exit statuses, KEK flags."""

from __future__ import annotations

import argparse
import base64
import dataclasses
from pathlib import Path

import pytest

from rotation_operator.cli import ExitStatus, main
from rotation_operator.cli.commands import COMMANDS, keks
from rotation_operator.cli.exits import exit_status
from rotation_operator.cli.parser import build_parser, rotation_options
from rotation_operator.crypto import codec
from rotation_operator.errors import (
    ConfigError,
    DatabaseUnavailable,
    KekError,
    KekMismatchError,
    KeysetTampered,
    LockHeld,
    RowDecryptError,
)
from rotation_operator.policy.config import RotationOptions

KEY = bytes(range(32))


def test_exit_statuses_keep_their_numbers() -> None:
    assert [int(s) for s in ExitStatus] == [0, 1, 2, 3, 4, 130]


@pytest.mark.parametrize(("error", "status"), [
    (RowDecryptError("secrets", 7, 1), ExitStatus.FAILED),
    (ConfigError("bad"), ExitStatus.USAGE),
    (KekError("bad"), ExitStatus.USAGE),
    (DatabaseUnavailable("down"), ExitStatus.RETRY),
    (LockHeld("busy"), ExitStatus.RETRY),
    (KeysetTampered("wrapped DEK v1 altered", key_version=1), ExitStatus.TAMPERED),
    (KekMismatchError("not the KEK that wrapped DEK v1"), ExitStatus.USAGE),
])
def test_errors_map_to_exit_statuses(error: Exception, status: ExitStatus) -> None:
    assert exit_status(error) is status  # type: ignore[arg-type]


@pytest.mark.parametrize("command", ["rotate", "sweep", "rekey"])
def test_rotation_flags_default_to_rotation_options(command: str) -> None:
    args = build_parser().parse_args([command])
    assert rotation_options(args) == RotationOptions()


def test_rotation_flags_reach_their_fields() -> None:
    args = build_parser().parse_args([
        "rotate", "--mode", "Atomic", "--batch-size", "200", "--workers", "3", "--grace", "0",
        "--no-vacuum", "--max-rows-per-second", "1000", "--max-replication-lag", "10s",
        "--handover-timeout", "9", "--lock-timeout", "1", "--statement-timeout", "60"])
    expected = RotationOptions(mode="Atomic", batch_size=200, workers=3, grace=0.0,
                               vacuum=False, max_rows_per_second=1000,
                               max_replication_lag=10.0, handover_timeout=9.0,
                               lock_timeout=1.0, statement_timeout=60.0)
    assert rotation_options(args) == expected
    changed = {f.name for f in dataclasses.fields(RotationOptions)
               if getattr(expected, f.name) != getattr(RotationOptions(), f.name)}
    assert changed == {"mode", "batch_size", "workers", "grace", "vacuum",
                       "max_rows_per_second", "max_replication_lag", "handover_timeout",
                       "lock_timeout", "statement_timeout"}


def test_every_subcommand_has_its_function() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) - {"run"} == set(COMMANDS)


def test_kek_flags_current_first_then_previous(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    old = bytes(reversed(KEY))
    path = tmp_path / "old"
    path.write_bytes(base64.b64encode(old))
    monkeypatch.setenv("ROTATION_OPERATOR_KEK", KEY.hex())
    args = build_parser().parse_args(["rekey", "--previous-kek", f"file:{path}"])
    got = keks(args)
    assert [k.fingerprint for k in got] == [codec.kek_fingerprint(KEY),
                                            codec.kek_fingerprint(old)]
    assert [k.describe() for k in got] == ["$ROTATION_OPERATOR_KEK", f"--previous-kek {path}"]


def test_a_weak_kek_is_warned_about_on_stderr(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("WEAK_KEK", "correct horse battery staple 123")
    keks(build_parser().parse_args(["verify", "--kek", "env:WEAK_KEK"]))
    err = capsys.readouterr().err
    assert err.startswith("warning: the KEK from $WEAK_KEK is 32 printable characters")
    assert "correct horse" not in err


def test_an_error_is_one_line_and_an_exit_status(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert main(["status"]) == ExitStatus.USAGE
    err = capsys.readouterr().err
    assert err == "error: no DSN: set $DATABASE_URL or pass --dsn-file [InvalidSpec]\n"


def test_keys_plan_uses_the_shared_retention_rule(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://nowhere.invalid/db")
    assert main(["keys", "plan", "--disable-after-days", "3"]) == ExitStatus.USAGE
    err = capsys.readouterr().err
    assert "--disable-after-days 3 is below 7 days" in err
