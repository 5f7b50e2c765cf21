"""Operator settings: one typed place, filled from flags/env, applied at ``on.startup``."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

from rotation_operator.rotation.inspection import EXACT_BELOW


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


@dataclass(frozen=True)
class OperatorSettings:
    #: Namespaces to watch; empty = the whole cluster (needs a ClusterRole).
    namespaces: tuple[str, ...] = ()
    #: Seconds between count refreshes (applications write between rotations).
    refresh_interval: float = 60.0
    #: Minimum seconds between progress writes to status during a rotation.
    progress_interval: float = 2.0
    #: Seconds between looks at a rotating policy (paused? deleted?) between batches.
    control_interval: float = 2.0
    #: Kopf liveness endpoint (``/healthz``); empty disables it.
    liveness: str = "http://0.0.0.0:8080/healthz"
    #: Port of the Prometheus metrics endpoint; 0 disables it.
    metrics_port: int = 9090
    #: ``json`` or ``plain`` logs.
    log_format: str = "plain"
    verbose: bool = False
    #: Upper bound on the retry delay after a retryable error (``None``: each error's
    #: own delay, 10-120 s).  Lower it where a fixed Secret or RBAC rule should heal fast.
    max_retry_delay: float | None = None
    #: Seconds between the cheap looks at what a failed reconcile waits for (a referenced
    #: Secret, the row it stopped on) and at the Secrets of healthy policies.
    recheck_interval: float = 5.0
    #: Seconds between exact counts in the refresh (between them, counts come from the
    #: statistics for tables over ``exact_count_below`` rows: no full scan every minute).
    exact_count_interval: float = 3600.0
    #: Heaps up to this many rows are always counted exactly.
    exact_count_below: int = EXACT_BELOW
    #: Run without Kopf peering (leader election, when on, decides who acts instead).
    standalone: bool = True
    #: Of several replicas only the holder of a coordination.k8s.io Lease acts
    #: (``leader.py``); off: this process always acts (one replica, or the CLI's tests).
    leader_election: bool = False
    lease_namespace: str = "rotation-operator"
    lease_name: str = "rotation-operator"
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0


def _seconds(minimum: float, inclusive: bool) -> Any:
    def parse(text: str) -> float:
        value = float(text)
        if value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(
                f"must be {'at least' if inclusive else 'more than'} {minimum:g} seconds")
        return value
    return parse


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--namespace", action="append", default=None, metavar="NS",
                   help="watch only this namespace (repeatable; default: all namespaces, "
                        "env WATCH_NAMESPACES comma-separated)")
    p.add_argument("--refresh-interval", type=_seconds(0, inclusive=False), default=None,
                   metavar="SECONDS",
                   help="seconds between count refreshes (default 60, env REFRESH_INTERVAL)")
    p.add_argument("--progress-interval", type=_seconds(0, inclusive=True), default=None,
                   metavar="SECONDS",
                   help="minimum seconds between progress updates in status (default 2)")
    p.add_argument("--control-interval", type=_seconds(0, inclusive=False), default=None,
                   metavar="SECONDS",
                   help="seconds between looks at a rotating policy for spec.rotation.paused "
                        "or deletion (default 2)")
    p.add_argument("--max-retry-delay", type=_seconds(0, inclusive=False), default=None,
                   metavar="SECONDS",
                   help="cap on the delay before retrying after a retryable error (default: "
                        "the error's own, 10-120 s; env MAX_RETRY_DELAY)")
    p.add_argument("--recheck-interval", type=_seconds(0, inclusive=False), default=None,
                   metavar="SECONDS",
                   help="seconds between looks at the Secrets a policy references (and the "
                        "row a failed rotation stopped on): a change retries at once "
                        "(default 5)")
    p.add_argument("--exact-count-interval", type=_seconds(0, inclusive=True), default=None,
                   metavar="SECONDS",
                   help="seconds between exact row counts in the refresh; between them, "
                        "tables over --exact-count-below rows are estimated from the "
                        "planner's statistics (default 3600)")
    p.add_argument("--exact-count-below", type=int, default=None, metavar="ROWS",
                   help="tables (heaps) up to this many rows are always counted exactly "
                        f"(default {EXACT_BELOW})")
    le = p.add_argument_group("high availability (see docs/operations.md)")
    le.add_argument("--leader-elect", action="store_true", default=None,
                    help="run as one of several replicas: only the holder of a Lease acts, "
                         "the others wait as standbys (env LEADER_ELECT=true)")
    le.add_argument("--lease-namespace", default=None, metavar="NS",
                    help="namespace of the Lease (default: env POD_NAMESPACE, else "
                         "rotation-operator)")
    le.add_argument("--lease-name", default=None, metavar="NAME",
                    help="name of the Lease (default rotation-operator)")
    le.add_argument("--lease-duration", type=_seconds(0, inclusive=False), default=None,
                    metavar="SECONDS",
                    help="how long a leader's Lease holds without renewal (default 15): "
                         "the longest failover after the leader dies")
    le.add_argument("--renew-deadline", type=_seconds(0, inclusive=False), default=None,
                    metavar="SECONDS",
                    help="a leader that could not renew for this long stops (default 10; "
                         "below --lease-duration)")
    le.add_argument("--retry-period", type=_seconds(0, inclusive=False), default=None,
                    metavar="SECONDS",
                    help="seconds between renewals and between a standby's attempts "
                         "(default 2)")
    p.add_argument("--liveness", default=None, metavar="URL",
                   help="liveness endpoint (default http://0.0.0.0:8080/healthz; '' disables)")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="Prometheus metrics port (default 9090; 0 disables)")
    p.add_argument("--log-format", choices=("plain", "json"), default=None,
                   help="log format: plain (one line each: time, logger, level, "
                        "[namespace/name], message) or json (default plain, env LOG_FORMAT)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def from_args(args: argparse.Namespace) -> OperatorSettings:
    namespaces = args.namespace or [
        n.strip() for n in os.environ.get("WATCH_NAMESPACES", "").split(",") if n.strip()]
    liveness = args.liveness if args.liveness is not None else os.environ.get(
        "LIVENESS_ENDPOINT", OperatorSettings.liveness)
    return OperatorSettings(
        namespaces=tuple(namespaces),
        # ``is not None``, not ``or``: --progress-interval 0 (publish every batch) is valid.
        refresh_interval=args.refresh_interval if args.refresh_interval is not None
        else _env_float("REFRESH_INTERVAL", 60.0),
        progress_interval=args.progress_interval if args.progress_interval is not None
        else _env_float("PROGRESS_INTERVAL", 2.0),
        control_interval=args.control_interval if args.control_interval is not None
        else _env_float("CONTROL_INTERVAL", 2.0),
        max_retry_delay=args.max_retry_delay if args.max_retry_delay is not None
        else (_env_float("MAX_RETRY_DELAY", 0.0) or None),
        recheck_interval=args.recheck_interval if args.recheck_interval is not None
        else _env_float("RECHECK_INTERVAL", 5.0),
        exact_count_interval=args.exact_count_interval
        if args.exact_count_interval is not None
        else _env_float("EXACT_COUNT_INTERVAL", 3600.0),
        exact_count_below=args.exact_count_below if args.exact_count_below is not None
        else int(os.environ.get("EXACT_COUNT_BELOW", str(EXACT_BELOW))),
        liveness=liveness,
        metrics_port=args.metrics_port if args.metrics_port is not None else int(
            os.environ.get("METRICS_PORT", "9090")),
        log_format=args.log_format or os.environ.get("LOG_FORMAT", "plain"),
        verbose=args.verbose,
        leader_election=bool(args.leader_elect) if args.leader_elect is not None
        else os.environ.get("LEADER_ELECT", "").lower() in ("1", "true", "yes"),
        lease_namespace=args.lease_namespace or os.environ.get("POD_NAMESPACE")
        or OperatorSettings.lease_namespace,
        lease_name=args.lease_name or OperatorSettings.lease_name,
        lease_duration=args.lease_duration if args.lease_duration is not None
        else OperatorSettings.lease_duration,
        renew_deadline=args.renew_deadline if args.renew_deadline is not None
        else OperatorSettings.renew_deadline,
        retry_period=args.retry_period if args.retry_period is not None
        else OperatorSettings.retry_period,
    )


#: The settings in force; the runner sets them before the handlers module is imported
#: (Kopf reads the timer interval at decoration time).
current = OperatorSettings()


def apply(settings: OperatorSettings) -> None:
    global current
    current = settings
