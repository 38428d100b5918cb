#!/usr/bin/env bash
# Build Kueue's controller manager from its upstream Go module, and keep the manifests of the same module version
# (CRDs, webhook configurations, RBAC) next to it, so tests run the real Kueue against the dev control plane.
#
# Outputs (never committed), keyed by version:
#   $FT_CACHE/kueue/<ver>/bin/kueue                          the controller manager (cmd/kueue), version ldflags as
#                                                           upstream's Makefile sets them
#   $FT_CACHE/kueue/<ver>/config/crd/*.yaml                  config/components/crd/bases of the module
#   $FT_CACHE/kueue/<ver>/config/webhook/manifests.yaml      config/components/webhook/manifests.yaml
#   $FT_CACHE/kueue/<ver>/config/rbac/*.yaml                 config/components/rbac (the manager's ClusterRole ...)
# The version is KUEUE_VERSION in hack/versions.env. A finished build is reused; delete the directory to rebuild.
# GOCACHE/GOMODCACHE stay at Go's defaults so the module download and compiled packages are shared.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
KUEUE_VERSION="$(sed -n 's/^KUEUE_VERSION=//p' "$repo/hack/versions.env")"
if [[ -z "$KUEUE_VERSION" ]]; then
  echo "build-kueue: KUEUE_VERSION is missing from hack/versions.env" >&2
  exit 2
fi
FT_CACHE="${FT_CACHE:-$repo/.cache}"
root="$FT_CACHE/kueue/$KUEUE_VERSION"
dest="$root/bin/kueue"
module="sigs.k8s.io/kueue"

ready() { [[ -x "$dest" && -f "$root/config/webhook/manifests.yaml" && -f "$root/config/.complete" ]]; }

if ready; then
  echo "build-kueue: kueue $KUEUE_VERSION already built: $dest (skipping)"
  exit 0
fi
command -v go >/dev/null || {
  echo "build-kueue: 'go' not found on PATH; install Go >= 1.25 (https://go.dev/dl) and retry" >&2
  exit 1
}

mkdir -p "$root"
# Two concurrent callers must not race on the same output.
exec 9>"$root/.build.lock"
if command -v flock >/dev/null; then
  flock 9
  if ready; then
    echo "build-kueue: kueue $KUEUE_VERSION was built by a concurrent run: $dest"
    exit 0
  fi
fi

work="$(mktemp -d "$root/.build.XXXXXX")"
heartbeat_pid=""
cleanup() {
  [[ -n "$heartbeat_pid" ]] && kill "$heartbeat_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

start=$(date +%s)
echo "build-kueue: downloading $module@$KUEUE_VERSION through the Go module proxy ($(go env GOPROXY))"
if ! info="$(GOTOOLCHAIN=local GOFLAGS=-mod=mod go mod download -json "$module@$KUEUE_VERSION")"; then
  echo "build-kueue: download failed; does the version exist? go list -m -versions $module" >&2
  exit 1
fi
src="$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p' <<<"$info")"
sum="$(sed -n 's/^[[:space:]]*"Sum": "\(.*\)",$/\1/p' <<<"$info")"
[[ -d "$src/config/components/crd/bases" ]] || {
  echo "build-kueue: $src has no config/components/crd/bases" >&2
  exit 1
}

echo "build-kueue: building $module/cmd/kueue@$KUEUE_VERSION with $(go version | awk '{print $3}')"
echo "build-kueue: a cold build compiles for ~3 minutes on 2 cores"
(
  while sleep 30; do echo "build-kueue: still building... $(($(date +%s) - start))s elapsed"; done
) &
heartbeat_pid=$!
# Upstream's Makefile stamps pkg/version with the git tag, commit and build date. The module proxy carries no git
# metadata, so the commit field holds the module's content hash instead (it identifies the exact source).
pkg="$module/pkg/version"
ldflags="-s -w -X '$pkg.GitVersion=$KUEUE_VERSION' -X '$pkg.GitCommit=$sum'"
ldflags+=" -X '$pkg.BuildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)'"
# GOTOOLCHAIN=local: never download a different Go toolchain behind the user's back. CGO_ENABLED=0: static binary.
if ! GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS="" GOBIN="$work/bin" \
  go install -trimpath -ldflags "$ldflags" "$module/cmd/kueue@$KUEUE_VERSION"; then
  echo "build-kueue: go install failed; see the compiler output above" >&2
  exit 1
fi
kill "$heartbeat_pid" 2>/dev/null || true
heartbeat_pid=""

mkdir -p "$work/config/crd" "$work/config/webhook" "$work/config/rbac"
cp "$src"/config/components/crd/bases/*.yaml "$work/config/crd/"
cp "$src/config/components/webhook/manifests.yaml" "$work/config/webhook/"
cp "$src"/config/components/rbac/*.yaml "$work/config/rbac/"
chmod -R u+w "$work/config"  # the module cache is read-only
touch "$work/config/.complete"

rm -rf "$root/bin" "$root/config"
mv "$work/bin" "$root/bin"
mv "$work/config" "$root/config"
echo "build-kueue: built $dest and copied the $KUEUE_VERSION manifests to $root/config in $(($(date +%s) - start))s"
