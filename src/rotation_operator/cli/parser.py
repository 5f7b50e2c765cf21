"""The ``rotation-operator`` command: the operator (``run``) and break-glass tools.

``init``, ``status``, ``rotate`` and ``verify`` drive the same engine as the operator, for
non-Kubernetes use and emergencies.  Secrets never travel as argument values (they would
show in ``ps`` and shell history): the DSN and the KEK come from a file or an environment
variable *named* by a flag.  Nothing here prints key material or plaintext.

Exit codes: 0 success; 1 the operation failed (a row did not decrypt, verify found
problems); 2 bad input (flags, spec, KEK format, wrong KEK); 3 try again later (database
unreachable, another rotation holds the lock).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rotation_operator import __version__
from rotation_operator.crypto import codec
from rotation_operator.crypto.kek import Kek, SecretKek
from rotation_operator.errors import (
    AuditChainError,
    ConfigError,
    DatabaseForbidden,
    InternalError,
    KekError,
    KeyInUse,
    RotationCancelled,
    RotationOperatorError,
    RotationPaused,
    RotationStuck,
    RowDecryptError,
    TriggerInterference,
    UnknownKeyError,
)
from rotation_operator.policy.config import (
    DEFAULT_BATCH,
    DEFAULT_BATCH_BYTES,
    MODES,
    RotationOptions,
    StoreConfig,
    Target,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_RETRY, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
log = logging.getLogger("rotation_operator.cli.commands")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run":  # Kopf configures its own logging
        from rotation_operator.operator.runner import run_operator
        return run_operator(args)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        result: int = args.func(args)
        return result
    except KeyboardInterrupt:
        print("interrupted; an online rotation resumes where it stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        error = as_package_error(exc)
        print(f"error: {error} [{error.reason}]", file=sys.stderr)
        return exit_code(error)


def as_package_error(exc: BaseException) -> RotationOperatorError:
    """Any exception as the package's error, sanitized (psycopg's DETAIL never shows)."""
    if isinstance(exc, RotationOperatorError):
        return exc
    import psycopg

    from rotation_operator.store.database import translate
    if isinstance(exc, psycopg.Error):
        return translate(exc)
    log.debug("unexpected error", exc_info=exc)
    return InternalError(f"unexpected {type(exc).__name__} (a bug; rerun with -v for the "
                         "traceback in the log)")


#: Problems with the data itself: a human must look at rows.
_DATA_ERRORS = (RowDecryptError, UnknownKeyError, AuditChainError, RotationStuck,
                TriggerInterference, KeyInUse)


def exit_code(exc: RotationOperatorError) -> int:
    """0 ok, 1 failed (data), 2 bad input or setup, 3 try again later."""
    if isinstance(exc, _DATA_ERRORS):
        return EXIT_FAILED
    if isinstance(exc, ConfigError | KekError | DatabaseForbidden):
        return EXIT_USAGE
    if isinstance(exc, RotationPaused | RotationCancelled):
        return EXIT_RETRY
    return EXIT_RETRY if exc.retryable else EXIT_FAILED


# -- argument parsing --------------------------------------------------------------------
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
    init.set_defaults(func=cmd_init)

    status = sub.add_parser("status", help="show keys, counts and the last rotation "
                                           "(read-only, needs no KEK)")
    _store_args(status, kek=False)
    status.add_argument("-o", "--output", choices=("table", "json"), default="table")
    status.add_argument("--exact", action="store_true",
                        help="count every row (a full scan of each target); by default "
                             "tables over 100000 rows are estimated from the planner's "
                             "statistics, and the output says which")
    status.set_defaults(func=cmd_status)

    rotate = sub.add_parser("rotate", help="rotate to a new DEK and re-encrypt every row")
    _store_args(rotate, kek=True)
    rotate.add_argument("--policy-version", type=_positive, metavar="N",
                        help="the policy version this rotation serves, as a spec.version bump "
                             "would (a version already served does nothing); without it, a "
                             "manual rotation that uses up no policy version")
    _rotation_args(rotate)
    rotate.add_argument("--mode", choices=MODES, default="Online",
                        help="Online (default): batches, applications keep writing; "
                             "Atomic: rows move in one transaction, writes wait")
    rotate.add_argument("--grace", type=float, default=2.0, metavar="SECONDS",
                        help="wait this long after the new key is committed before the "
                             "handover: more than the applications' key-ring max_age "
                             "(default 2)")
    rotate.add_argument("--handover-timeout", type=float, default=300.0, metavar="SECONDS",
                        help="how long the handover waits for transactions open at its start "
                             "(default 300); rows they commit later are swept")
    rotate.set_defaults(func=cmd_rotate)

    sweep = sub.add_parser("sweep", help="move rows found under a retired key onto the "
                                         "active key (no new key)")
    _store_args(sweep, kek=True)
    _rotation_args(sweep)
    sweep.set_defaults(func=cmd_sweep)

    rekey = sub.add_parser("rekey", help="rewrap every DEK under the current KEK (--kek...), "
                                         "unwrapping with --previous-kek; legacy rows move "
                                         "onto a DEK first")
    _store_args(rekey, kek=True)
    _rotation_args(rekey)
    rekey.set_defaults(func=cmd_rekey)

    keys = sub.add_parser("keys", help="the end of a key's life: plan (dry run), disable, "
                                       "enable, destroy (break-glass; needs no KEK)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    plan = keys_sub.add_parser("plan", help="what a retention policy would disable or destroy, "
                                            "and when (changes nothing but the census)")
    plan.add_argument("--disable-after-days", type=int, metavar="N",
                      help="retired keys with no row for N days are disabled (>= 7)")
    plan.add_argument("--destroy-after-days", type=int, default=7, metavar="N",
                      help="disabled keys are destroyed N days later (>= 7, default 7)")
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
    keys.set_defaults(func=cmd_keys)

    verify = sub.add_parser("verify", help="decrypt every row and check the audit chain "
                                           "(read-only); exit 1 on any failure")
    _store_args(verify, kek=True)
    verify.add_argument("-o", "--output", choices=("text", "json"), default="text")
    verify.set_defaults(func=cmd_verify)
    return p


def _rotation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, metavar="N",
                   help=f"rows per batch (default {DEFAULT_BATCH})")
    p.add_argument("--max-batch-bytes", type=int, default=DEFAULT_BATCH_BYTES, metavar="N",
                   help=f"value bytes per batch at most (default {DEFAULT_BATCH_BYTES})")
    p.add_argument("--workers", type=int, default=2, metavar="N",
                   help="processes re-encrypting in parallel in online mode, for tables "
                        "of more than 16 batches (default 2; 1..8)")
    p.add_argument("--lock-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="longest wait for a lock per statement (default 5; 0 = forever)")
    p.add_argument("--statement-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="longest run of one statement (default 600; 0 = no limit)")
    t = p.add_argument_group("throttling (online batches; see README \"Throttling\")")
    t.add_argument("--max-rows-per-second", type=int, default=0, metavar="N",
                   help="rows per second over all workers (default 0 = no limit)")
    t.add_argument("--max-replication-lag", type=_lag, default=None, metavar="DURATION",
                   help="pause while a streaming replica replays more than this behind "
                        "(e.g. 10s; the role needs pg_monitor)")
    t.add_argument("--max-blocked-sessions", type=int, default=None, metavar="N",
                   help="back off after a batch kept more than N application sessions "
                        "waiting on its locks")
    p.add_argument("--no-vacuum", action="store_true",
                   help="skip VACUUM (ANALYZE) of the targets afterwards")
    p.add_argument("--wait-lock", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for another rotation to finish (default 0)")
    p.add_argument("--actor", default=None, help="recorded as rotated_by (default cli:$USER)")
    p.add_argument("-o", "--output", choices=("text", "json"), default="text")


def _options(args: argparse.Namespace) -> RotationOptions:
    return RotationOptions(mode=getattr(args, "mode", "Online"), batch_size=args.batch_size,
                           vacuum=not args.no_vacuum, workers=args.workers,
                           grace=getattr(args, "grace", 2.0),
                           max_batch_bytes=args.max_batch_bytes,
                           lock_timeout=args.lock_timeout,
                           statement_timeout=args.statement_timeout,
                           handover_timeout=getattr(args, "handover_timeout", 300.0),
                           max_rows_per_second=args.max_rows_per_second,
                           max_replication_lag=args.max_replication_lag,
                           max_blocked_sessions=args.max_blocked_sessions)


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
                            "read during a rekey")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


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


def _kek(args: argparse.Namespace) -> Kek:
    """The current KEK: ``--kek SOURCE``, or ``--kek-file`` / ``--kek-env``."""
    if args.kek:
        return kek_source(args.kek, "--kek")
    if args.kek_file:
        return _kek_from_file(args.kek_file, "--kek-file")
    return _kek_from_env(args.kek_env, "--kek-env")


def _previous(args: argparse.Namespace) -> list[Kek]:
    return [kek_source(text, "--previous-kek") for text in (args.previous_kek or [])]


def _kek_from_file(path: Path, flag: str) -> Kek:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise KekError(f"cannot read {flag} {path}: {exc.strerror}") from None
    _warn_if_text(raw, f"{flag} {path}")
    return SecretKek(codec.parse_kek(raw, f"{flag} {path}"), f"{flag} {path}")


def _kek_from_env(name: str, flag: str) -> Kek:
    value = os.environb.get(name.encode(), b"")
    if not value:
        raise KekError(f"no KEK: set ${name} or pass --kek-file / --kek SOURCE")
    _warn_if_text(value, f"${name}")
    return SecretKek(codec.parse_kek(value, f"${name}"), f"${name}")


def _warn_if_text(raw: bytes, source: str) -> None:
    if codec.kek_looks_like_text(raw):
        print(f"warning: the KEK from {source} is 32 printable characters, taken as raw "
              "bytes: a passphrase-like key is weak; generate one with "
              "`openssl rand -base64 32`", file=sys.stderr)


def kek_source(text: str, flag: str) -> Kek:
    """A KEK from a source spec: ``file:PATH``, ``env:NAME``, or
    ``pkcs11:module=PATH,token=LABEL,key=LABEL,pin-env=NAME`` (or ``pin-file=PATH``)."""
    kind, _, rest = text.partition(":")
    if kind == "file" and rest:
        return _kek_from_file(Path(rest), flag)
    if kind == "env" and rest:
        return _kek_from_env(rest, flag)
    if kind == "pkcs11":
        fields = dict(part.partition("=")[::2] for part in rest.split(",") if part)
        missing = [f for f in ("module", "token", "key") if not fields.get(f)]
        if missing or not (fields.get("pin-env") or fields.get("pin-file")):
            raise ConfigError(f"{flag} pkcs11:... needs module=, token=, key= and pin-env= or "
                              f"pin-file= (missing: {', '.join(missing) or 'the PIN'})")
        from rotation_operator.crypto.pkcs11 import Pkcs11Kek
        return Pkcs11Kek(fields["module"], fields["token"], fields["key"], _pin(fields, flag))
    raise ConfigError(f"{flag} {text.split(':', 1)[0]!r}...: expected file:PATH, env:NAME or "
                      "pkcs11:module=...,token=...,key=...,pin-env=...")


def _pin(fields: dict[str, str], flag: str) -> bytes:
    if fields.get("pin-file"):
        try:
            return Path(fields["pin-file"]).read_bytes().strip()
        except OSError as exc:
            raise KekError(f"cannot read the PIN file of {flag}: {exc.strerror}") from None
    value = os.environb.get(fields["pin-env"].encode(), b"").strip()
    if not value:
        raise KekError(f"no PIN: set ${fields['pin-env']} for {flag}")
    return value


def _config(args: argparse.Namespace) -> StoreConfig:
    targets = [Target.parse(t) for t in (args.target or ["secrets"])]
    return StoreConfig(targets, args.keys_table, args.schema)


def _actor(args: argparse.Namespace) -> str:
    return getattr(args, "actor", None) or f"cli:{os.environ.get('USER', 'unknown')}"


# -- commands ----------------------------------------------------------------------------
def cmd_init(args: argparse.Namespace) -> int:
    from rotation_operator.rotation.engine import Engine

    res = Engine(_dsn(args), _config(args), _kek(args), actor=_actor(args),
                 previous=_previous(args)).initialise(args.policy_version)
    print(f"active key v{res.active_version}" + (" (created)" if res.created_key else "")
          + (f"; served policy version {res.served_version}"
             if res.served_version is not None else ""))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from rotation_operator.rotation.inspection import snapshot

    snap = snapshot(_dsn(args), _config(args), exact=args.exact)
    data = snapshot_dict(snap)
    if args.output == "json":
        print(json.dumps(data, indent=2, default=str))
        return EXIT_OK
    print(f"active key: v{snap.active_version}   served policy version: {snap.served_version}")
    print(f"secrets: {snap.secret_count}   legacy: {snap.legacy_count}   "
          f"stale: {snap.stale_count}   under retired keys: {snap.retired_count}   "
          f"audit events: {snap.audit_events}")
    print("counts: exact" if snap.exact else
          "counts: estimated from the planner's statistics (--exact counts every row)")
    print(f"\n{'VERSION':<8} {'STATE':<9} {'ROWS':>10}  {'CREATED':<25} ROTATED BY")
    for k in snap.keys:
        print(f"v{k.version:<7} {k.state:<9} {k.rows:>10}  {k.created_at:%Y-%m-%d %H:%M:%S%z}"
              f"{'':<1}  {k.rotated_by}")
    if snap.running:
        r = snap.running
        print(f"\nrotation to v{r.to_version} is RUNNING (interrupted or in progress): "
              f"{r.re_encrypted}/{r.total} rows; run `rotate` again to resume")
    elif snap.retired_count:
        print(f"\n{snap.retired_count} rows are under a retired key: run `sweep`")
    return EXIT_OK


def snapshot_dict(snap: Any) -> dict[str, Any]:
    return {
        **snap.summary(),
        "targets": [vars(t) for t in snap.targets],
        "running": _record(snap.running),
        "lastRotation": _record(snap.last_rotation),
    }


def _record(r: Any) -> dict[str, Any] | None:
    from rotation_operator.rotation.inspection import rfc3339

    if r is None:
        return None
    return {"policyVersion": r.requested_version, "kind": r.kind, "phase": r.phase,
            "mode": r.mode,
            "fromVersion": r.from_version, "toVersion": r.to_version,
            "reEncrypted": r.re_encrypted, "total": r.total,
            "startedAt": rfc3339(r.started_at), "finishedAt": rfc3339(r.finished_at)}


class _ProgressBar:
    """A one-line progress bar on a TTY; silent otherwise (pipelines read the result)."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.start = time.monotonic()
        self.reason: str | None = None

    def __call__(self, done: int, total: int) -> None:
        if not self.tty:
            return
        frac = done / total if total else 1.0
        rate = done / max(time.monotonic() - self.start, 1e-6)
        bar = "#" * int(frac * 30)
        sys.stderr.write(f"\r[{bar:<30}] {done}/{total} rows {rate:,.0f} rows/s")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")

    def throttled(self, reason: str | None, message: str, lag: float | None) -> None:
        """One stderr line when the rotation starts or stops waiting for a limit."""
        if reason == self.reason:
            return
        self.reason = reason
        line = f"throttled: {message}" if reason else "throttle: resumed"
        sys.stderr.write(("\r" if self.tty else "") + line + "\n")
        sys.stderr.flush()


def _lag(value: str) -> float:
    from rotation_operator.errors import ConfigError
    from rotation_operator.policy.config import parse_duration

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


def cmd_rotate(args: argparse.Namespace) -> int:
    from rotation_operator.rotation.engine import Engine

    engine = Engine(_dsn(args), _config(args), _kek(args), actor=_actor(args),
                    previous=_previous(args))
    bar = _ProgressBar()
    try:
        res = engine.rotate(args.policy_version, _options(args), progress=bar,
                            lock_wait=args.wait_lock, throttled=bar.throttled)
    finally:
        bar.close()
    return _print_result(args, res)


def cmd_rekey(args: argparse.Namespace) -> int:
    from rotation_operator.policy.decisions import Request
    from rotation_operator.rotation.engine import Engine

    current = _kek(args)
    engine = Engine(_dsn(args), _config(args), current, actor=_actor(args),
                    previous=_previous(args))
    res = engine.execute(Request("rekey"), _options(args), lock_wait=args.wait_lock)
    if args.output == "json":
        print(json.dumps({"rewrapped": list(res.rekeyed), "kekFingerprint": current.fingerprint,
                          "activeKeyVersion": res.to_version}))
    elif res.rekeyed:
        print(f"rewrapped DEK {', '.join(f'v{v}' for v in res.rekeyed)} under the KEK "
              f"{current.fingerprint} ({current.describe()}); the previous KEKs are no longer "
              "needed")
    else:
        print(f"every DEK is wrapped by the KEK {current.fingerprint} already: nothing to do")
    return EXIT_OK


def cmd_keys(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime, timedelta

    from rotation_operator.policy.decisions import Retention
    from rotation_operator.rotation.lifecycle import MIN_DAYS, Lifecycle

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
        retention = None
        if args.disable_after_days is not None:
            if min(args.disable_after_days, args.destroy_after_days) < MIN_DAYS:
                raise ConfigError(f"retention periods are at least {MIN_DAYS} days")
            retention = Retention(timedelta(days=args.disable_after_days),
                                  timedelta(days=args.destroy_after_days))
        outcome = life.run(retention, now, apply=False, record=not assumed)
        steps = [{"version": s.version, "action": s.action, "due": s.due.isoformat(),
                  "ready": s.ready} for s in outcome.plan]
        if args.output == "json":
            print(json.dumps({"steps": steps}))
        else:
            for step in outcome.plan:
                when = "now" if step.ready else f"from {step.due:%Y-%m-%d %H:%M %Z}"
                print(f"v{step.version}: {step.action} {when}")
            if not outcome.plan:
                print("nothing would be disabled or destroyed")
        return EXIT_OK
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
    done = {"disable": "disabled (undo with `keys enable`; nothing destroys it but `keys "
                       f"destroy {args.version}` from {MIN_DAYS} days on, or a policy's "
                       "spec.retention)",
            "enable": "enabled", "destroy": "destroyed"}[command]
    print(f"DEK v{args.version} {done}")
    return EXIT_OK


def cmd_sweep(args: argparse.Namespace) -> int:
    from rotation_operator.rotation.engine import Engine

    engine = Engine(_dsn(args), _config(args), _kek(args), actor=_actor(args),
                    previous=_previous(args))
    bar = _ProgressBar()
    try:
        res = engine.sweep(_options(args), progress=bar, lock_wait=args.wait_lock,
                           throttled=bar.throttled)
    finally:
        bar.close()
    return _print_result(args, res)


def _print_result(args: argparse.Namespace, res: Any) -> int:
    from rotation_operator.policy.decisions import Action

    decision = res.decision
    if args.output == "json":
        data = {k: v for k, v in vars(res).items() if k != "decision"}
        data["decision"] = None if decision is None else {
            "action": decision.action.value, "reason": decision.reason,
            "message": decision.message}
        print(json.dumps(data, default=list))
    elif not res.performed:
        print(f"{decision.message if decision else 'nothing to do'}: active key "
              f"v{res.to_version}, nothing done")
    elif res.kind == "sweep":
        print(f"swept {res.re_encrypted} rows from retired keys onto v{res.to_version} "
              f"in {res.seconds:.2f}s")
    else:
        rate = res.re_encrypted / res.seconds if res.seconds else 0
        what = "manual rotation" if res.kind == "manual" else \
            f"policy version {res.requested_version}"
        print(f"rotated v{res.from_version} -> v{res.to_version} ({res.mode}, {what}"
              f"{', resumed' if res.resumed else ''}): {res.re_encrypted} rows re-encrypted "
              f"({res.legacy_migrated} legacy) in {res.seconds:.2f}s ({rate:,.0f} rows/s); "
              f"retired {', '.join(f'v{v}' for v in res.retired) or 'none'}")
        handover = res.handover or {}
        if handover:
            print(f"  handover: waited {handover.get('graceSeconds', 0)}s of grace and for "
                  f"{handover.get('transactions', 0)} open transactions"
                  + (f" (timed out with {handover['stillOpen']} still open)"
                     if handover.get("timedOut") else "")
                  + f"; {res.caught_in_handover} rows written under old keys were caught")
        if res.swept_after:
            print(f"  {res.swept_after} rows arrived under a retired key as it finished: "
                  "swept")
        for table, (before, after) in res.table_sizes.items():
            print(f"  {table}: {before / 1e6:.1f} MB before, {after / 1e6:.1f} MB after VACUUM")
        if res.vacuum_skipped:
            print(f"  VACUUM skipped (role does not own): {', '.join(res.vacuum_skipped)}")
    if decision is not None and decision.action in (Action.BEHIND, Action.PAUSED):
        return EXIT_USAGE
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from rotation_operator.rotation.inspection import verify

    rep = verify(_dsn(args), _config(args), [_kek(args), *_previous(args)])
    if args.output == "json":
        print(json.dumps({"ok": rep.ok, "rows": rep.rows, "legacy": rep.legacy,
                          "perKey": rep.per_key, "failures": rep.failures,
                          "underRetiredKeys": rep.retired,
                          "auditEvents": rep.audit_events, "auditHead": rep.audit_head,
                          "auditError": rep.audit_error}))
    else:
        keys = ", ".join(f"{k}: {n}" for k, n in sorted(rep.per_key.items()))
        print(f"rows: {rep.rows} ({keys or 'none'}); failed to decrypt: {len(rep.failures)}")
        for f in rep.failures[:20]:
            print(f"  FAIL {f['table']} id={f['id']} key_id={f['key_id']}")
        if rep.retired:
            under = ", ".join(f"{k}: {n}" for k, n in sorted(rep.retired.items()))
            print(f"rows under retired keys: {under} (run `sweep`, or let the operator's "
                  "refresh sweep them)")
        chain = f"BROKEN: {rep.audit_error}" if rep.audit_error else \
            f"ok (head {rep.audit_head[:16]})"
        print(f"audit chain: {rep.audit_events} events, {chain}")
        print("verify: OK" if rep.ok else "verify: FAILED")
    return EXIT_OK if rep.ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
