#!/usr/bin/env bash
# The quick start of finetune-operator, as one script for every cluster it runs on.
#
# On kind (a laptop with Docker; CPU workers):
#   hack/kind-demo.sh up      # kind cluster from kind-config.yaml (1 control plane, 2 CPU workers)
#   hack/kind-demo.sh load    # load the operator and CPU trainer images (build them with hack/images.sh)
#   hack/kind-demo.sh demo    # MinIO, Prometheus, chart, SST-2 subset, quick-start job, wait for Succeeded,
#                             # artifacts checked against the manifest, the job's metrics in Prometheus
#   hack/kind-demo.sh setup   # the first four steps of demo only (MinIO, Prometheus, chart, credentials, data)
#   hack/kind-demo.sh down    # delete the kind cluster
#
# On the dev cluster's real node (no Docker: images built with buildah and imported into containerd),
# tests/e2e/test_quickstart_real_node.py runs the very same `demo` step with these knobs set:
#   KUBE_CONTEXT=""           the kubeconfig's current context instead of kind-$KIND_CLUSTER (with KUBECONFIG)
#   KUBECTL, HELM             the binaries to use
#   OPERATOR_IMAGE, TRAINER_IMAGE, MINIO_IMAGE, PROMETHEUS_IMAGE   image references (default: the examples')
#   JOB_FILE, JOB, TRAIN_ROWS the job manifest, its name, the training rows uploaded
#   RELEASE, OPERATOR_NS, JOB_NS, REPLICAS, PF_PORT, PROM_PORT, TIMEOUT
#   HELM_SET                  more chart values, space-separated key=value (e.g. kueue.enabled=true)
# so the kind quick start and its test cannot drift apart.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=hack/versions.env
source hack/versions.env
FT_CACHE="${FT_CACHE:-$ROOT/.cache}"

CLUSTER="${KIND_CLUSTER:-finetune}"
KIND="${KIND:-kind}"
KUBECTL="${KUBECTL:-kubectl}"
KUBE_CONTEXT="${KUBE_CONTEXT-kind-$CLUSTER}"
if [[ -z "${HELM:-}" ]]; then
  HELM="$FT_CACHE/helm/$HELM_VERSION/bin/helm"
  [[ -x "$HELM" ]] || HELM=helm
fi
PY="${PY:-$ROOT/.venv/bin/python}"
IMAGE_PREFIX="${IMAGE_PREFIX:-ghcr.io/finetune-operator}"
VERSION="${VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)}"
OPERATOR_IMAGE="${OPERATOR_IMAGE:-$IMAGE_PREFIX/operator:$VERSION}"
TRAINER_IMAGE="${TRAINER_IMAGE:-$IMAGE_PREFIX/trainer:$VERSION}"
MINIO_IMAGE="${MINIO_IMAGE:-}"
RELEASE="${RELEASE:-finetune-operator}"
OPERATOR_NS="${OPERATOR_NS:-finetune-system}"
REPLICAS="${REPLICAS:-2}"  # two operator replicas: one leads (Lease), one waits as a hot standby
JOB_NS="${JOB_NS:-default}"
JOB_FILE="${JOB_FILE:-examples/quickstart-kind.yaml}"
JOB="${JOB:-sst2-quickstart}"
TRAIN_ROWS="${TRAIN_ROWS:-2000}"
TIMEOUT="${TIMEOUT:-1800}"
PF_PORT="${PF_PORT:-19000}"
PROM_PORT="${PROM_PORT:-19090}"
PROMETHEUS_IMAGE="${PROMETHEUS_IMAGE:-}"
HELM_SET="${HELM_SET:-}"

log() { printf '[kind-demo %(%H:%M:%S)T] %s\n' -1 "$*"; }
die() { log "ERROR: $*"; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "$1 is not installed. $2"; }
kc() { "$KUBECTL" ${KUBE_CONTEXT:+--context "$KUBE_CONTEXT"} "$@"; }
hm() { "$HELM" ${KUBE_CONTEXT:+--kube-context "$KUBE_CONTEXT"} "$@"; }

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

PF_PIDS=()
trap 'for pid in "${PF_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done' EXIT

# port_forward NAMESPACE SERVICE LOCAL_PORT REMOTE_PORT READY_PATH
port_forward() {
  local log_file="${TMPDIR:-/tmp}/kind-demo-port-forward-$2.log"
  log "port-forwarding $1/$2 to 127.0.0.1:$3"
  kc -n "$1" port-forward "svc/$2" "$3:$4" >"$log_file" 2>&1 &
  PF_PIDS+=($!)
  for _ in $(seq 1 30); do
    curl -fsS "http://127.0.0.1:$3$5" >/dev/null 2>&1 && return 0
    sleep 1
  done
  die "port-forward to $1/$2 did not become ready; see $log_file"
}

# prom_query QUERY: the first value of an instant query to the port-forwarded Prometheus ('' when empty)
prom_query() {
  curl -fsS -G "http://127.0.0.1:$PROM_PORT/api/v1/query" --data-urlencode "query=$1" |
    "$PY" -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "")'
}

# The operator replicas and the job's training series (scraped from its head pod while it ran) in Prometheus.
show_metrics() {
  local query value
  for query in 'count(up{job="finetune-operator"} == 1)' \
    "max_over_time(finetune_trainer_step{namespace=\"$JOB_NS\",job_name=\"$JOB\"}[1h])" \
    "max_over_time(finetune_trainer_loss{namespace=\"$JOB_NS\",job_name=\"$JOB\"}[1h])"; do
    value="$(prom_query "$query")"
    [[ -n "$value" ]] || die "Prometheus has nothing for $query; see its targets: \
kubectl -n monitoring port-forward svc/prometheus 9090, then http://127.0.0.1:9090/api/v1/targets"
    log "  prometheus: $query = $value"
  done
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
    sleep 3  # two kubectl gets per poll; a line is printed only when it changed
  done
  kc -n "$JOB_NS" describe ftj "$JOB" || true
  kc -n "$JOB_NS" get pods -l "finetune.dev/job=$JOB" -o wide || true
  die "ftj/$JOB did not finish within ${TIMEOUT}s"
}

# with_image FILE IMAGE: the manifest, its upstream image replaced when IMAGE is set (images built from this repo)
with_image() {
  if [[ -n "$2" ]]; then
    sed -E "s|image: quay.io/[a-z]+/[a-z]+:[^ ]+.*|image: $2|" "$1"
  else
    cat "$1"
  fi
}

# Steps 1-4: everything a job needs (the fault tests on the real node share them, then apply their own jobs).
setup() {
  need "$KUBECTL" "Install kubectl: https://kubernetes.io/docs/tasks/tools/"
  [[ -x "$PY" ]] || die "$PY not found; run 'make venv' first (the demo uses boto3 from the dev environment)."
  log "1/7 MinIO and Prometheus (examples/minio-kind.yaml, examples/prometheus-kind.yaml)"
  with_image examples/minio-kind.yaml "$MINIO_IMAGE" | kc apply -f -
  with_image examples/prometheus-kind.yaml "$PROMETHEUS_IMAGE" | kc apply -f -
  kc -n minio rollout status deployment/minio --timeout=300s
  kc -n monitoring rollout status deployment/prometheus --timeout=300s

  log "2/7 chart (release $RELEASE in $OPERATOR_NS, $REPLICAS replicas, operator image $OPERATOR_IMAGE)"
  local extra=() kv
  for kv in $HELM_SET; do extra+=(--set "$kv"); done
  hm upgrade --install "$RELEASE" charts/finetune-operator \
    --namespace "$OPERATOR_NS" --create-namespace --wait --timeout 5m \
    --set replicaCount="$REPLICAS" \
    --set-string image.repository="${OPERATOR_IMAGE%:*}" --set-string image.tag="${OPERATOR_IMAGE##*:}" \
    --set-string defaults.trainerImage="$TRAINER_IMAGE" --set defaults.trainerImagePullPolicy=IfNotPresent \
    --set defaults.storage.endpoint=http://minio.minio.svc.cluster.local:9000 \
    --set defaults.storage.credentialsSecret=s3-creds \
    --set-json 'jobNetworkPolicy.metricsScrapers.namespaceLabels={"kubernetes.io/metadata.name":"monitoring"}' \
    --set-json 'jobNetworkPolicy.metricsScrapers.podLabels={"app.kubernetes.io/name":"prometheus"}' \
    ${extra[@]+"${extra[@]}"}

  log "3/7 storage credentials in namespace $JOB_NS (examples/s3-credentials.yaml)"
  kc -n "$JOB_NS" apply -f examples/s3-credentials.yaml

  log "4/7 SST-2 subset ($TRAIN_ROWS training rows + dev) to MinIO"
  port_forward minio minio "$PF_PORT" 9000 /minio/health/ready
  "$PY" hack/demo_s3.py upload --endpoint "http://127.0.0.1:$PF_PORT" --rows "$TRAIN_ROWS"
}

demo() {
  setup
  log "5/7 quick-start job ($JOB_FILE)"
  kc -n "$JOB_NS" apply -f "$JOB_FILE"
  wait_for_job
  kc -n "$JOB_NS" wait --for=condition=Succeeded --timeout=60s "ftj/$JOB"

  log "6/7 artifacts (every file the manifest lists, size and sha256 checked)"
  "$PY" hack/demo_s3.py verify --endpoint "http://127.0.0.1:$PF_PORT" --uri "s3://models/$JOB/"

  log "7/7 metrics in the in-cluster Prometheus (operator and trainer pods found by Kubernetes discovery)"
  port_forward monitoring prometheus "$PROM_PORT" 9090 /-/ready
  show_metrics
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
  setup) setup ;;
  down) down ;;
  *) echo "usage: $0 up|load|demo|setup|down" >&2; exit 2 ;;
esac
