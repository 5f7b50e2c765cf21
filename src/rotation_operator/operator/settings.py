"""Operator settings: one typed place, filled from flags/env, applied at ``on.startup``."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any


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
    #: Seconds between exact counts in the refresh (between them, counts come from the
    #: statistics for tables over ``exact_count_below`` rows: no full scan every minute).
    exact_count_interval: float = 3600.0
    #: Heaps up to this many rows are always counted exactly.
    exact_count_below: int = 100_000
    #: Run without Kopf peering (one replica; the Deployment uses ``Recreate``).
    standalone: bool = True


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
    p.add_argument("--exact-count-interval", type=_seconds(0, inclusive=True), default=None,
                   metavar="SECONDS",
                   help="seconds between exact row counts in the refresh; between them, "
                        "tables over --exact-count-below rows are estimated from the "
                        "planner's statistics (default 3600)")
    p.add_argument("--exact-count-below", type=int, default=None, metavar="ROWS",
                   help="tables (heaps) up to this many rows are always counted exactly "
                        "(default 100000)")
    p.add_argument("--liveness", default=None, metavar="URL",
                   help="liveness endpoint (default http://0.0.0.0:8080/healthz; '' disables)")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="Prometheus metrics port (default 9090; 0 disables)")
    p.add_argument("--log-format", choices=("plain", "json"), default=None,
                   help="log format (default plain, env LOG_FORMAT)")
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
        exact_count_interval=args.exact_count_interval
        if args.exact_count_interval is not None
        else _env_float("EXACT_COUNT_INTERVAL", 3600.0),
        exact_count_below=args.exact_count_below if args.exact_count_below is not None
        else int(os.environ.get("EXACT_COUNT_BELOW", "100000")),
        liveness=liveness,
        metrics_port=args.metrics_port if args.metrics_port is not None else int(
            os.environ.get("METRICS_PORT", "9090")),
        log_format=args.log_format or os.environ.get("LOG_FORMAT", "plain"),
        verbose=args.verbose,
    )


#: The settings in force; the runner sets them before the handlers module is imported
#: (Kopf reads the timer interval at decoration time).
current = OperatorSettings()


def apply(settings: OperatorSettings) -> None:
    global current
    current = settings
