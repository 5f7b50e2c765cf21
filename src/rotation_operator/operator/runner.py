"""``rotation-operator run``: configure logging, the Kubernetes client and metrics, then
hand over to ``kopf.run`` (standalone: one replica, no peering objects needed)."""

from __future__ import annotations

import argparse
import logging

import kopf
import kubernetes
from prometheus_client import start_http_server

from . import settings as operator_settings


def _load_kube_config() -> None:
    try:
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()  # type: ignore[no-untyped-call]  # $KUBECONFIG or ~/.kube/config


def run_operator(args: argparse.Namespace) -> int:
    settings = operator_settings.from_args(args)
    operator_settings.apply(settings)
    kopf.configure(verbose=settings.verbose,
                   log_format=kopf.LogFormat.JSON if settings.log_format == "json"
                   else kopf.LogFormat.PLAIN)
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    _load_kube_config()
    from . import handlers  # noqa: F401 - registers the handlers with settings applied

    if settings.metrics_port:
        start_http_server(settings.metrics_port)
    kopf.run(
        standalone=settings.standalone,
        clusterwide=not settings.namespaces,
        namespaces=list(settings.namespaces),
        liveness_endpoint=settings.liveness or None,
    )
    return 0
