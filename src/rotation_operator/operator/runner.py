"""``rotation-operator run``: configure logging, the Kubernetes client and metrics, take
the leader Lease when several replicas run (``leader.py``), then hand over to
``kopf.run`` (standalone: no Kopf peering objects; the Lease decides who acts)."""

from __future__ import annotations

import argparse
import http.server
import logging
import os
import sys
import threading
import urllib.parse

import kopf
import kubernetes
from prometheus_client import start_http_server

from rotation_operator.operator import leader, logs, metrics
from rotation_operator.operator import settings as operator_settings

log = logging.getLogger(__name__)


def _load_kube_config() -> None:
    try:
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()  # type: ignore[no-untyped-call]  # $KUBECONFIG or ~/.kube/config


class _StandbyHealth:
    """``/healthz`` while this replica waits to lead (Kopf serves it once it runs): a
    standby is alive, and must not be restarted by its liveness probe."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        path = parts.path or "/healthz"

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                ok = self.path.split("?")[0] == path
                self.send_response(200 if ok else 404)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                if ok:
                    self.wfile.write(b'{"standby": true}')

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(
            (parts.hostname or "0.0.0.0", parts.port or 8080), Handler)  # noqa: S104 - as Kopf
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _lost(why: str) -> None:
    """The Lease is gone: stop acting at once (exit; the pod restarts as a standby)."""
    log.error("stopped leading: %s; exiting so that this replica restarts as a standby", why)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(1)


def run_operator(args: argparse.Namespace) -> int:
    settings = operator_settings.from_args(args)
    operator_settings.apply(settings)
    kopf.configure(verbose=settings.verbose,
                   log_format=kopf.LogFormat.JSON if settings.log_format == "json"
                   else kopf.LogFormat.FULL, log_prefix=settings.log_format != "json")
    logs.configure()
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    _load_kube_config()
    from rotation_operator.operator import handlers  # noqa: F401 - registers the handlers with settings applied

    if settings.metrics_port:
        start_http_server(settings.metrics_port)
    elector = None
    if not settings.leader_election:
        metrics.LEADER.set(1)  # one replica: it always acts
    else:
        try:
            cfg = leader.LeaseConfig(settings.lease_namespace, settings.lease_name,
                                     lease_duration=settings.lease_duration,
                                     renew_deadline=settings.renew_deadline,
                                     retry_period=settings.retry_period)
        except ValueError as exc:
            print(f"rotation-operator: error: {exc}", file=sys.stderr)
            return 2
        elector = leader.LeaderElector(cfg)
        health = _StandbyHealth(settings.liveness) if settings.liveness else None
        try:
            elector.acquire()
        finally:
            if health is not None:
                health.close()
        elector.keep(_lost)
    try:
        kopf.run(
            standalone=settings.standalone,
            clusterwide=not settings.namespaces,
            namespaces=list(settings.namespaces),
            liveness_endpoint=settings.liveness or None,
        )
    finally:
        if elector is not None:
            elector.release()
    return 0
