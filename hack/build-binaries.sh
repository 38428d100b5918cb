#!/usr/bin/env bash
# Build the test control plane from upstream Go modules: etcd, kube-apiserver, kube-controller-manager,
# kubectl and helm. No Docker and no release downloads: everything comes through the Go module proxy.
#
# Outputs (never committed), keyed by version so several versions can coexist:
#   $FT_CACHE/k8s/<ver>/bin/{kube-apiserver,kube-controller-manager,kubectl}
#   $FT_CACHE/etcd/<ver>/bin/etcd
#   $FT_CACHE/helm/<ver>/bin/helm
# A binary that already exists is skipped, so a warm run is a no-op. Go's own caches (GOCACHE, GOMODCACHE)
# stay at their defaults in $HOME so CI runs on the same machine reuse them.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=versions.env
source "$ROOT/hack/versions.env"
FT_CACHE="${FT_CACHE:-$ROOT/.cache}"
export GOFLAGS="${GOFLAGS:-} -mod=mod"
export CGO_ENABLED=0

log() { printf '[build-binaries %(%H:%M:%S)T] %s\n' -1 "$*"; }
elapsed() { echo "$(($(date +%s) - $1))s"; }

command -v go >/dev/null || { log "go is not on PATH; install Go >= 1.24 (https://go.dev/dl/)"; exit 1; }

# --- Kubernetes -------------------------------------------------------------------------------------------
# k8s.io/kubernetes is not meant to be a dependency: its go.mod requires every staging module at v0.0.0 and
# replaces them with ./staging paths, which are ignored outside its own module. A tiny wrapper module
# re-points each staging module to the matching published v0.<minor>.<patch> tag.
k8s_module() {
  local dir="$1" kver="$2" stage_ver="v0.${2#v1.}"
  local kmod
  mkdir -p "$dir"
  go mod download "k8s.io/kubernetes@$kver"
  kmod="$(go env GOMODCACHE)/cache/download/k8s.io/kubernetes/@v/$kver.mod"
  {
    echo "module ftdevcluster/k8sbuild"
    echo
    echo "go 1.24.0"
    echo
    echo "require k8s.io/kubernetes $kver"
    echo
    echo "replace ("
    grep -E '^\s*k8s\.io/[a-z0-9-]+ => \./staging/' "$kmod" |
      awk -v v="$stage_ver" '{printf "\t%s => %s %s\n", $1, $1, v}'
    echo ")"
  } >"$dir/go.mod"
  # A blank import of a library package keeps `go mod tidy` honest about what we need.
  cat >"$dir/tools.go" <<'EOF'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver/app"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	_ "k8s.io/kubectl/pkg/cmd"
)
EOF
  (cd "$dir" && go mod tidy -e >/dev/null 2>&1 || true)
}

k8s_ldflags() {
  local kver="$1" major minor ld="-s -w"
  major="${kver#v}"; major="${major%%.*}"
  minor="$(echo "$kver" | cut -d. -f2)"
  for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    ld+=" -X $pkg.gitVersion=$kver -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    ld+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  done
  echo "$ld"
}

build_k8s() {
  local kver="$KUBERNETES_VERSION"
  local out="$FT_CACHE/k8s/$kver/bin" src="$FT_CACHE/k8s/$kver/src"
  local missing=()
  for b in kube-apiserver kube-controller-manager kubectl; do
    [[ -x "$out/$b" ]] || missing+=("$b")
  done
  if ((${#missing[@]} == 0)); then
    log "kubernetes $kver: up to date ($out)"
    return
  fi
  local t0
  t0=$(date +%s)
  log "kubernetes $kver: preparing wrapper module in $src"
  k8s_module "$src" "$kver"
  log "kubernetes $kver: module ready ($(elapsed "$t0"))"
  mkdir -p "$out"
  local ld
  ld="$(k8s_ldflags "$kver")"
  for b in "${missing[@]}"; do
    local t1
    t1=$(date +%s)
    log "building $b $kver (cold builds take many minutes on 2 cores) ..."
    (cd "$src" && go build -trimpath -ldflags "$ld" -o "$out/$b.tmp" "k8s.io/kubernetes/cmd/$b")
    mv "$out/$b.tmp" "$out/$b"
    log "built $b in $(elapsed "$t1")"
  done
}

# --- etcd -------------------------------------------------------------------------------------------------
# etcd's own main module uses replace directives, so `go install` of it fails; a wrapper main calling
# etcdmain.Main is exactly what upstream's main.go does.
build_etcd() {
  local ever="$ETCD_VERSION"
  local out="$FT_CACHE/etcd/$ever/bin" src="$FT_CACHE/etcd/$ever/src"
  if [[ -x "$out/etcd" ]]; then
    log "etcd $ever: up to date ($out)"
    return
  fi
  local t0
  t0=$(date +%s)
  log "building etcd $ever ..."
  mkdir -p "$src" "$out"
  cat >"$src/go.mod" <<EOF
module ftdevcluster/etcdbuild

go 1.24.0

require go.etcd.io/etcd/server/v3 $ever
EOF
  cat >"$src/main.go" <<'EOF'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF
  (cd "$src" && go mod tidy >/dev/null &&
    go build -trimpath -ldflags "-s -w" -o "$out/etcd.tmp" .)
  mv "$out/etcd.tmp" "$out/etcd"
  log "built etcd in $(elapsed "$t0")"
}

# --- helm -------------------------------------------------------------------------------------------------
build_helm() {
  local hver="$HELM_VERSION"
  local out="$FT_CACHE/helm/$hver/bin"
  if [[ -x "$out/helm" ]]; then
    log "helm $hver: up to date ($out)"
    return
  fi
  local t0
  t0=$(date +%s)
  log "building helm $hver ..."
  mkdir -p "$out"
  GOFLAGS="" GOBIN="$out" go install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$hver" "helm.sh/helm/v3/cmd/helm@$hver"
  log "built helm in $(elapsed "$t0")"
}

T0=$(date +%s)
targets=("$@")
((${#targets[@]})) || targets=(etcd k8s helm minio)
for t in "${targets[@]}"; do
  case "$t" in
    etcd) build_etcd ;;
    k8s) build_k8s ;;
    helm) build_helm ;;
    kueue) bash "$ROOT/hack/build-kueue.sh" ;;
    minio)
      if [[ -f "$ROOT/hack/build-minio.sh" ]]; then
        bash "$ROOT/hack/build-minio.sh"
      fi
      ;;
    *) log "unknown target $t (etcd|k8s|helm|minio)"; exit 2 ;;
  esac
done
log "all binaries ready in $(elapsed "$T0")"
