#!/usr/bin/env python3
"""Real test environment: etcd + kube-apiserver (+ kubectl) and a PostgreSQL server.

The operator is only trustworthy if it is tested against the real things it talks to, so
this module starts the real binaries (built from pinned Go modules by ``build.sh``, and
the distribution's PostgreSQL) on loopback ports in a state directory, and tears them down
without leaving processes behind.

Used two ways:

* imported by the pytest fixtures (``tests/fixtures``), which start private instances per
  test session, or attach to a running ``up`` environment;
* as a CLI for interactive work::

      python hack/testenv/testenv.py up [--dir DIR] [--durable]
      source .testenv/env
      python hack/testenv/testenv.py down [--dir DIR]

Beyond the standard library it uses ``cryptography``, ``psutil`` (process groups) and
``trustme`` (test certificates), all in the project's dev dependencies (``make venv``).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
DEFAULT_STATE_DIR = REPO_ROOT / ".testenv"
STATE_FILE = "testenv.json"
ENV_FILE = "env"

OPERATOR_NAMESPACE = "rotation-operator"
OPERATOR_SERVICE_ACCOUNT = "rotation-operator"
OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SERVICE_ACCOUNT}"
OPERATOR_GROUPS = (
    "system:serviceaccounts",
    f"system:serviceaccounts:{OPERATOR_NAMESPACE}",
    "system:authenticated",
)
ADMIN_USER = "admin"
ADMIN_GROUPS = ("system:masters",)

_DB_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class TestEnvError(RuntimeError):
    """A component of the test environment failed to build, start or stop."""


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    """Return a currently free loopback TCP port.

    There is an unavoidable window between closing the probe socket and the server
    binding it; on a test box that race is rare enough to accept.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log_tail(path: Path, lines: int = 40) -> str:
    """Last lines of a log file, for error messages that explain why a server died."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def build_binaries() -> Path:
    """Run ``build.sh`` (cached after the first run) and return the bin directory.

    ``TESTENV_BIN`` short-circuits the build, so callers that already ran it (``make
    test``) do not pay even the cache check twice.
    """
    env_bin = os.environ.get("TESTENV_BIN")
    if env_bin:
        bin_dir = Path(env_bin)
        if all((bin_dir / b).is_file() for b in ("etcd", "kube-apiserver", "kubectl")):
            return bin_dir
        raise TestEnvError(f"TESTENV_BIN={env_bin} does not hold etcd, kube-apiserver, kubectl")
    # build.sh has no lock of its own: serialise concurrent callers (parallel sessions,
    # `up` during a test run) so a cold build runs once and the others reuse its result.
    cache_root = Path(
        os.environ.get("ROTATION_OPERATOR_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rotation-operator"
    )
    cache_root.mkdir(parents=True, exist_ok=True)
    with open(cache_root / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.run(
            [str(HERE / "build.sh")], stdout=subprocess.PIPE, text=True, check=False
        )
    if proc.returncode != 0:
        raise TestEnvError(f"hack/testenv/build.sh failed with exit code {proc.returncode}")
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise TestEnvError("hack/testenv/build.sh printed no bin directory")
    return Path(lines[-1])


def _same_process(proc: psutil.Process, create_time: float | None, binary: str) -> bool:
    """True if ``proc`` is the live process a pidfile recorded (guards against pid reuse).

    The start time is fixed at fork and survives ``execve``, so it identifies the process
    from its first instant; its name or ``cmdline`` do not (during ``execve`` there is a
    window in which ``/proc/PID/cmdline`` reads empty, longer when the binary is not in
    the page cache).  Pidfiles written before start times were recorded fall back to the
    name, which is safe for a process that started long ago.
    """
    try:
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        if create_time is not None:
            return abs(proc.create_time() - create_time) < 0.01
        return bool(proc.name() == binary[:15])
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True


def _group_members(pgid: int) -> list[psutil.Process]:
    """Every live process of process group ``pgid`` (a server and whatever it spawned)."""
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (OSError, psutil.Error):
            continue
    return members


@dataclass
class _Server:
    """One detached server process.

    For a process this object started, its ``Popen`` is the truth about whether it lives.
    The pidfile (pid and start time) serves ``down`` and attaching from another
    invocation.
    """

    name: str
    binary: str
    pidfile: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        """Start ``argv`` in its own session (own process group), logging to a file.

        ``start_new_session`` detaches it from the caller's terminal and lets
        ``stop`` kill the whole group; stdin/stdout are not pipes, so a parent such as
        ``make`` does not wait for them after the CLI exits.
        """
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=dict(env) if env is not None else None,
            )
        try:
            create_time: float | None = psutil.Process(self.proc.pid).create_time()
        except psutil.Error:  # exited at once: the pidfile still names it for `down`
            create_time = None
        self.pidfile.write_text(json.dumps({"pid": self.proc.pid, "create_time": create_time})
                                + "\n")

    def _recorded(self) -> tuple[int, float | None] | None:
        """(pid, start time) from the pidfile; start time None for the old plain format."""
        try:
            data = json.loads(self.pidfile.read_text())
        except (OSError, ValueError):
            return None
        if isinstance(data, int):
            return data, None
        if isinstance(data, dict) and isinstance(data.get("pid"), int):
            ct = data.get("create_time")
            return data["pid"], float(ct) if isinstance(ct, int | float) else None
        return None

    def pid(self) -> int | None:
        """The server's pid (ours, or the one recorded), or None if there is none."""
        if self.proc is not None:
            return self.proc.pid
        recorded = self._recorded()
        return recorded[0] if recorded else None

    def _process(self) -> psutil.Process | None:
        """The live server process, or None if it is gone."""
        if self.proc is not None:
            if self.proc.poll() is not None:
                return None
            try:
                return psutil.Process(self.proc.pid)
            except psutil.NoSuchProcess:
                return None
        recorded = self._recorded()
        if recorded is None:
            return None
        try:
            proc = psutil.Process(recorded[0])
        except psutil.NoSuchProcess:
            return None
        return proc if _same_process(proc, recorded[1], self.binary) else None

    def running(self) -> bool:
        """True if the server process is alive (and, from a pidfile, really is ours)."""
        return self._process() is not None

    def check_alive(self) -> None:
        """Raise with the exit status and log tail if the server died during startup."""
        if not self.running():
            code = self.proc.returncode if self.proc is not None else None
            status = f" with exit code {code}" if code is not None else ""
            raise TestEnvError(
                f"{self.name} exited during startup{status}; log tail:\n{log_tail(self.log)}"
            )

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the server's process group, SIGKILL what lingers, and check that not
        one member of the group is left; then forget its pid."""
        proc = self._process()
        if proc is not None:
            pgid = proc.pid  # a session leader: its pid is the group id
            _signal_group(pgid, signal.SIGTERM)
            _, alive = psutil.wait_procs(_group_members(pgid), timeout=timeout)
            if alive:
                _signal_group(pgid, signal.SIGKILL)
                _, alive = psutil.wait_procs(_group_members(pgid), timeout=5)
            if alive:
                raise TestEnvError(
                    f"{self.name}: processes {[p.pid for p in alive]} survived SIGKILL")
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)  # reap it: no zombie left behind
            self.proc = None
        self.pidfile.unlink(missing_ok=True)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


# --------------------------------------------------------------------------- certificates


def generate_pki(cert_dir: Path) -> dict[str, Path]:
    """Create a throwaway CA (trustme), the apiserver serving cert and the SA key pair.

    The serving cert carries the SANs clients use on loopback (127.0.0.1, localhost) so
    kubectl and the Python client verify TLS for real instead of skipping verification.
    The service-account signing pair is a plain RSA key, not a certificate.
    """
    cert_dir.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="rotation-operator testenv")
    server = ca.issue_cert("127.0.0.1", "10.0.0.1", "localhost", "kubernetes",
                           "kubernetes.default.svc", common_name="kube-apiserver")
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    paths = {
        "ca": cert_dir / "ca.crt",
        "serving_cert": cert_dir / "apiserver.crt",
        "serving_key": cert_dir / "apiserver.key",
        "sa_key": cert_dir / "sa.key",
        "sa_pub": cert_dir / "sa.pub",
    }
    ca.cert_pem.write_to_path(str(paths["ca"]))
    server.cert_chain_pems[0].write_to_path(str(paths["serving_cert"]))
    server.private_key_pem.write_to_path(str(paths["serving_key"]))
    paths["sa_key"].write_bytes(sa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    paths["sa_pub"].write_bytes(sa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    for key in ("serving_key", "sa_key"):
        paths[key].chmod(0o600)
    return paths


# --------------------------------------------------------------------------- control plane


class ControlPlane:
    """etcd + kube-apiserver on loopback, with an admin and an unprivileged operator identity.

    No controller-manager, scheduler or kubelet run: the operator only needs the API
    (CRDs, CEL validation, status subresources, RBAC, watches), and everything it relies
    on is served by the apiserver itself. Consequences: namespaces never finish
    terminating and nothing garbage-collects owner references.
    """

    def __init__(self, state_dir: Path, bin_dir: Path | None = None) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.bin_dir = Path(bin_dir).resolve() if bin_dir is not None else None
        self.etcd_client_port = 0
        self.etcd_peer_port = 0
        self.apiserver_port = 0
        self.admin_token = ""
        self.operator_token = ""
        self._etcd = _Server("etcd", "etcd", self.state_dir / "etcd.pid",
                             self.state_dir / "etcd.log")
        self._apiserver = _Server("kube-apiserver", "kube-apiserver",
                                  self.state_dir / "kube-apiserver.pid",
                                  self.state_dir / "kube-apiserver.log")

    # -- paths clients need -------------------------------------------------------------

    @property
    def server(self) -> str:
        """HTTPS URL of the apiserver."""
        return f"https://127.0.0.1:{self.apiserver_port}"

    @property
    def ca_file(self) -> Path:
        """CA bundle that verifies the apiserver's serving certificate."""
        return self.state_dir / "pki" / "ca.crt"

    @property
    def kubeconfig(self) -> Path:
        """Kubeconfig of the ``admin`` identity (group system:masters)."""
        return self.state_dir / "kubeconfig"

    @property
    def operator_kubeconfig(self) -> Path:
        """Kubeconfig of the operator's service-account identity, which has no RBAC."""
        return self.state_dir / "kubeconfig-operator"

    @property
    def kubectl(self) -> Path:
        """The kubectl built alongside the apiserver (same version)."""
        return self._bin("kubectl")

    @property
    def etcd_url(self) -> str:
        """etcd client URL (the apiserver's storage)."""
        return f"http://127.0.0.1:{self.etcd_client_port}"

    def _bin(self, name: str) -> Path:
        if self.bin_dir is None:
            raise TestEnvError("ControlPlane has no bin_dir")
        return self.bin_dir / name

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Generate credentials, start etcd then the apiserver, wait until it is ready."""
        if self.bin_dir is None:
            self.bin_dir = build_binaries()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.etcd_client_port = free_port()
        self.etcd_peer_port = free_port()
        self.apiserver_port = free_port()
        self.admin_token = secrets.token_hex(24)
        self.operator_token = secrets.token_hex(24)
        pki = generate_pki(self.state_dir / "pki")
        token_file = self.state_dir / "tokens.csv"
        token_file.write_text(
            f'{self.admin_token},{ADMIN_USER},admin-uid,"{",".join(ADMIN_GROUPS)}"\n'
            f'{self.operator_token},{OPERATOR_USER},operator-uid,"{",".join(OPERATOR_GROUPS)}"\n'
        )
        token_file.chmod(0o600)
        try:
            self._start_etcd(timeout)
            self._start_apiserver(pki, token_file, timeout)
        except BaseException:
            self.stop()
            raise
        self._write_kubeconfig(self.kubeconfig, "admin", self.admin_token)
        self._write_kubeconfig(self.operator_kubeconfig, "rotation-operator", self.operator_token)

    def _start_etcd(self, timeout: float) -> None:
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        self._etcd.start(
            [
                str(self._bin("etcd")),
                "--name=testenv",
                f"--data-dir={self.state_dir / 'etcd-data'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=testenv={peer}",
                "--initial-cluster-state=new",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ]
        )
        self._wait(self._etcd, f"{self.etcd_url}/health", timeout,
                   ok=lambda body: '"health":"true"' in body.replace(" ", ""))

    def _start_apiserver(self, pki: dict[str, Path], token_file: Path, timeout: float) -> None:
        self._apiserver.start(
            [
                str(self._bin("kube-apiserver")),
                f"--etcd-servers={self.etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.apiserver_port}",
                f"--cert-dir={self.state_dir / 'apiserver-certs'}",
                f"--tls-cert-file={pki['serving_cert']}",
                f"--tls-private-key-file={pki['serving_key']}",
                f"--token-auth-file={token_file}",
                "--authorization-mode=RBAC",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki['sa_pub']}",
                f"--service-account-signing-key-file={pki['sa_key']}",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--disable-admission-plugins=ServiceAccount",
                "--enable-priority-and-fairness=false",
                "--profiling=false",
                "--v=1",
            ]
        )
        self._wait(self._apiserver, f"{self.server}/readyz", timeout, ok=lambda b: b == "ok")
        # The apiserver creates `default` from a post-start controller; /readyz does not
        # cover it, and tests (and kubectl without -n) rely on it.
        self._wait(self._apiserver, f"{self.server}/api/v1/namespaces/default", timeout,
                   ok=lambda b: '"name":"default"' in b.replace(" ", ""))

    def _ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def _get(self, url: str, timeout: float = 5.0) -> tuple[int, str]:
        req = urllib.request.Request(url)  # noqa: S310 - loopback URL built by us
        context = None
        if url.startswith("https://"):
            req.add_header("Authorization", f"Bearer {self.admin_token}")
            context = self._ssl_context()
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:  # noqa: S310
                return int(resp.status), resp.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return int(e.code), e.read().decode(errors="replace")

    def _wait(self, server: _Server, url: str, timeout: float, ok: Any) -> None:
        """Poll ``url`` until ``ok(body)`` holds; fail fast with the log if the server dies."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while True:
            server.check_alive()
            try:
                status, body = self._get(url)
                if status == 200 and ok(body.strip()):
                    return
                last = f"HTTP {status}: {body.strip()[:500]}"
            except (OSError, ssl.SSLError) as e:
                last = repr(e)
            if time.monotonic() > deadline:
                raise TestEnvError(
                    f"{server.name} not ready at {url} after {timeout:.0f}s ({last}); "
                    f"log tail:\n{log_tail(server.log)}"
                )
            time.sleep(0.2)

    def _write_kubeconfig(self, path: Path, user: str, token: str) -> None:
        """Write a kubeconfig; JSON is valid YAML, and json.dumps quotes everything safely."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "testenv",
                    "cluster": {"server": self.server, "certificate-authority": str(self.ca_file)},
                }
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": user, "context": {"cluster": "testenv", "user": user}}],
            "current-context": user,
            "preferences": {},
        }
        path.write_text(json.dumps(config, indent=2) + "\n")
        path.chmod(0o600)

    def running(self) -> bool:
        """True if both servers recorded in the state dir are alive."""
        return self._etcd.running() and self._apiserver.running()

    def ready(self) -> bool:
        """True if the apiserver answers /readyz with ok."""
        try:
            status, body = self._get(f"{self.server}/readyz", timeout=3)
        except (OSError, ssl.SSLError):
            return False
        return status == 200 and body.strip() == "ok"

    def stop(self) -> None:
        """Stop the apiserver first (it is etcd's only client), then etcd."""
        errors: list[BaseException] = []
        for srv in (self._apiserver, self._etcd):
            try:
                srv.stop()
            except TestEnvError as e:
                errors.append(e)
        if errors:
            raise TestEnvError("; ".join(str(e) for e in errors))

    # -- persistence for `up` / reuse --------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """Everything needed to attach to this control plane from another process."""
        return {
            "bin_dir": str(self.bin_dir),
            "etcd_client_port": self.etcd_client_port,
            "etcd_peer_port": self.etcd_peer_port,
            "apiserver_port": self.apiserver_port,
            "admin_token": self.admin_token,
            "operator_token": self.operator_token,
        }

    @classmethod
    def from_state(cls, state_dir: Path, state: Mapping[str, Any]) -> ControlPlane:
        """Attach to a control plane started by another process (e.g. ``up``)."""
        cp = cls(state_dir, Path(state["bin_dir"]))
        cp.etcd_client_port = int(state["etcd_client_port"])
        cp.etcd_peer_port = int(state["etcd_peer_port"])
        cp.apiserver_port = int(state["apiserver_port"])
        cp.admin_token = str(state["admin_token"])
        cp.operator_token = str(state["operator_token"])
        return cp


# --------------------------------------------------------------------------- postgres


def find_pg_bin() -> Path:
    """Directory of the PostgreSQL server binaries (``PG_BIN`` or the newest Debian one)."""
    env = os.environ.get("PG_BIN")
    if env:
        return Path(env)
    candidates = sorted(
        (Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/postgres")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if candidates:
        return candidates[-1]
    found = shutil.which("postgres")
    if found:
        return Path(found).parent
    raise TestEnvError(
        "PostgreSQL server binaries not found: apt-get install postgresql (or set PG_BIN)"
    )


def _runuser() -> str:
    """util-linux's runuser, also when PATH lacks the sbin directories (a scrubbed CI
    environment, a non-login shell)."""
    found = shutil.which("runuser") or shutil.which("runuser", path="/usr/sbin:/sbin")
    if found is None:
        raise TestEnvError("runuser not found (util-linux): it starts PostgreSQL as postgres")
    return found


def _run(argv: Sequence[str], *, as_user: str | None = None, timeout: float = 120,
         check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command (optionally as another OS user) and raise with its output on failure."""
    full = [_runuser(), "-u", as_user, "--", *argv] if as_user else list(argv)
    proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout, input=input,
                          check=False, stdin=None if input is not None else subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise TestEnvError(
            f"{shlex.join(full)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
        )
    return proc


class Postgres:
    """A private PostgreSQL server on 127.0.0.1 with trust auth, data under the state dir.

    ``fast=True`` trades durability for speed (fsync, synchronous_commit and
    full_page_writes off): right for functional tests, wrong for benchmarks, which use
    ``fast=False`` to measure PostgreSQL's real default behaviour.
    """

    def __init__(self, state_dir: Path, *, fast: bool = True, pg_bin: Path | None = None,
                 port: int = 0) -> None:
        self.base = Path(state_dir).resolve() / "postgres"
        self.fast = fast
        self.pg_bin = pg_bin
        self.port = port
        # PostgreSQL refuses to run as root; run it as the distribution's `postgres` user.
        self.os_user = "postgres" if os.geteuid() == 0 else None

    @property
    def data_dir(self) -> Path:
        """PGDATA."""
        return self.base / "data"

    @property
    def socket_dir(self) -> Path:
        """Unix socket directory (kept private instead of the shared /var/run/postgresql)."""
        return self.base / "sock"

    @property
    def log(self) -> Path:
        """Server log written by pg_ctl."""
        return self.base / "postgres.log"

    @property
    def dsn(self) -> str:
        """Superuser DSN of the maintenance database ``postgres``."""
        return self.dsn_for("postgres")

    def dsn_for(self, dbname: str) -> str:
        """Superuser DSN of database ``dbname`` on this server."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def _tool(self, name: str) -> str:
        if self.pg_bin is None:
            self.pg_bin = find_pg_bin()
        return str(self.pg_bin / name)

    def start(self) -> None:
        """initdb on first start, then ``pg_ctl -w start``."""
        if not self.data_dir.joinpath("PG_VERSION").exists():
            self._init()
        self._pg_ctl("start", "-w", "-t", "60", "-l", str(self.log))

    def _make_dirs(self) -> None:
        """The state and socket directories, owned by the server's OS user."""
        self.base.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        if self.os_user:
            pw = pwd.getpwnam(self.os_user)
            for p in (self.base, self.socket_dir):
                os.chown(p, pw.pw_uid, pw.pw_gid)

    def _init(self) -> None:
        if self.port == 0:
            self.port = free_port()
        self._make_dirs()
        if self.os_user:
            probe = _run(["test", "-w", str(self.base)], as_user=self.os_user, check=False)
            if probe.returncode != 0:
                raise TestEnvError(
                    f"user {self.os_user} cannot reach {self.base}: a parent directory is "
                    "not traversable (chmod o+x it or choose another --dir)"
                )
        _run(
            [self._tool("initdb"), "-D", str(self.data_dir), "-U", "postgres",
             "--auth-local=trust", "--auth-host=trust", "-E", "UTF8", "--locale=C.UTF-8",
             "--no-instructions"],
            as_user=self.os_user,
        )
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "max_connections": "200",
            "log_min_messages": "warning",
        }
        if self.fast:
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write("\n# rotation-operator testenv\n")
            conf.writelines(f"{k} = {v}\n" for k, v in settings.items())

    def _pg_ctl(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        try:
            return _run([self._tool("pg_ctl"), "-D", str(self.data_dir), *args],
                        as_user=self.os_user, timeout=timeout)
        except TestEnvError as e:
            raise TestEnvError(f"{e}\nserver log tail:\n{log_tail(self.log)}") from None

    def running(self) -> bool:
        """True if the postmaster of this data directory is alive."""
        if not self.data_dir.exists():
            return False
        proc = _run([self._tool("pg_ctl"), "-D", str(self.data_dir), "status"],
                    as_user=self.os_user, check=False)
        return proc.returncode == 0

    def restart(self) -> None:
        """Fast shutdown then start on the same port and data: simulates a DB restart."""
        self._pg_ctl("stop", "-w", "-m", "fast")
        self._pg_ctl("start", "-w", "-t", "60", "-l", str(self.log))

    def stop(self) -> None:
        """Fast shutdown, falling back to immediate (no checkpoint) if that hangs."""
        if not self.running():
            return
        try:
            self._pg_ctl("stop", "-w", "-t", "30", "-m", "fast", timeout=40)
        except (TestEnvError, subprocess.TimeoutExpired):
            self._pg_ctl("stop", "-w", "-t", "30", "-m", "immediate", timeout=40)

    def start_standby(self, state_dir: Path) -> Postgres:
        """A streaming standby of this server in ``state_dir``: ``pg_basebackup -R`` (the
        primary's default ``wal_level=replica`` and the ``host replication`` trust line
        initdb writes suffice), then its own port and socket, started and caught up."""
        standby = Postgres(state_dir, fast=self.fast, pg_bin=self.pg_bin, port=free_port())
        standby._make_dirs()
        _run([self._tool("pg_basebackup"), "-D", str(standby.data_dir), "-h", "127.0.0.1",
              "-p", str(self.port), "-U", "postgres", "-R", "-X", "stream",
              "--checkpoint=fast", "--no-sync"], as_user=self.os_user, timeout=300)
        with open(standby.data_dir / "postgresql.conf", "a") as conf:
            conf.write("\n# rotation-operator testenv standby\n"
                       f"port = {standby.port}\n"
                       f"unix_socket_directories = '{standby.socket_dir}'\n"
                       "hot_standby = on\n")
        standby._pg_ctl("start", "-w", "-t", "60", "-l", str(standby.log))
        return standby

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL through psql as the superuser (stdlib only, no driver needed)."""
        return psql(self.dsn_for(dbname), sql, pg_bin=Path(self._tool("psql")).parent)

    def create_database(self, name: str, owner: str | None = None) -> str:
        """Create database ``name`` (owned by role ``owner``) and return its DSN."""
        create_database(self.dsn, name, pg_bin=Path(self._tool("psql")).parent, owner=owner)
        return self.dsn_for(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name``, terminating its sessions first (tests may leak connections)."""
        drop_database(self.dsn, name, pg_bin=Path(self._tool("psql")).parent)

    def to_state(self) -> dict[str, Any]:
        """Everything needed to attach to this server from another process."""
        return {"port": self.port, "fast": self.fast, "pg_bin": str(self.pg_bin or find_pg_bin())}

    @classmethod
    def from_state(cls, state_dir: Path, state: Mapping[str, Any]) -> Postgres:
        """Attach to a server started by another process (e.g. ``up``)."""
        return cls(state_dir, fast=bool(state["fast"]), pg_bin=Path(state["pg_bin"]),
                   port=int(state["port"]))


def psql(dsn: str, sql: str, pg_bin: Path | None = None) -> str:
    """Run ``sql`` against ``dsn`` with psql, stopping at the first error; return stdout."""
    tool = str((pg_bin or find_pg_bin()) / "psql")
    proc = _run([tool, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", dsn],
                input=sql, timeout=60)
    return proc.stdout


def _check_db_name(name: str) -> str:
    if not _DB_NAME_RE.match(name):
        raise ValueError(f"invalid test database name {name!r}")
    return name


def create_database(admin_dsn: str, name: str, pg_bin: Path | None = None,
                    owner: str | None = None) -> None:
    """CREATE DATABASE on the server of ``admin_dsn`` (a superuser DSN)."""
    owned = f' OWNER "{_check_db_name(owner)}"' if owner else ""
    psql(admin_dsn, f'CREATE DATABASE "{_check_db_name(name)}"{owned};', pg_bin)


def drop_database(admin_dsn: str, name: str, pg_bin: Path | None = None) -> None:
    """DROP DATABASE ... WITH (FORCE): terminates leftover sessions, then drops."""
    psql(admin_dsn, f'DROP DATABASE IF EXISTS "{_check_db_name(name)}" WITH (FORCE);', pg_bin)


# --------------------------------------------------------------------------- environment


class TestEnv:
    """A control plane and a PostgreSQL server sharing one state directory (the ``up`` CLI)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.control_plane: ControlPlane | None = None
        self.postgres: Postgres | None = None

    @property
    def state_file(self) -> Path:
        """JSON record of ports/tokens/paths, written once everything is up."""
        return self.state_dir / STATE_FILE

    @property
    def env_file(self) -> Path:
        """Shell file exporting KUBECONFIG, DATABASE_URL, ... for ``source``."""
        return self.state_dir / ENV_FILE

    @classmethod
    def load(cls, state_dir: Path) -> TestEnv | None:
        """Attach to the environment recorded in ``state_dir``, or None if there is none."""
        env = cls(state_dir)
        try:
            state = json.loads(env.state_file.read_text())
        except (OSError, ValueError):
            return None
        if "control_plane" in state:
            env.control_plane = ControlPlane.from_state(env.state_dir, state["control_plane"])
        if "postgres" in state:
            env.postgres = Postgres.from_state(env.state_dir, state["postgres"])
        return env

    def running(self) -> bool:
        """True if every recorded component is alive (and the apiserver is ready)."""
        cp, pg = self.control_plane, self.postgres
        if cp is None or pg is None:
            return False
        return cp.running() and cp.ready() and pg.running()

    def start(self, *, fast_postgres: bool = True) -> None:
        """Start both components; on failure stop whatever already started."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.chmod(0o755)  # the postgres OS user must traverse it when we are root
        self.control_plane = ControlPlane(self.state_dir)
        self.postgres = Postgres(self.state_dir, fast=fast_postgres)
        try:
            self.control_plane.start()
            self.postgres.start()
        except BaseException:
            self.stop()
            raise
        state = {
            "control_plane": self.control_plane.to_state(),
            "postgres": self.postgres.to_state(),
        }
        self.state_file.write_text(json.dumps(state, indent=2) + "\n")
        self.state_file.chmod(0o600)
        self.env_file.write_text(self.render_env())

    def render_env(self) -> str:
        """The shell exports that point tools and tests at this environment."""
        cp, pg = self.control_plane, self.postgres
        assert cp is not None and pg is not None
        exports = {
            "TESTENV_DIR": str(self.state_dir),
            "TESTENV_BIN": str(cp.bin_dir),
            "KUBECONFIG": str(cp.kubeconfig),
            "OPERATOR_KUBECONFIG": str(cp.operator_kubeconfig),
            "KUBECTL": str(cp.kubectl),
            "DATABASE_URL": pg.dsn,
        }
        return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in exports.items())

    def stop(self) -> None:
        """Stop PostgreSQL and the control plane; keep going if one of them fails."""
        errors: list[str] = []
        if self.postgres is not None:
            try:
                self.postgres.stop()
            except (TestEnvError, subprocess.TimeoutExpired) as e:
                errors.append(str(e))
        if self.control_plane is not None:
            try:
                self.control_plane.stop()
            except TestEnvError as e:
                errors.append(str(e))
        if errors:
            raise TestEnvError("\n".join(errors))


def _stop_leftovers(state_dir: Path) -> None:
    """Stop servers recorded by pidfiles even if testenv.json was never written."""
    env = TestEnv.load(state_dir) or TestEnv(state_dir)
    if env.control_plane is None:
        env.control_plane = ControlPlane(state_dir)
    if env.postgres is None and (state_dir / "postgres" / "data").exists():
        env.postgres = Postgres(state_dir)
    env.stop()


# --------------------------------------------------------------------------- CLI


def _cmd_up(state_dir: Path, durable: bool) -> int:
    existing = TestEnv.load(state_dir)
    if existing is not None and existing.running():
        print(f"testenv already running in {state_dir}; source {existing.env_file}",
              file=sys.stderr)
        return 0
    if state_dir.exists():
        # A stale or half-started environment: stop its leftovers and start clean.
        _stop_leftovers(state_dir)
        shutil.rmtree(state_dir)
    started = time.monotonic()
    env = TestEnv(state_dir)
    env.start(fast_postgres=not durable)
    assert env.control_plane is not None and env.postgres is not None
    print(
        f"testenv up in {time.monotonic() - started:.1f}s: apiserver {env.control_plane.server}, "
        f"postgres {env.postgres.dsn}\n  source {env.env_file}",
        file=sys.stderr,
    )
    return 0


def _cmd_down(state_dir: Path, keep: bool) -> int:
    if not state_dir.exists():
        print(f"testenv: nothing at {state_dir}", file=sys.stderr)
        return 0
    _stop_leftovers(state_dir)
    if not keep:
        shutil.rmtree(state_dir)
    print(f"testenv down ({state_dir} {'kept' if keep else 'removed'})", file=sys.stderr)
    return 0


def _cmd_env(state_dir: Path) -> int:
    env = TestEnv.load(state_dir)
    if env is None or not env.env_file.exists():
        print(f"testenv: not up in {state_dir} (run `make testenv-up`)", file=sys.stderr)
        return 1
    sys.stdout.write(env.env_file.read_text())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: ``up``, ``down`` and ``env``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("command", choices=["up", "down", "env"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_STATE_DIR,
                        help=f"state directory (default {DEFAULT_STATE_DIR})")
    parser.add_argument("--durable", action="store_true",
                        help="up: PostgreSQL with default durability settings (benchmarks)")
    parser.add_argument("--keep", action="store_true",
                        help="down: keep the state directory (logs, data) after stopping")
    args = parser.parse_args(argv)
    state_dir = args.dir.resolve()
    try:
        if args.command == "up":
            return _cmd_up(state_dir, args.durable)
        if args.command == "down":
            return _cmd_down(state_dir, args.keep)
        return _cmd_env(state_dir)
    except TestEnvError as e:
        print(f"testenv: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

