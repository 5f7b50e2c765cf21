"""What the ``rotation-operator`` command prints: text for people, JSON for pipelines.

Results go to stdout, warnings and progress to stderr.  Nothing here prints key material
or plaintext: the objects printed carry counts, versions, fingerprints and names only.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Any

from rotation_operator.policy.config import MIN_RETENTION_DAYS

if TYPE_CHECKING:  # the engine loads with the command that uses it, not with the parser
    from collections.abc import Mapping

    from rotation_operator.rotation.inspection import Snapshot, VerifyReport
    from rotation_operator.rotation.lifecycle import Outcome
    from rotation_operator.rotation.results import RotationResult


def weak_kek(source: str) -> None:
    """The warning for a KEK whose bytes are 32 printable characters."""
    print(f"warning: the KEK from {source} is 32 printable characters, taken as raw "
          "bytes: a passphrase-like key is weak; generate one with "
          "`openssl rand -base64 32`", file=sys.stderr)


def error(message: str, reason: str) -> None:
    print(f"error: {message} [{reason}]", file=sys.stderr)


def interrupted() -> None:
    print("interrupted; an online rotation resumes where it stopped", file=sys.stderr)


def initialised(active: int, created: bool, served: int | None) -> None:
    print(f"active key v{active}" + (" (created)" if created else "")
          + (f"; served policy version {served}" if served is not None else ""))


def status(snap: Snapshot, fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(snapshot_dict(snap), indent=2, default=str))
        return
    print(f"active key: v{snap.active_version}   served policy version: {snap.served_version}")
    print(f"secrets: {snap.secret_count}   legacy: {snap.legacy_count}   "
          f"stale: {snap.stale_count}   under retired keys: {snap.retired_count}   "
          f"audit events: {snap.audit_events}")
    print("counts: exact" if snap.exact else
          "counts: estimated from the planner's statistics (--exact counts every row)")
    legacy = snap.legacy
    if legacy.migrated:
        print(f"legacy rows: all migrated at {legacy.migrated_at:%Y-%m-%d %H:%M:%S%z}; reads "
              + ("CLOSED (key id NULL is refused)" if legacy.closed else
                 "kept OPEN (--legacy-reads open / spec.legacy.reads: Open)"))
    if snap.late_legacy_count:
        named = ", ".join(f"{t} id={i}" for t, i in snap.late_legacy)
        print(f"late legacy rows (written after the migration): {snap.late_legacy_count} "
              f"({named}); see docs/format.md section 8")
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


def snapshot_dict(snap: Snapshot) -> dict[str, Any]:
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


class ProgressBar:
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


def rotation(res: RotationResult, fmt: str) -> None:
    """A rotation's or a sweep's result."""
    decision = res.decision
    if fmt == "json":
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
              f"in {res.seconds:.2f}s"
              + (f" ({res.legacy_migrated} legacy)" if res.legacy_migrated else ""))
    else:
        _rotated(res)


def _rotated(res: RotationResult) -> None:
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


def rekeyed(rewrapped: tuple[int, ...], fingerprint: str, source: str, active: int,
            fmt: str, protection: Mapping[str, bool] | None = None) -> None:
    """``protection``: a PKCS#11 KEK's ``alwaysSensitive`` and ``neverExtractable``."""
    flags = dict(protection or {})
    if fmt == "json":
        print(json.dumps({"rewrapped": list(rewrapped), "kekFingerprint": fingerprint,
                          "activeKeyVersion": active,
                          **{f"kek{name[0].upper()}{name[1:]}": value
                             for name, value in flags.items()}}))
        return
    if rewrapped:
        print(f"rewrapped DEK {', '.join(f'v{v}' for v in rewrapped)} under the KEK "
              f"{fingerprint} ({source}); the previous KEKs are no longer needed")
    else:
        print(f"every DEK is wrapped by the KEK {fingerprint} already: nothing to do")
    if flags:
        print("  the token says the key is "
              f"{'' if flags.get('alwaysSensitive') else 'not '}always sensitive and "
              f"{'' if flags.get('neverExtractable') else 'not '}never extractable")


def key_plan(outcome: Outcome, fmt: str) -> None:
    if fmt == "json":
        steps = [{"version": s.version, "action": s.action, "due": s.due.isoformat(),
                  "ready": s.ready} for s in outcome.plan]
        print(json.dumps({"steps": steps}))
        return
    for step in outcome.plan:
        when = "now" if step.ready else f"from {step.due:%Y-%m-%d %H:%M %Z}"
        print(f"v{step.version}: {step.action} {when}")
    if not outcome.plan:
        print("nothing would be disabled or destroyed")


def key_changed(command: str, version: int) -> None:
    done = {"disable": "disabled (undo with `keys enable`; nothing destroys it but `keys "
                       f"destroy {version}` from {MIN_RETENTION_DAYS} days on, or a policy's "
                       "spec.retention)",
            "enable": "enabled", "destroy": "destroyed"}[command]
    print(f"DEK v{version} {done}")


def verified(rep: VerifyReport, fmt: str) -> None:
    if fmt == "json":
        print(json.dumps({"ok": rep.ok, "rows": rep.rows, "legacy": rep.legacy,
                          "perKey": rep.per_key, "failures": rep.failures,
                          "underRetiredKeys": rep.retired,
                          "pendingRotation": rep.pending, "rotation": rep.rotation,
                          "underUnusableKeys": rep.unusable,
                          "lateLegacy": rep.late_legacy,
                          "lateLegacyCount": rep.late_legacy_count,
                          "legacyReadableWith": rep.legacy_readable,
                          "auditEvents": rep.audit_events, "auditHead": rep.audit_head,
                          "auditError": rep.audit_error}))
        return
    keys = ", ".join(f"{k}: {n}" for k, n in sorted(rep.per_key.items()))
    print(f"rows: {rep.rows} ({keys or 'none'}); failed to decrypt: {len(rep.failures)}")
    for f in rep.failures[:20]:
        print(f"  FAIL {f['table']} id={f['id']} key_id={f['key_id']}")
    for fingerprint, n in sorted(rep.legacy_readable.items()):
        print(f"legacy rows readable with the presented KEK {fingerprint} (not the ring's): {n}")
    if rep.late_legacy_count:
        print(f"late legacy rows (key_id NULL after every legacy row was migrated): "
              f"{rep.late_legacy_count}")
        for row in rep.late_legacy[:20]:
            opens = f"readable with the KEK {row['readableWith']}" if row["readableWith"] \
                else "no KEK presented opens it"
            print(f"  LATE LEGACY {row['table']} id={row['id']} ({opens})")
        print("  a rollback or an application writing without DEKs: delete or rewrite the "
              "row, or, if it is genuine, move it with `sweep --legacy-kek SOURCE`")
    if rep.retired:
        under = ", ".join(f"{k}: {n}" for k, n in sorted(rep.retired.items()))
        print(f"rows under retired keys: {under} (run `sweep`, or let the operator's "
              "refresh sweep them)")
    if rep.pending and rep.rotation is not None:
        _pending(rep.pending, rep.rotation)
    for name, entry in sorted(rep.unusable.items()):
        way_out = (f"`keys enable {name[1:]}` to read them" if entry["state"] == "disabled"
                   else "its DEK is erased: no one can read them; delete them or have the "
                        "application write them anew")
        print(f"rows under {entry['state']} DEK {name}: {entry['rows']} ({way_out})")
    chain = f"BROKEN: {rep.audit_error}" if rep.audit_error else \
        f"ok (head {rep.audit_head[:16]})"
    print(f"audit chain: {rep.audit_events} events, {chain}")
    print("verify: OK" if rep.ok else "verify: NOT YET (a rotation is running)"
          if rep.in_progress else "verify: FAILED")


def _pending(pending: dict[str, int], rotation: dict[str, Any]) -> None:
    rows = sum(pending.values())
    under = ", ".join(f"{k}: {n}" for k, n in sorted(pending.items()))
    state = "is running" if rotation["inProgress"] else \
        "STOPPED (stuck, paused or interrupted: no rotator holds its lock)"
    what = "verify again once it has finished" if rotation["inProgress"] else \
        "fix what stopped it (the operator's condition or the rotate command says what), " \
        "then run `rotate` again to resume it"
    kind = "sweep" if rotation["kind"] == "sweep" else "rotation"
    print(f"{kind} to v{rotation['toVersion']} {state}: "
          f"{rotation['reEncrypted']} of {rotation['total']} rows moved, {rows} still under "
          f"a non-active key ({under}); {what}")
