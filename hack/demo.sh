#!/usr/bin/env bash
# make demo: a real rotation on a local control plane + PostgreSQL, start to finish.
# Builds (or reuses) the control plane, starts it, runs the operator as its own
# least-privilege identity, rotates once through kubectl, and proves nothing was lost.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
STATE=${DEMO_DIR:-$PWD/.demo}
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

cleanup() {
  [[ -n "${OP_PID:-}" ]] && kill "$OP_PID" 2>/dev/null && wait "$OP_PID" 2>/dev/null || true
  "$PY" hack/testenv/testenv.py down --dir "$STATE" >/dev/null 2>&1 || true
}
trap cleanup EXIT

step "control plane (etcd + kube-apiserver + kubectl, built from Go modules, cached) and PostgreSQL"
"$PY" hack/testenv/testenv.py down --dir "$STATE" >/dev/null 2>&1 || true
"$PY" hack/testenv/testenv.py up --dir "$STATE"
# shellcheck disable=SC1091
source "$STATE/env"
export KUBECACHEDIR="$STATE/kube-cache"
k() { "$KUBECTL" "$@"; }
k version

step "an application database owned by role demo_app, and the operator's role rotation_operator (neither a superuser; grants from docs/database-roles.md)"
ADMIN_URL="${DATABASE_URL%/*}/demo"
psql "$DATABASE_URL" -qc "CREATE ROLE demo_app LOGIN" -c "CREATE ROLE rotation_operator LOGIN" \
  -c "CREATE DATABASE demo OWNER demo_app"
psql "$ADMIN_URL" -q -c "GRANT USAGE, CREATE ON SCHEMA public TO rotation_operator" \
  -c "ALTER DEFAULT PRIVILEGES FOR ROLE rotation_operator IN SCHEMA public GRANT SELECT ON TABLES TO demo_app"
APP_URL="${ADMIN_URL/\/\/postgres@/\/\/demo_app@}"
OPERATOR_URL="${ADMIN_URL/\/\/postgres@/\/\/rotation_operator@}"
export DATABASE_URL="$APP_URL"   # the application's role, for demo_app.py

step "1000 legacy secrets (encrypted with the KEK directly), written by the application"
"$PY" -c "import os; open('$STATE/kek', 'w').write(os.urandom(32).hex())"
"$PY" hack/demo_app.py seed --rows 1000 --kek-file "$STATE/kek"

step "install: CRD, namespace, ServiceAccount, least-privilege RBAC (kubectl apply -k manifests/)"
k apply -k manifests/
k wait --for=condition=Established crd/encryptionpolicies.rotation-operator.io --timeout=60s
k create namespace demo
k -n demo create secret generic app-kek --from-file=kek="$STATE/kek"
k -n demo create secret generic app-db --from-literal=dsn="$OPERATOR_URL"

step "run the operator as system:serviceaccount:rotation-operator:rotation-operator (not admin)"
KUBECONFIG="$OPERATOR_KUBECONFIG" .venv/bin/rotation-operator run --liveness "" \
  --metrics-port 0 --refresh-interval 5 --progress-interval 0.5 >"$STATE/operator.log" 2>&1 &
OP_PID=$!

step "apply the EncryptionPolicy (version 1): the operator creates DEK v1"
for _ in 1 2 3 4 5 6 7 8 9 10; do k -n demo apply -f manifests/samples/encryptionpolicy.yaml && break; sleep 1; done
k -n demo wait encpol/app --for=condition=Ready --timeout=60s
"$PY" hack/demo_app.py write --rows 200 --kek-file "$STATE/kek"
k -n demo wait encpol/app --for=jsonpath='{.status.secretCount}'=1200 --timeout=30s
k -n demo get encpol

step "rotate like a pipeline: kubectl patch spec.version=2, then kubectl wait"
k -n demo patch encpol app --type=merge -p '{"spec":{"version":2}}'
k -n demo wait encpol/app --for=jsonpath='{.status.observedVersion}'=2 --timeout=300s
k -n demo wait encpol/app --for=condition=Ready --timeout=60s
k -n demo get encpol -o wide

step "status: keys (the retired one is kept), rotation, events"
k -n demo get encpol app -o jsonpath='{range .status.keys[*]}  v{.version} {.state} rows={.rows} rotatedBy="{.rotatedBy}"{"\n"}{end}'
k -n demo get encpol app -o jsonpath='  rotation: {.status.rotation.message}{"\n"}'
k -n demo get events --field-selector involvedObject.name=app

step "proof: every secret still decrypts to what was written; audit chain intact"
"$PY" hack/demo_app.py check --kek-file "$STATE/kek"
DATABASE_URL="$OPERATOR_URL" .venv/bin/rotation-operator verify --kek-file "$STATE/kek"
printf '\n\033[1mdemo OK\033[0m\n'
