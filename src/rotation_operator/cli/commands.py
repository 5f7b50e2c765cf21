"""The subcommands: one function each, from parsed flags to an :class:`ExitStatus`.

``init``, ``status``, ``rotate``, ``sweep``, ``rekey``, ``keys`` and ``verify`` drive the
same engine as the operator, for non-Kubernetes use and emergencies.  The DSN and the KEKs
are read here from what the flags name (:mod:`rotation_operator.crypto.sources` for the
KEKs, as the operator reads its Secrets); printing is :mod:`.output`'s.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from rotation_operator.cli import output
from rotation_operator.cli.exits import ExitStatus
from rotation_operator.cli.parser import rotation_options
from rotation_operator.crypto import sources
from rotation_operator.crypto.kek import Kek
from rotation_operator.errors import ConfigError
from rotation_operator.policy.config import StoreConfig, Target, retention_from_days

if TYPE_CHECKING:  # the engine loads with the command that uses it, not with the parser
    from rotation_operator.rotation.engine import Engine
    from rotation_operator.rotation.results import RotationResult

Command = Callable[[argparse.Namespace], ExitStatus]


def init(args: argparse.Namespace) -> ExitStatus:
    res = _engine(args).initialise(args.policy_version)
    output.initialised(res.active_version, res.created_key, res.served_version)
    return ExitStatus.OK


def status(args: argparse.Namespace) -> ExitStatus:
    from rotation_operator.rotation.inspection import snapshot

    output.status(snapshot(_dsn(args), _config(args), exact=args.exact), args.output)
    return ExitStatus.OK


def rotate(args: argparse.Namespace) -> ExitStatus:
    engine = _engine(args)
    bar = output.ProgressBar()
    try:
        res = engine.rotate(args.policy_version, rotation_options(args), progress=bar,
                            lock_wait=args.wait_lock, throttled=bar.throttled)
    finally:
        bar.close()
    return _rotation_done(args, res)


def sweep(args: argparse.Namespace) -> ExitStatus:
    engine = _engine(args)
    bar = output.ProgressBar()
    try:
        res = engine.sweep(rotation_options(args), progress=bar, lock_wait=args.wait_lock,
                           throttled=bar.throttled)
    finally:
        bar.close()
    return _rotation_done(args, res)


def rekey(args: argparse.Namespace) -> ExitStatus:
    from rotation_operator.policy.decisions import Request

    presented = keks(args)  # the KEK first: its absence is the likelier mistake
    current = presented[0]
    res = _engine(args, presented).execute(Request("rekey"), rotation_options(args),
                                           lock_wait=args.wait_lock)
    flags = {name: getattr(current, attr) for name, attr in (
        ("alwaysSensitive", "always_sensitive"), ("neverExtractable", "never_extractable"))
        if isinstance(getattr(current, attr, None), bool)}  # a PKCS#11 KEK's only
    output.rekeyed(res.rekeyed, current.fingerprint, current.describe(), res.to_version,
                   args.output, flags)
    return ExitStatus.OK


def keys(args: argparse.Namespace) -> ExitStatus:
    from rotation_operator.rotation.lifecycle import Lifecycle

    assumed = getattr(args, "assume_now", None)
    try:
        now = datetime.fromisoformat(assumed) if assumed else datetime.now(UTC)
    except ValueError:
        raise ConfigError(f"--assume-now {assumed!r} is not an ISO 8601 time") from None
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    life = Lifecycle(_dsn(args), _config(args), actor=_actor(args))
    command = args.keys_command
    if command == "plan":
        retention = None if args.disable_after_days is None else retention_from_days(
            args.disable_after_days, args.destroy_after_days,
            names=("--disable-after-days", "--destroy-after-days"))
        output.key_plan(life.run(retention, now, apply=False, record=not assumed),
                        args.output)
        return ExitStatus.OK
    if command == "disable" and not args.confirm:
        raise ConfigError("disabling a key stops every row under it from decrypting: pass "
                          "--confirm")
    if command == "destroy" and args.confirm_destroy != args.version:
        raise ConfigError(f"destroying DEK v{args.version} cannot be undone: pass "
                          f"--confirm-destroy {args.version}")
    if command == "disable":
        life.disable(args.version, now)
    elif command == "enable":
        life.enable(args.version)
    else:
        life.destroy(args.version, now)
    output.key_changed(command, args.version)
    return ExitStatus.OK


def verify(args: argparse.Namespace) -> ExitStatus:
    from rotation_operator.rotation.inspection import verify as verify_rows

    rep = verify_rows(_dsn(args), _config(args), keks(args))
    output.verified(rep, args.output)
    if rep.ok:
        return ExitStatus.OK
    return ExitStatus.RETRY if rep.in_progress else ExitStatus.FAILED


#: The function of each subcommand (``run`` is the operator's: :func:`..app.main`).
COMMANDS: dict[str, Command] = {"init": init, "status": status, "rotate": rotate,
                                "sweep": sweep, "rekey": rekey, "keys": keys,
                                "verify": verify}


def _rotation_done(args: argparse.Namespace, res: RotationResult) -> ExitStatus:
    from rotation_operator.policy.decisions import Action

    output.rotation(res, args.output)
    decision = res.decision
    if decision is not None and decision.action in (Action.BEHIND, Action.PAUSED):
        return ExitStatus.USAGE
    return ExitStatus.OK


# -- what the flags name -----------------------------------------------------------------
def _engine(args: argparse.Namespace, presented: Sequence[Kek] | None = None) -> Engine:
    from rotation_operator.rotation.engine import Engine

    dsn, cfg = _dsn(args), _config(args)
    source = getattr(args, "legacy_kek", None)
    legacy_kek = None if source is None else sources.from_spec(source, "--legacy-kek",
                                                               on_weak=output.weak_kek)
    return Engine(dsn, cfg, keks(args) if presented is None else presented,
                  actor=_actor(args), legacy_reads=getattr(args, "legacy_reads", None),
                  legacy_kek=legacy_kek)


def keks(args: argparse.Namespace) -> list[Kek]:
    """The current KEK (``--kek SOURCE``, or ``--kek-file`` / ``--kek-env``), then each
    ``--previous-kek``."""
    if args.kek:
        current = sources.from_spec(args.kek, "--kek", on_weak=output.weak_kek)
    elif args.kek_file:
        current = sources.from_file(args.kek_file, "--kek-file", on_weak=output.weak_kek)
    else:
        current = sources.from_env(args.kek_env, on_weak=output.weak_kek)
    return [current, *(sources.from_spec(text, "--previous-kek", on_weak=output.weak_kek)
                       for text in (args.previous_kek or []))]


def _dsn(args: argparse.Namespace) -> str:
    if args.dsn_file:
        try:
            text: str = args.dsn_file.read_text()
            return text.strip()
        except OSError as exc:
            raise ConfigError(f"cannot read --dsn-file {args.dsn_file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"--dsn-file {args.dsn_file} is not UTF-8 text") from None
    value = os.environ.get(args.dsn_env, "").strip()
    if not value:
        raise ConfigError(f"no DSN: set ${args.dsn_env} or pass --dsn-file")
    return value


def _config(args: argparse.Namespace) -> StoreConfig:
    targets = [Target.parse(t) for t in (args.target or ["secrets"])]
    return StoreConfig(targets, args.keys_table, args.schema)


def _actor(args: argparse.Namespace) -> str:
    return getattr(args, "actor", None) or f"cli:{os.environ.get('USER', 'unknown')}"
