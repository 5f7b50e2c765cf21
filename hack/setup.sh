#!/usr/bin/env bash
# What `make demo`, `make test` and `make lint` need, installed only where missing, so that
# those two commands are all a fresh Debian 12 machine needs (Go >= 1.25, Python 3.11 and
# make preinstalled): Debian's packages (as root, or through sudo) and the project venv
# (re-installed when pyproject.toml changed).  Quiet when everything is there.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

as_root() {
  if [[ $EUID -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

need=()
# postgresql: the harness's server and its streaming standby (pg_ctl, pg_basebackup)
compgen -G "/usr/lib/postgresql/*/bin/pg_basebackup" >/dev/null || need+=(postgresql)
# python3-venv: `python3.11 -m venv` on Debian
python3.11 -c "import ensurepip" 2>/dev/null || need+=(python3-venv)
# softhsm2: the PKCS#11 token of the HSM tests and the bench
command -v softhsm2-util >/dev/null || need+=(softhsm2)
# prometheus: promtool (rules check and unit tests) and a real server (the scrape test)
{ command -v prometheus >/dev/null && command -v promtool >/dev/null; } || need+=(prometheus)
if ((${#need[@]})); then
  echo "setup: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update
  as_root apt-get install -y --no-install-recommends "${need[@]}"
fi

command -v go >/dev/null || { echo "setup: Go (>= 1.25) is required to build the control plane" >&2; exit 1; }

stamp=.venv/.installed
if [[ ! -x .venv/bin/python || ! -f $stamp || pyproject.toml -nt $stamp ]]; then
  echo "setup: creating the venv (.venv) and installing the project with its dev tools" >&2
  python3.11 -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e '.[dev]'
  touch "$stamp"
fi
