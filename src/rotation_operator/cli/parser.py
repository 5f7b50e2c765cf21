"""The ``rotation-operator`` command line's arguments: every flag, its help and default.

Defaults of the rotation flags are read from :class:`RotationOptions` (never typed twice),
and :func:`rotation_options` turns the parsed flags back into one.  Secrets never travel as
argument values (they would show in ``ps`` and shell history): the DSN and the KEK come
from a file or an environment variable *named* by a flag.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from rotation_operator import __version__
from rotation_operator.errors import ConfigError
from rotation_operator.policy.config import (
    MIN_RETENTION_DAYS,
    MODES,
    RotationOptions,
    parse_duration,
)
from rotation_operator.rotation.inspection import EXACT_BELOW

#: The defaults every rotation flag shows and falls back to.
DEFAULTS = RotationOptions()
_OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(RotationOptions))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rotation-operator",
        description="Envelope-encryption key rotation for PostgreSQL: the Kubernetes "
                    "operator and its break-glass CLI.",
        epilog="Secrets are never accepted as argument values: name a file or an "
               "environment variable holding them.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the Kubernetes operator (wraps kopf run)")
    from rotation_operator.operator.settings import add_run_arguments
    add_run_arguments(run)

    init = sub.add_parser("init", help="create the key tables and key v1 if missing; "
                                       "prove the KEK unwraps the active key")
    _store_args(init, kek=True)
    init.add_argument("--policy-version", type=_positive, metavar="N",
                      help="record N as the version already served (no rotation)")
    _legacy_args(init)

    status = sub.add_parser("status", help="show keys, counts and the last rotation "
                                           "(read-only, needs no KEK)")
    _store_args(status, kek=False)
    status.add_argument("-o", "--output", choices=("table", "json"), default="table")
    status.add_argument("--exact", action="store_true",
                        help="count every row (a full scan of each target); by default "
                             f"tables over {EXACT_BELOW} rows are estimated from the planner's "
                             "statistics, and the output says which")

    rotate = sub.add_parser("rotate", help="rotate to a new DEK and re-encrypt every row")
    _store_args(rotate, kek=True)
    rotate.add_argument("--policy-version", type=_positive, metavar="N",
                        help="the policy version this rotation serves, as a spec.version bump "
                             "would (a version already served does nothing); without it, a "
                             "manual rotation that uses up no policy version")
    _rotation_args(rotate)
    _legacy_args(rotate)
    rotate.add_argument("--mode", choices=MODES, default=DEFAULTS.mode,
                        help=f"{DEFAULTS.mode} (default): batches, applications keep writing; "
                             "Atomic: rows move in one transaction, writes wait")
    rotate.add_argument("--grace", type=float, default=DEFAULTS.grace, metavar="SECONDS",
                        help="wait this long after the new key is committed before the "
                             "handover: more than the applications' key-ring max_age "
                             f"(default {DEFAULTS.grace:g})")
    rotate.add_argument("--handover-timeout", type=float, default=DEFAULTS.handover_timeout,
                        metavar="SECONDS",
                        help="how long the handover waits for transactions open at its start "
                             f"(default {DEFAULTS.handover_timeout:g}); rows they commit "
                             "later are swept")

    sweep = sub.add_parser("sweep", help="move rows found under a retired key onto the "
                                         "active key (no new key)")
    _store_args(sweep, kek=True)
    _rotation_args(sweep)
    _legacy_args(sweep)
    sweep.add_argument("--legacy-kek", metavar="SOURCE",
                       help="the KEK late legacy rows (key_id NULL) are under (file:PATH or "
                            "env:NAME): this sweep reads them with its bytes and moves them "
                            "onto the active key, even after legacy reads closed; the way to "
                            "move a late legacy row you were told about by name, e.g. after "
                            "the KEK moved to PKCS#11 (docs/hsm.md)")

    rekey = sub.add_parser("rekey", help="rewrap every DEK under the current KEK (--kek...), "
                                         "unwrapping with --previous-kek; legacy rows move "
                                         "onto a DEK first")
    _store_args(rekey, kek=True)
    _rotation_args(rekey)
    _legacy_args(rekey)

    _keys_args(sub.add_parser("keys", help="the end of a key's life: plan (dry run), "
                                           "disable, enable, destroy (break-glass; needs no "
                                           "KEK)"))

    verify = sub.add_parser("verify", help="decrypt every row and check the audit chain "
                                           "(read-only); exit 1 on any failure (rows that "
                                           "do not decrypt, or under a retired, disabled or "
                                           "destroyed key, or left by a stopped rotation), "
                                           "3 while a rotation is moving rows, 4 if the "
                                           "keys table was tampered with")
    _store_args(verify, kek=True)
    verify.add_argument("-o", "--output", choices=("text", "json"), default="text")
    return p


def _keys_args(keys: argparse.ArgumentParser) -> None:
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    plan = keys_sub.add_parser("plan", help="what a retention policy would disable or destroy, "
                                            "and when (changes nothing but the census)")
    plan.add_argument("--disable-after-days", type=int, metavar="N",
                      help="retired keys with no row for N days are disabled "
                           f"(>= {MIN_RETENTION_DAYS})")
    plan.add_argument("--destroy-after-days", type=int, default=MIN_RETENTION_DAYS,
                      metavar="N",
                      help=f"disabled keys are destroyed N days later (>= {MIN_RETENTION_DAYS}"
                           f", default {MIN_RETENTION_DAYS})")
    for name, text in (("disable", "stop a retired key from unwrapping (reversible)"),
                       ("enable", "let a disabled key unwrap again"),
                       ("destroy", "erase a disabled key's wrapped bytes: irreversible")):
        action = keys_sub.add_parser(name, help=text)
        action.add_argument("version", type=_positive, metavar="VERSION")
        if name == "disable":
            action.add_argument("--confirm", action="store_true",
                                help="required: rows under the key will not decrypt")
        if name == "destroy":
            action.add_argument("--confirm-destroy", type=int, metavar="VERSION",
                                help="required, the same VERSION again: destruction cannot be "
                                     "undone, and restored backups that need the key fail")
    plan.add_argument("--assume-now", metavar="ISO8601", default=None,
                      help="show the plan as it would be at this time (a rehearsal: writes "
                           "nothing; the steps themselves always use the database's clock)")
    for action in keys_sub.choices.values():
        _store_args(action, kek=False)
        action.add_argument("-o", "--output", choices=("text", "json"), default="text")


def _legacy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--legacy-reads", choices=("open", "closed"), default=None,
                   help="record whether key rings keep reading legacy rows (key_id NULL) "
                        "once the first rotation migrated them all: closed refuses them "
                        "(the default of a new keys table), open keeps reading and sweeping "
                        "them; without the flag the recorded setting stays (a policy's "
                        "spec.legacy.reads wins at its next reconcile)")


def _rotation_args(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    p.add_argument("--batch-size", type=int, default=d.batch_size, metavar="N",
                   help=f"rows per batch (default {d.batch_size})")
    p.add_argument("--max-batch-bytes", type=int, default=d.max_batch_bytes, metavar="N",
                   help=f"value bytes per batch at most (default {d.max_batch_bytes})")
    p.add_argument("--workers", type=int, default=d.workers, metavar="N",
                   help="processes re-encrypting in parallel in online mode, for tables "
                        f"of more than 16 batches (default {d.workers}; 1..8)")
    p.add_argument("--lock-timeout", type=float, default=d.lock_timeout, metavar="SECONDS",
                   help="longest wait for a lock per statement "
                        f"(default {d.lock_timeout:g}; 0 = forever)")
    p.add_argument("--statement-timeout", type=float, default=d.statement_timeout,
                   metavar="SECONDS",
                   help="longest run of one statement "
                        f"(default {d.statement_timeout:g}; 0 = no limit)")
    t = p.add_argument_group("throttling (online batches; see README \"Throttling\")")
    t.add_argument("--max-rows-per-second", type=int, default=d.max_rows_per_second,
                   metavar="N",
                   help="rows per second over all workers "
                        f"(default {d.max_rows_per_second} = no limit)")
    t.add_argument("--max-replication-lag", type=_lag, default=d.max_replication_lag,
                   metavar="DURATION",
                   help="pause while a streaming replica replays more than this behind "
                        "(e.g. 10s; the role needs pg_monitor)")
    t.add_argument("--max-blocked-sessions", type=int, default=d.max_blocked_sessions,
                   metavar="N",
                   help="back off after a batch kept more than N application sessions "
                        "waiting on its locks")
    p.add_argument("--no-vacuum", action="store_true",
                   help="skip VACUUM (ANALYZE) of the targets afterwards")
    p.add_argument("--wait-lock", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for another rotation to finish (default 0)")
    p.add_argument("--actor", default=None, help="recorded as rotated_by (default cli:$USER)")
    p.add_argument("-o", "--output", choices=("text", "json"), default="text")


def rotation_options(args: argparse.Namespace) -> RotationOptions:
    """The :class:`RotationOptions` the flags ask for: a flag a subcommand lacks (``--mode``
    on ``sweep``) keeps its default."""
    given = {name: getattr(args, name) for name in _OPTION_FIELDS if hasattr(args, name)}
    return RotationOptions(**given, vacuum=not args.no_vacuum)


def _store_args(p: argparse.ArgumentParser, *, kek: bool) -> None:
    g = p.add_argument_group("database")
    g.add_argument("--dsn-env", default="DATABASE_URL", metavar="NAME",
                   help="environment variable holding the PostgreSQL DSN (default DATABASE_URL)")
    g.add_argument("--dsn-file", type=Path, metavar="PATH",
                   help="file holding the DSN (overrides --dsn-env)")
    g.add_argument("--keys-table", default="encryption_keys", metavar="NAME",
                   help="the keys table (default encryption_keys); the audit and rotation "
                        "tables are NAME_audit and NAME_rotations")
    g.add_argument("--schema", default=None, metavar="NAME",
                   help="schema of the keys table (default: the search_path)")
    g.add_argument("--target", action="append", metavar="SPEC", default=None,
                   help="[schema.]table[:id_column:value_column:key_id_column], repeatable "
                        "(default secrets:id:value:key_id)")
    if kek:
        k = p.add_argument_group("key-encryption key")
        k.add_argument("--kek-env", default="ROTATION_OPERATOR_KEK", metavar="NAME",
                       help="environment variable holding the KEK: 32 raw bytes, 64 hex "
                            "characters or base64 (default ROTATION_OPERATOR_KEK)")
        k.add_argument("--kek-file", type=Path, metavar="PATH",
                       help="file holding the KEK (overrides --kek-env)")
        k.add_argument("--kek", metavar="SOURCE",
                       help="the KEK from a source (overrides both): file:PATH, env:NAME, or "
                            "pkcs11:module=PATH,token=LABEL,key=LABEL,pin-env=NAME (or "
                            "pin-file=PATH) for a key that never leaves an HSM")
        k.add_argument("--previous-kek", action="append", metavar="SOURCE",
                       help="a KEK that wrapped the keys before (repeatable, same forms): "
                            "read during a rekey; verify also tries it on legacy rows the "
                            "key ring does not read")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _lag(value: str) -> float:
    try:
        return parse_duration(value, "maxReplicationLag").total_seconds()
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError("policy versions start at 1")
    return number
