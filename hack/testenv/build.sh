#!/usr/bin/env bash
# Build the test control plane (etcd, kube-apiserver, kubectl) from the Go modules pinned
# in this folder's go.mod, into a cache outside the repo keyed by the Kubernetes version
# and a hash of go.mod/go.sum, so the second run costs nothing.
#
# Prints the directory holding the binaries on stdout (everything else goes to stderr).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
kube_version="$(awk '$1 == "k8s.io/kubernetes" {print $2; exit}' "$here/go.mod")"
[[ -n "$kube_version" ]] || { echo "build.sh: no k8s.io/kubernetes line in go.mod" >&2; exit 1; }
key="$(cat "$here/go.mod" "$here/go.sum" "$here/cmd/etcd/main.go" "$0" | sha256sum | cut -c1-12)"
cache_root="${ROTATION_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rotation-operator}"
out="$cache_root/testenv/$kube_version-$key"

if [[ -x "$out/kube-apiserver" && -x "$out/etcd" && -x "$out/kubectl" ]]; then
  echo "$out"
  exit 0
fi

command -v go >/dev/null || { echo "build.sh: Go is required to build the control plane" >&2; exit 1; }
minor="${kube_version#v1.}"; minor="${minor%%.*}"
pkg=k8s.io/component-base/version
cgpkg=k8s.io/client-go/pkg/version
ldflags="-s -w"
for p in "$pkg" "$cgpkg"; do
  ldflags+=" -X $p.gitVersion=$kube_version -X $p.gitMajor=1 -X $p.gitMinor=$minor"
  ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
done

tmp="$out.tmp.$$"
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
cd "$here"
export CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -mod=mod -trimpath"
start=$SECONDS
echo "build.sh: building etcd, kube-apiserver, kubectl $kube_version into $out (cold build takes minutes)" >&2
go build -ldflags "$ldflags" -o "$tmp/etcd" ./cmd/etcd
go build -ldflags "$ldflags" -o "$tmp/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
go build -ldflags "$ldflags" -o "$tmp/kubectl" k8s.io/kubernetes/cmd/kubectl
rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
echo "build.sh: built in $((SECONDS - start))s" >&2
echo "$out"
