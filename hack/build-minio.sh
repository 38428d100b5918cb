#!/usr/bin/env bash
# Build the MinIO server from its upstream Go module so tests have a real S3 server without Docker.
#
# Output: $FT_CACHE/minio/$MINIO_VERSION/bin/minio   (FT_CACHE defaults to <repo>/.cache)
# The version is pinned by MINIO_VERSION in hack/versions.env. MinIO publishes no semver tags, so the pin is
# a Go pseudo-version (commit) served by the Go module proxy. A finished build is reused (keyed by version);
# delete the directory to force a rebuild. GOCACHE/GOMODCACHE stay at Go's defaults so the module download
# and compiled packages are shared with every other Go build on the machine.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
MINIO_VERSION="$(sed -n 's/^MINIO_VERSION=//p' "$repo/hack/versions.env")"
if [[ -z "$MINIO_VERSION" || "$MINIO_VERSION" == "latest" ]]; then
  echo "build-minio: MINIO_VERSION in hack/versions.env must be a concrete module version (got '${MINIO_VERSION}')" >&2
  exit 2
fi
FT_CACHE="${FT_CACHE:-$repo/.cache}"
dest_dir="$FT_CACHE/minio/$MINIO_VERSION/bin"
dest="$dest_dir/minio"

if [[ -x "$dest" ]] && "$dest" --version >/dev/null 2>&1; then
  echo "build-minio: minio $MINIO_VERSION already built: $dest (skipping)"
  exit 0
fi

command -v go >/dev/null || {
  echo "build-minio: 'go' not found on PATH; install Go >= 1.24 (https://go.dev/dl) and retry" >&2
  exit 1
}

mkdir -p "$dest_dir"
# Two concurrent callers (e.g. build-binaries.sh and a developer) must not race on the same output.
exec 9>"$dest_dir/../.build.lock"
if command -v flock >/dev/null; then
  flock 9
  if [[ -x "$dest" ]] && "$dest" --version >/dev/null 2>&1; then
    echo "build-minio: minio $MINIO_VERSION was built by a concurrent run: $dest"
    exit 0
  fi
fi

work="$(mktemp -d "$dest_dir/../.build.XXXXXX")"
heartbeat_pid=""
cleanup() {
  [[ -n "$heartbeat_pid" ]] && kill "$heartbeat_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

start=$(date +%s)
echo "build-minio: building github.com/minio/minio@$MINIO_VERSION with $(go version | awk '{print $3}')"
echo "build-minio: a cold build downloads ~240 modules and compiles for ~4 minutes on 2 cores"
# Print a heartbeat so a long, silent compile is visibly alive.
(
  while sleep 30; do echo "build-minio: still building... $(($(date +%s) - start))s elapsed"; done
) &
heartbeat_pid=$!

# GOTOOLCHAIN=local: never download a different Go toolchain behind the user's back.
# CGO_ENABLED=0: a static binary, as upstream releases are.
# GOFLAGS=-mod=mod is not needed: `go install pkg@version` builds the module with its own go.mod.
if ! GOTOOLCHAIN=local CGO_ENABLED=0 GOBIN="$work" \
  go install -trimpath -ldflags "-s -w" "github.com/minio/minio@$MINIO_VERSION"; then
  echo "build-minio: go install failed; check network access to the Go module proxy (GOPROXY=$(go env GOPROXY))" >&2
  echo "build-minio: and that MINIO_VERSION=$MINIO_VERSION exists: go list -m -versions github.com/minio/minio" >&2
  exit 1
fi
kill "$heartbeat_pid" 2>/dev/null || true
heartbeat_pid=""

mv -f "$work/minio" "$dest"
elapsed=$(($(date +%s) - start))
echo "build-minio: built $dest in ${elapsed}s"
"$dest" --version | head -n 1
