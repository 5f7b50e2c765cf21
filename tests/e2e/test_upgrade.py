"""Upgrade from the first release (0.1.0, commit af70917) on the real control plane: its
CRD, its operator and its keys-table schema.  The old operator initialises a policy and
rotates once; then the current CRD and operator take over the same object and database.
The object must still validate, be reconciled, and rotate again, every row readable."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

from tests.fixtures._env import REPO_ROOT, testenv
from tests.fixtures.fix_cluster import Kubectl
from tests.fixtures.fix_operator import (
    CRD_NAME,
    MakeApp,
    OperatorProcess,
    StartOperator,
)

OLD = "af70917"  # 0.1.0 as it landed


def _old_tree(dest: Path) -> Path:
    """``src/`` and ``crds/`` of the first release, from this repository's history."""
    proc = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", "--format=tar", OLD,
                           "src", "crds"], capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4
            tar.extractall(dest, filter="data")
        else:  # our own history: trusted
            tar.extractall(dest)
    return dest


def _apply_crd(kubectl: Kubectl, path: Path) -> None:
    kubectl("apply", "-f", str(path))
    kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")


def test_an_object_and_a_database_of_the_first_release_are_taken_over(
        namespace: str, dsn: str, kubectl: Kubectl, make_app: MakeApp,
        start_operator: StartOperator, control_plane: testenv.ControlPlane,
        tmp_path: Path) -> None:
    old = _old_tree(tmp_path / "old")
    _apply_crd(kubectl, old / "crds" / "encryptionpolicy.yaml")
    try:
        app = make_app(namespace, dsn, rows=200, legacy=200)  # keys made by the old one
        port = testenv.free_port()
        health = f"http://127.0.0.1:{port}/healthz"
        env = {"KUBECONFIG": str(control_plane.operator_kubeconfig), "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": str(old / "src"), "PATH": "/usr/bin:/bin"}
        argv = [sys.executable, "-c", "import sys; from rotation_operator.cli import main; "
                "sys.exit(main())", "run", "--liveness", health, "--metrics-port", "0",
                "--refresh-interval", "2", "--max-retry-delay", "2", "-n", namespace]
        first = OperatorProcess(argv, env, tmp_path / "old-operator.log", health)
        try:
            first.wait_healthy()
            app.wait_condition("Ready", "True")
            app.patch_spec({"version": 2})
            obj = app.wait_condition("Ready", "True", "RotationSucceeded", timeout=90)
            assert obj["status"]["observedVersion"] == 2
        finally:
            first.stop()
        with app.connect() as conn:  # the old schema: no meta table yet
            row = conn.execute("SELECT to_regclass('encryption_keys_meta') IS NULL").fetchone()
        assert row is not None and row[0], "the first release's schema was expected"
    finally:
        _apply_crd(kubectl, REPO_ROOT / "crds" / "encryptionpolicy.yaml")

    start_operator([namespace])
    obj = app.wait_condition("Ready", "True", timeout=60)
    assert obj["status"]["observedVersion"] == 2
    assert [k["version"] for k in obj["status"]["keys"]] == [1, 2]
    app.patch_spec({"version": 3})
    obj = app.wait_condition("Ready", "True", "RotationSucceeded", timeout=90)
    assert obj["status"]["observedVersion"] == 3 and obj["status"]["activeKeyVersion"] == 3
    assert obj["status"]["counts"]["kind"] == "Exact"
    app.assert_intact()
