#!/usr/bin/env bash
# kind: try finetune-operator on a laptop with CPU workers. Needs Docker, kind, kubectl and helm on PATH
# (helm from `make binaries` is used when present). Our CI machines have no Docker, so these steps cannot run
# there; tests/integration/test_chart_demo.py mirrors the `demo` steps against our own control plane + process
# node instead.
#
#   hack/kind-demo.sh up      # kind cluster from kind-config.yaml (1 control plane, 2 CPU workers)
#   hack/kind-demo.sh load    # load the operator and CPU trainer images (build them with hack/images.sh)
#   hack/kind-demo.sh demo    # MinIO, chart, SST-2 subset, quick-start job, wait for Succeeded, list artifacts
#   hack/kind-demo.sh down    # delete the kind cluster
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=hack/versions.env
source hack/versions.env
FT_CACHE="${FT_CACHE:-$ROOT/.cache}"

CLUSTER="${KIND_CLUSTER:-finetune}"
KIND="${KIND:-kind}"
KUBECTL="${KUBECTL:-kubectl}"
if [[ -z "${HELM:-}" ]]; then
  HELM="$FT_CACHE/helm/$HELM_VERSION/bin/helm"
  [[ -x "$HELM" ]] || HELM=helm
fi
PY="${PY:-$ROOT/.venv/bin/python}"
IMAGE_PREFIX="${IMAGE_PREFIX:-ghcr.io/finetune-operator}"
VERSION="${VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)}"
OPERATOR_IMAGE="$IMAGE_PREFIX/operator:$VERSION"
TRAINER_IMAGE="$IMAGE_PREFIX/trainer:$VERSION"
RELEASE="${RELEASE:-finetune-operator}"
OPERATOR_NS="${OPERATOR_NS:-finetune-system}"
JOB_NS="${JOB_NS:-default}"
JOB="sst2-quickstart"
TRAIN_ROWS="${TRAIN_ROWS:-2000}"
TIMEOUT="${TIMEOUT:-1800}"
PF_PORT="${PF_PORT:-19000}"

log() { printf '[kind-demo %(%H:%M:%S)T] %s\n' -1 "$*"; }
die() { log "ERROR: $*"; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "$1 is not installed. $2"; }
kc() { "$KUBECTL" --context "kind-$CLUSTER" "$@"; }

up() {
  need docker "Install Docker: https://docs.docker.com/engine/install/"
  need "$KIND" "Install kind: https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
  docker info >/dev/null 2>&1 || die "Docker is installed but its engine is not running; start it and re-run."
  if "$KIND" get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    log "kind cluster $CLUSTER already exists"
  else
    log "creating kind cluster $CLUSTER (1 control plane + 2 CPU workers) ..."
    "$KIND" create cluster --name "$CLUSTER" --config kind-config.yaml --wait 180s
  fi
  kc get nodes -L finetune.dev/pool
}

load() {
  need "$KIND" "Install kind: https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
  for image in "$OPERATOR_IMAGE" "$TRAINER_IMAGE"; do
    docker image inspect "$image" >/dev/null 2>&1 || die "image $image not found locally; run 'make images-docker' first."
    log "loading $image into kind cluster $CLUSTER (the trainer image takes a minute) ..."
    "$KIND" load docker-image --name "$CLUSTER" "$image"
  done
}

port_forward() {
  log "port-forwarding MinIO to 127.0.0.1:$PF_PORT"
  kc -n minio port-forward svc/minio "$PF_PORT:9000" >/tmp/kind-demo-port-forward.log 2>&1 &
  PF_PID=$!
  trap 'kill "$PF_PID" 2>/dev/null || true' EXIT
  for _ in $(seq 1 30); do
    curl -fsS "http://127.0.0.1:$PF_PORT/minio/health/ready" >/dev/null 2>&1 && return 0
    sleep 1
  done
  die "MinIO port-forward did not become ready; see /tmp/kind-demo-port-forward.log"
}

wait_for_job() {
  local deadline=$((SECONDS + TIMEOUT)) phase="" line last=""
  log "waiting up to ${TIMEOUT}s for ftj/$JOB to finish (phase, step/total, loss, metric):"
  while ((SECONDS < deadline)); do
    phase="$(kc -n "$JOB_NS" get ftj "$JOB" -o jsonpath='{.status.phase}' 2>/dev/null || true)"
    line="$(kc -n "$JOB_NS" get ftj "$JOB" -o jsonpath='{.status.phase} step={.status.progress.step}/{.status.progress.totalSteps} loss={.status.progress.loss} metric={.status.progress.evalMetric}' 2>/dev/null || true)"
    [[ "$line" != "$last" ]] && log "  $line" && last="$line"
    case "$phase" in
      Succeeded) return 0 ;;
      Failed)
        kc -n "$JOB_NS" describe ftj "$JOB" || true
        die "ftj/$JOB Failed; the reason is in the conditions above. See docs/troubleshooting.md." ;;
    esac
    sleep 10
  done
  kc -n "$JOB_NS" describe ftj "$JOB" || true
  kc -n "$JOB_NS" get pods -l "finetune.dev/job=$JOB" -o wide || true
  die "ftj/$JOB did not finish within ${TIMEOUT}s"
}

demo() {
  need "$KUBECTL" "Install kubectl: https://kubernetes.io/docs/tasks/tools/"
  [[ -x "$PY" ]] || die "$PY not found; run 'make venv' first (the demo uses boto3 from the dev environment)."
  log "1/6 MinIO (examples/minio-kind.yaml)"
  kc apply -f examples/minio-kind.yaml
  kc -n minio rollout status deployment/minio --timeout=300s

  log "2/6 chart (release $RELEASE in $OPERATOR_NS)"
  "$HELM" --kube-context "kind-$CLUSTER" upgrade --install "$RELEASE" charts/finetune-operator \
    --namespace "$OPERATOR_NS" --create-namespace --wait --timeout 5m \
    --set image.repository="$IMAGE_PREFIX/operator" --set image.tag="$VERSION" \
    --set defaults.trainerImage="$TRAINER_IMAGE" --set defaults.trainerImagePullPolicy=IfNotPresent \
    --set defaults.storage.endpoint=http://minio.minio.svc.cluster.local:9000 \
    --set defaults.storage.credentialsSecret=s3-creds

  log "3/6 storage credentials in namespace $JOB_NS (examples/s3-credentials.yaml)"
  kc -n "$JOB_NS" apply -f examples/s3-credentials.yaml

  log "4/6 SST-2 subset ($TRAIN_ROWS training rows + dev) to MinIO"
  port_forward
  "$PY" hack/demo_s3.py upload --endpoint "http://127.0.0.1:$PF_PORT" --rows "$TRAIN_ROWS"

  log "5/6 quick-start job (examples/quickstart-kind.yaml)"
  kc -n "$JOB_NS" apply -f examples/quickstart-kind.yaml
  wait_for_job

  log "6/6 artifacts"
  "$PY" hack/demo_s3.py list --endpoint "http://127.0.0.1:$PF_PORT" --uri "s3://models/$JOB/"
  log "done: kubectl -n $JOB_NS get ftj $JOB -o yaml shows status.artifacts"
}

down() {
  need "$KIND" "Install kind: https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
  "$KIND" delete cluster --name "$CLUSTER"
}

case "${1:-}" in
  up) up ;;
  load) load ;;
  demo) demo ;;
  down) down ;;
  *) echo "usage: $0 up|load|demo|down" >&2; exit 2 ;;
esac
