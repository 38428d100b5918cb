#!/usr/bin/env bash
# Build the release images with Docker: the operator and the trainer (cpu and cuda variants), on the official
# python base image. Without a Docker engine, `make images` builds the same Dockerfiles with buildah on a Debian
# base (devcluster/images.py, docs/images.md).
#
#   hack/images.sh                 # build all three (make images-docker)
#   IMAGE_PREFIX=registry.example.com/ml VERSION=0.1.0 TORCH_CUDA=cu126 hack/images.sh
#
# Needs a running Docker (or a docker-compatible CLI such as podman's `docker` shim) engine; without one it stops
# with a clear message and exit code 3 instead of pretending.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
IMAGE_PREFIX="${IMAGE_PREFIX:-ghcr.io/finetune-operator}"
VERSION="${VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)}"
DOCKER="${DOCKER:-docker}"
# The CUDA wheel index of the cuda variant; match it to the GPU nodes' driver.
TORCH_CUDA="${TORCH_CUDA:-cu128}"
if (($#)); then TARGETS=("$@"); else TARGETS=(operator trainer-cpu trainer-cuda); fi

if ! command -v "$DOCKER" >/dev/null 2>&1; then
  echo "make images: '$DOCKER' is not installed, so no image can be built on this machine." >&2
  echo "  Install Docker (https://docs.docker.com/engine/install/) or set DOCKER=podman, then re-run." >&2
  echo "  The Dockerfiles are still linted by 'make test' (hadolint)." >&2
  exit 3
fi
if ! "$DOCKER" info >/dev/null 2>&1; then
  echo "make images: '$DOCKER' is installed but no engine answers ('$DOCKER info' failed)." >&2
  echo "  Start the Docker daemon (or Docker Desktop) and re-run." >&2
  exit 3
fi

build() {
  local name="$1"; shift
  echo "== building $name"
  local t0=$SECONDS
  "$DOCKER" build "$@" .
  echo "== built $name in $((SECONDS - t0))s"
}

for t in "${TARGETS[@]}"; do
  case "$t" in
    operator) build "$IMAGE_PREFIX/operator:$VERSION" -f operator/Dockerfile -t "$IMAGE_PREFIX/operator:$VERSION" ;;
    trainer-cpu) build "$IMAGE_PREFIX/trainer:$VERSION" -f trainer/Dockerfile --target cpu -t "$IMAGE_PREFIX/trainer:$VERSION" ;;
    trainer-cuda)
      build "$IMAGE_PREFIX/trainer:$VERSION-cuda" -f trainer/Dockerfile --target cuda \
        --build-arg "TORCH_INDEX_URL=https://download.pytorch.org/whl/$TORCH_CUDA" \
        -t "$IMAGE_PREFIX/trainer:$VERSION-cuda" ;;
    *) echo "unknown image $t (operator | trainer-cpu | trainer-cuda)" >&2; exit 2 ;;
  esac
done
