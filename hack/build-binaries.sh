#!/usr/bin/env bash
# Build the dev cluster from upstream Go modules: the control plane (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kubectl), the real node (kubelet, kube-proxy, containerd with its
# runc shim and ctr, crictl, CoreDNS), kwok for simulated nodes, and helm. No Docker and no release
# downloads: everything comes through the Go module proxy. runc and the CNI plugins come from Debian
# (hack/apt-deps.sh).
#
# Outputs (never committed), keyed by version so several versions can coexist:
#   $FT_CACHE/k8s/<ver>/bin/{kube-apiserver,kube-controller-manager,kube-scheduler,kubectl,kubelet,kube-proxy}
#   $FT_CACHE/etcd/<ver>/bin/etcd                $FT_CACHE/helm/<ver>/bin/helm
#   $FT_CACHE/containerd/<ver>/bin/{containerd,containerd-shim-runc-v2,ctr}
#   $FT_CACHE/crictl/<ver>/bin/crictl            $FT_CACHE/coredns/<ver>/bin/coredns
#   $FT_CACHE/kwok/<ver>/bin/kwok
# A binary that already exists is skipped, so a warm run is a no-op. Every tool gets the version ldflags its
# upstream release sets (version, commit, tree state, and for helm the Kubernetes version it renders for),
# so `<tool> version` and helm's default --kube-version tell the truth. Builds of one tool are serialised
# with flock: several sessions share $FT_CACHE. Go's own caches (GOCACHE, GOMODCACHE) stay at their
# defaults in $HOME so CI runs on the same machine reuse them.
#
#   bash hack/build-binaries.sh [etcd|k8s|helm|minio|containerd|crictl|coredns|kwok ...]   (default: all)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=versions.env
source "$ROOT/hack/versions.env"
FT_CACHE="${FT_CACHE:-$ROOT/.cache}"
export GOFLAGS="${GOFLAGS:-} -mod=mod"
export CGO_ENABLED=0

log() { printf '[build-binaries %(%H:%M:%S)T] %s\n' -1 "$*"; }
elapsed() { echo "$(($(date +%s) - $1))s"; }
now_utc() { date -u +%Y-%m-%dT%H:%M:%SZ; }

command -v go >/dev/null || { log "go is not on PATH; install Go >= 1.24 (https://go.dev/dl/)"; exit 1; }

# The commit a module version was tagged from, as the module proxy reports it ("" when it does not).
mod_commit() {
  GOFLAGS="" go mod download -json "$1@$2" 2>/dev/null |
    sed -n 's/^[[:space:]]*"Hash": "\([0-9a-f]\{40\}\)".*/\1/p' | head -1
}

# Run "$@" holding an exclusive lock for tool $1 (a concurrent session building the same tool waits, then
# finds the binaries present and skips).
locked() {
  local name="$1"
  shift
  mkdir -p "$FT_CACHE/.locks"
  (
    flock 9
    "$@"
  ) 9>"$FT_CACHE/.locks/$name.lock"
}

# missing <dir> <bin...>: print the binaries of the list that are not built yet.
missing() {
  local dir="$1"
  shift
  for b in "$@"; do [[ -x "$dir/$b" ]] || echo "$b"; done
}

# --- Kubernetes -------------------------------------------------------------------------------------------
# k8s.io/kubernetes is not meant to be a dependency: its go.mod requires every staging module at v0.0.0 and
# replaces them with ./staging paths, which are ignored outside its own module. A tiny wrapper module
# re-points each staging module to the matching published v0.<minor>.<patch> tag.
K8S_BINS=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy)

k8s_module() {
  local dir="$1" kver="$2" stage_ver="v0.${2#v1.}"
  local kmod
  mkdir -p "$dir"
  # Regenerate only when the blank imports below changed (another session may be building from $dir).
  if grep -q 'cmd/kube-proxy/app' "$dir/tools.go" 2>/dev/null && [[ -f "$dir/go.sum" ]]; then
    return
  fi
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
	_ "k8s.io/kubernetes/cmd/kube-proxy/app"
	_ "k8s.io/kubernetes/cmd/kube-scheduler/app"
	_ "k8s.io/kubernetes/cmd/kubelet/app"
	_ "k8s.io/kubectl/pkg/cmd"
)
EOF
  (cd "$dir" && go mod tidy -e >/dev/null 2>&1 || true)
}

# What hack/lib/version.sh sets for a release build.
k8s_ldflags() {
  local kver="$1" commit="$2" major minor ld="-s -w"
  major="${kver#v}"
  major="${major%%.*}"
  minor="$(echo "$kver" | cut -d. -f2)"
  for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    ld+=" -X $pkg.gitVersion=$kver -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    ld+=" -X $pkg.gitCommit=$commit -X $pkg.gitTreeState=clean -X $pkg.buildDate=$(now_utc)"
  done
  echo "$ld"
}

build_k8s() {
  local kver="$KUBERNETES_VERSION"
  local out="$FT_CACHE/k8s/$kver/bin" src="$FT_CACHE/k8s/$kver/src"
  local todo
  mapfile -t todo < <(missing "$out" "${K8S_BINS[@]}")
  if ((${#todo[@]} == 0)); then
    log "kubernetes $kver: up to date ($out)"
    return
  fi
  local t0 ld
  t0=$(date +%s)
  log "kubernetes $kver: preparing wrapper module in $src"
  k8s_module "$src" "$kver"
  log "kubernetes $kver: module ready ($(elapsed "$t0"))"
  mkdir -p "$out"
  ld="$(k8s_ldflags "$kver" "$(mod_commit k8s.io/kubernetes "$kver")")"
  for b in "${todo[@]}"; do
    local t1
    t1=$(date +%s)
    log "building $b $kver (cold builds take minutes on 2 cores) ..."
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
  local t0 sha
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
  sha="$(mod_commit go.etcd.io/etcd/server/v3 "$ever")"
  (cd "$src" && go mod tidy >/dev/null &&
    go build -trimpath -ldflags "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=${sha:0:8}" -o "$out/etcd.tmp" .)
  mv "$out/etcd.tmp" "$out/etcd"
  log "built etcd in $(elapsed "$t0")"
}

# --- helm -------------------------------------------------------------------------------------------------
# helm's Makefile sets its version, commit and tree state, and the Kubernetes version `helm template` and
# `helm lint` assume offline (major+1.minor of the k8s.io/client-go it is built with). Without the latter
# helm assumes v1.20 and refuses charts with a newer kubeVersion constraint. A helm built earlier without
# these flags (empty GitCommit) is rebuilt in place.
helm_ok() {
  [[ -x "$1" ]] && [[ -n "$("$1" version --template '{{.GitCommit}}' 2>/dev/null)" ]]
}

build_helm() {
  local hver="$HELM_VERSION"
  local out="$FT_CACHE/helm/$hver/bin"
  if helm_ok "$out/helm"; then
    log "helm $hver: up to date ($out)"
    return
  fi
  local t0 dir commit kmaj kmin ld
  t0=$(date +%s)
  log "building helm $hver with its release ldflags ..."
  mkdir -p "$out"
  dir="$(GOFLAGS="" go mod download -json "helm.sh/helm/v3@$hver" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  commit="$(mod_commit helm.sh/helm/v3 "$hver")"
  # k8s.io/client-go v0.34.2 -> Kubernetes 1.34, exactly as helm's Makefile derives it.
  read -r kmaj kmin < <(awk '$1 == "k8s.io/client-go" {sub(/^v/, "", $2); split($2, v, "."); print v[1] + 1, v[2]}' "$dir/go.mod")
  ld="-s -w -X helm.sh/helm/v3/internal/version.version=$hver -X helm.sh/helm/v3/internal/version.metadata="
  ld+=" -X helm.sh/helm/v3/internal/version.gitCommit=$commit -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    ld+=" -X $pkg.k8sVersionMajor=$kmaj -X $pkg.k8sVersionMinor=$kmin"
  done
  local tmp
  tmp="$(mktemp -d "$out/../.helm-build.XXXXXX")"
  GOFLAGS="" GOBIN="$tmp" go install -trimpath -ldflags "$ld" "helm.sh/helm/v3/cmd/helm@$hver"
  mv "$tmp/helm" "$out/helm" # atomic: a concurrent test keeps running the old inode
  rmdir "$tmp"
  log "built helm in $(elapsed "$t0") (renders for Kubernetes v$kmaj.$kmin by default)"
}

# --- tools installed straight from their modules (no replace directives upstream) ---------------------
# go_tool <name> <version> <ldflags> <tags> <package>...: `go install` each package into the version dir.
go_tool() {
  local name="$1" ver="$2" ld="$3" tags="$4"
  shift 4
  local out="$FT_CACHE/$name/$ver/bin" todo=()
  for pkg in "$@"; do
    [[ -x "$out/${pkg##*/}" ]] || todo+=("$pkg")
  done
  if ((${#todo[@]} == 0)); then
    log "$name $ver: up to date ($out)"
    return
  fi
  local t0 tmp
  t0=$(date +%s)
  mkdir -p "$out"
  tmp="$(mktemp -d "$out/../.build.XXXXXX")"
  for pkg in "${todo[@]}"; do
    local t1
    t1=$(date +%s)
    log "building ${pkg##*/} $ver ..."
    GOFLAGS="" GOBIN="$tmp" go install -trimpath -tags "$tags" -ldflags "-s -w $ld" "$pkg@$ver"
    mv "$tmp/${pkg##*/}" "$out/${pkg##*/}"
    log "built ${pkg##*/} in $(elapsed "$t1")"
  done
  rmdir "$tmp"
  log "$name $ver ready in $(elapsed "$t0")"
}

# wrapper_tool <name> <module> <version> <ldflags> <tags> <package>...: like go_tool, for modules whose go.mod
# has exclude directives (which `go install pkg@version` refuses): a wrapper module requires the module and
# copies its exclude block, so dependencies resolve exactly as in upstream's own build.
wrapper_tool() {
  local name="$1" module="$2" ver="$3" ld="$4" tags="$5"
  shift 5
  local out="$FT_CACHE/$name/$ver/bin" src="$FT_CACHE/$name/$ver/src" todo=()
  for pkg in "$@"; do
    [[ -x "$out/${pkg##*/}" ]] || todo+=("$pkg")
  done
  if ((${#todo[@]} == 0)); then
    log "$name $ver: up to date ($out)"
    return
  fi
  local t0 dir
  t0=$(date +%s)
  mkdir -p "$out" "$src"
  dir="$(GOFLAGS="" go mod download -json "$module@$ver" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  {
    printf 'module ftdevcluster/%sbuild\n\ngo 1.24.0\n\nrequire %s %s\n\n' "$name" "$module" "$ver"
    awk '/^exclude \(/ {on = 1} on {print} on && /^\)/ {on = 0}' "$dir/go.mod"
  } >"$src/go.mod"
  for pkg in "${todo[@]}"; do
    local t1
    t1=$(date +%s)
    log "building ${pkg##*/} $ver ..."
    (cd "$src" && go build -trimpath -tags "$tags" -ldflags "-s -w $ld" -o "$out/${pkg##*/}.tmp" "$pkg")
    mv "$out/${pkg##*/}.tmp" "$out/${pkg##*/}"
    log "built ${pkg##*/} in $(elapsed "$t1")"
  done
  log "$name $ver ready in $(elapsed "$t0")"
}

build_containerd() {
  local v="$CONTAINERD_VERSION" m=github.com/containerd/containerd/v2
  # containerd's Makefile: version, revision and package ldflags; urfave_cli_no_docs always; the runc shim
  # also with no_grpc and (like upstream, SHIM_CGO_ENABLED=0) without cgo. Built without cgo, btrfs is left
  # out (its build constraint needs cgo); overlayfs, which the node uses, is pure Go.
  local ld="-X $m/version.Version=$v -X $m/version.Revision=$(mod_commit "$m" "$v") -X $m/version.Package=$m"
  wrapper_tool containerd "$m" "$v" "$ld" urfave_cli_no_docs "$m/cmd/containerd" "$m/cmd/ctr"
  wrapper_tool containerd "$m" "$v" "$ld" "urfave_cli_no_docs no_grpc" "$m/cmd/containerd-shim-runc-v2"
}

build_crictl() {
  go_tool crictl "$CRICTL_VERSION" "-X sigs.k8s.io/cri-tools/pkg/version.Version=$CRICTL_VERSION" "" \
    sigs.k8s.io/cri-tools/cmd/crictl
}

build_coredns() {
  local commit
  commit="$(mod_commit github.com/coredns/coredns "$COREDNS_VERSION")"
  go_tool coredns "$COREDNS_VERSION" "-X github.com/coredns/coredns/coremain.GitCommit=${commit:0:7}" "" \
    github.com/coredns/coredns
}

build_kwok() {
  go_tool kwok "$KWOK_VERSION" "-X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION" "" sigs.k8s.io/kwok/cmd/kwok
}

T0=$(date +%s)
targets=("$@")
((${#targets[@]})) || targets=(etcd k8s helm minio containerd crictl coredns kwok)
for t in "${targets[@]}"; do
  case "$t" in
    etcd | k8s | helm | containerd | crictl | coredns | kwok) locked "$t" "build_$t" ;;
    kueue) bash "$ROOT/hack/build-kueue.sh" ;;
    minio)
      if [[ -f "$ROOT/hack/build-minio.sh" ]]; then
        bash "$ROOT/hack/build-minio.sh"
      fi
      ;;
    *)
      log "unknown target $t (etcd|k8s|helm|minio|containerd|crictl|coredns|kwok)"
      exit 2
      ;;
  esac
done
log "all binaries ready in $(elapsed "$T0")"
