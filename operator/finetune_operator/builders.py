"""Pure builders: (typed spec, settings, job identity) -> the manifests of a job's children.

Why pure: every child object is a deterministic function of its inputs, so the manifests are tested table-driven
without a cluster, `finetune render` prints exactly what the operator would create, and the I/O layer only has
to apply them idempotently (a 409 on create means "already there"). This module never imports a Kubernetes
client (an import-linter contract enforces it); manifests are plain dicts in wire form.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import yaml
from finetune_trainer import contract
from finetune_trainer import spec as ftspec
from finetune_trainer.shape import PodShape, head_shape, worker_shape

from finetune_operator import names
from finetune_operator.settings import Settings
from finetune_operator.status_model import OperatorDefaults

Manifest = dict[str, Any]

RAY_GCS_PORT = 6379
RAY_CLIENT_PORT = 10001
RAY_DASHBOARD_PORT = 8265
RAY_NODE_MANAGER_PORT = 6380  # fixed on workers so a cheap TCP readiness probe can check the raylet
METRICS_PORT = contract.DEFAULT_METRICS_PORT
CONFIG_DIR = "/etc/finetune"
CONFIG_FILE = "job.yaml"
# The root filesystem is read-only; these emptyDirs are the only writable paths (besides /dev/shm).
RAY_TMP_DIR = "/tmp/ray"  # Ray's --temp-dir: sessions, logs, sockets
SCRATCH_DIR = "/tmp/scratch"  # $TMPDIR (tempfile, s3:// model downloads) and $HOME (torch/matplotlib caches)
HOME_DIR = f"{SCRATCH_DIR}/home"
PVC_ROOT = "/mnt/pvc"  # the trainer maps pvc://claim/path to <PVC_ROOT>/claim/path (finetune_trainer.storage)
RUN_AS_USER = 1000
GPU_RESOURCE = "nvidia.com/gpu"
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# Several pods write a cluster job's checkpoints and artifacts: only shared object storage works. (file:// and local
# paths are for `finetune run`; on a cluster rank 0 would write into its own pod and the job fail at the very end.)
CLUSTER_OUTPUT_SCHEMES = ("s3://",)
CLUSTER_OUTPUT_MESSAGE = (
    "{uri!r}: a cluster job needs shared object storage (s3://bucket/prefix/); file:// and local paths are written "
    "inside one pod and lost with it (they work with `finetune run` only)"
)


@dataclasses.dataclass(frozen=True)
class Rendered:
    """Every child of one attempt, in creation order (config and network first, pods last)."""

    config_map: Manifest
    network_policy: Manifest
    service: Manifest
    head: Manifest
    workers: tuple[Manifest, ...]

    def all(self) -> list[Manifest]:
        return [self.config_map, self.network_policy, self.service, self.head, *self.workers]


def operator_defaults(settings: Settings) -> OperatorDefaults:
    """The settings a job's unset fields are resolved from (pinned into the job's status at its first reconcile)."""
    return OperatorDefaults(
        output_base_uri=settings.output_base_uri,
        trainer_image=settings.trainer_image,
        storage_endpoint=settings.storage_endpoint,
        storage_region=settings.storage_region,
        storage_credentials_secret=settings.storage_credentials_secret,
    )


def resolve_spec(
    spec: ftspec.FineTuneJobSpec, *, defaults: OperatorDefaults, ident: names.JobIdentity
) -> ftspec.FineTuneJobSpec:
    """Fill the operator's defaults (output, image, storage) into the spec; SpecError if it cannot run on a cluster.

    The result is what the trainer runs, so it is written into the ConfigMap: one resolved source of truth.
    """
    output = spec.output.uri
    if output is None:
        if not defaults.output_base_uri:
            raise ftspec.SpecError(
                [
                    (
                        "spec.output.uri",
                        "required: the operator has no default output base (set spec.output.uri, or "
                        "FINETUNE_OUTPUT_BASE_URI / the chart's defaults.outputBaseUri)",
                    )
                ]
            )
        output = f"{defaults.output_base_uri.rstrip('/')}/{ident.namespace}/{ident.name}/"
    if not output.startswith(CLUSTER_OUTPUT_SCHEMES):
        raise ftspec.SpecError([("spec.output.uri", CLUSTER_OUTPUT_MESSAGE.format(uri=output))])
    storage = spec.storage.model_copy(
        update={
            "endpoint": spec.storage.endpoint or defaults.storage_endpoint,
            "region": spec.storage.region
            if "region" in spec.storage.model_fields_set or not defaults.storage_region
            else defaults.storage_region,
            "credentials_secret": spec.storage.credentials_secret or defaults.storage_credentials_secret,
        }
    )
    resolved = spec.model_copy(
        update={
            "output": ftspec.OutputSpec(uri=output),
            "storage": storage,
            "image": spec.image or defaults.trainer_image,
        }
    )
    # Round-trip through validation so a bad operator default is reported like a bad field.
    return ftspec.parse_spec(resolved.wire())


def owner_reference(ident: names.JobIdentity) -> Manifest:
    return {
        "apiVersion": names.GROUP_VERSION,
        "kind": names.KIND,
        "name": ident.name,
        "uid": ident.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(name: str, *, ident: names.JobIdentity, labels: dict[str, str]) -> Manifest:
    return {
        "name": name,
        "namespace": ident.namespace,
        "labels": labels,
        "annotations": {names.ANNOTATION_RUN_NAME: ident.run_name},
        "ownerReferences": [owner_reference(ident)],
    }


def build_config_map(spec: ftspec.FineTuneJobSpec, *, ident: names.JobIdentity) -> Manifest:
    """The resolved FineTuneJob manifest the trainer reads from /etc/finetune/job.yaml (no secrets in it)."""
    document = {
        "apiVersion": names.GROUP_VERSION,
        "kind": names.KIND,
        "metadata": {"name": ident.name, "namespace": ident.namespace},
        "spec": spec.wire(),
    }
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(names.config_map_name(ident.name), ident=ident, labels=names.job_labels(ident.name)),
        "data": {CONFIG_FILE: yaml.safe_dump(document, sort_keys=False)},
    }


def build_service(ident: names.JobIdentity) -> Manifest:
    """Headless Service giving the head pod of this attempt a stable DNS name for the workers.

    publishNotReadyAddresses: workers must reach the GCS before the head reports Ready.
    """
    selector = names.pod_labels(ident, role=names.ROLE_HEAD)
    name = names.head_name(ident.name, ident.attempt)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(name, ident=ident, labels=names.pod_labels(ident, role=names.ROLE_HEAD)),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {k: selector[k] for k in (names.LABEL_JOB, names.LABEL_ROLE, names.LABEL_ATTEMPT)},
            "ports": [
                {"name": "gcs", "port": RAY_GCS_PORT, "targetPort": RAY_GCS_PORT, "protocol": "TCP"},
                {"name": "client", "port": RAY_CLIENT_PORT, "targetPort": RAY_CLIENT_PORT, "protocol": "TCP"},
                {"name": "dashboard", "port": RAY_DASHBOARD_PORT, "targetPort": RAY_DASHBOARD_PORT, "protocol": "TCP"},
                {"name": "metrics", "port": METRICS_PORT, "targetPort": METRICS_PORT, "protocol": "TCP"},
            ],
        },
    }


NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set by the API server on every namespace; not forgeable


def _job_pods_peer(ident: names.JobIdentity) -> Manifest:
    """The job's own pods. A podSelector without namespaceSelector matches only the policy's own namespace, so a
    pod elsewhere cannot qualify however it is labelled."""
    labels = {
        names.LABEL_NAME: names.APP_NAME,
        names.LABEL_MANAGED_BY: names.MANAGER,
        names.LABEL_JOB: names.job_label(ident.name),
    }
    return {"podSelector": {"matchLabels": labels}}


def _metrics_peers(settings: Settings) -> list[Manifest]:
    """Who may read the trainer metrics port: the operator's pods in its own namespace, and configured scrapers.

    Pod labels alone prove nothing across namespaces (anyone can label a pod), so every peer outside the job's
    namespace is pinned by namespace: the operator's by its name label, scrapers by the configured labels.
    """
    peers: list[Manifest] = []
    if settings.operator_namespace:
        peers.append(
            {
                "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: settings.operator_namespace}},
                "podSelector": {"matchLabels": dict(settings.operator_pod_labels)},
            }
        )
    if settings.metrics_scraper_namespace_labels:
        scraper: Manifest = {"namespaceSelector": {"matchLabels": dict(settings.metrics_scraper_namespace_labels)}}
        if settings.metrics_scraper_pod_labels:
            scraper["podSelector"] = {"matchLabels": dict(settings.metrics_scraper_pod_labels)}
        peers.append(scraper)
    return peers


def build_network_policy(ident: names.JobIdentity, *, settings: Settings) -> Manifest:
    """Every port of the job's pods is closed except: all ports to the job's own pods, the metrics port to readers.

    Ray has no authentication: whatever reaches the GCS (6379), dashboard (8265, whose Jobs API runs code),
    client (10001) or raylet/object-manager/worker ports runs code in the job's pods with its S3 credentials.
    Only the job's pods talk Ray to each other; the operator reads nothing but the trainer metrics port, and so
    does Prometheus when operator settings name its namespace. Kubelet probes come from the node, which
    NetworkPolicy always admits.
    """
    ingress: list[Manifest] = [{"from": [_job_pods_peer(ident)]}]
    readers = _metrics_peers(settings)
    if readers:
        ingress.append({"from": readers, "ports": [{"port": METRICS_PORT, "protocol": "TCP"}]})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(names.network_policy_name(ident.name), ident=ident, labels=names.job_labels(ident.name)),
        "spec": {
            "podSelector": {
                "matchLabels": {names.LABEL_JOB: names.job_label(ident.name), names.LABEL_MANAGED_BY: names.MANAGER}
            },
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }


def _env(spec: ftspec.FineTuneJobSpec, ident: names.JobIdentity) -> list[Manifest]:
    env: list[Manifest] = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"},
        # Explicit: Ray 2.60 turns token auth on by itself when it finds ~/.ray/auth_token, and workers then fail.
        {"name": "RAY_AUTH_MODE", "value": "disabled"},
        # Ray's C++ gRPC uses c-ares, which ignores /etc/hosts entries; getaddrinfo honours them (harmless in k8s).
        {"name": "GRPC_DNS_RESOLVER", "value": "native"},
        # `ray start --block` drains its node on SIGTERM for up to 30 s by default (meant for Ray Serve traffic).
        # Here nothing is left to drain when it gets one: the head script stops Ray only after the trainer has
        # exited, and workers are stopped once the head is gone (a stop's checkpoint is the trainer's own drain,
        # STOP_DRAIN_ENV). Measured: ~60 s of every quick start's end was these idle drains.
        {"name": "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "value": "0"},
        # The root filesystem is read-only: temporary files and the caches tools keep under $HOME go to an
        # emptyDir. The image's Hugging Face cache ($HF_HOME, seeded at build) stays where the image put it.
        {"name": "TMPDIR", "value": SCRATCH_DIR},
        {"name": "HOME", "value": HOME_DIR},
        {"name": "FINETUNE_RUN_NAME", "value": ident.run_name},
        {"name": "FINETUNE_PVC_ROOT", "value": PVC_ROOT},
    ]
    secret = spec.storage.credentials_secret
    if secret:
        # Referenced, never copied: the operator itself cannot even read Secrets.
        env += [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}} for key in SECRET_KEYS]
    return env


def _pvc_claim(spec: ftspec.FineTuneJobSpec) -> str | None:
    if spec.model.uri.startswith("pvc://"):
        return spec.model.uri.removeprefix("pvc://").split("/", 1)[0] or None
    return None


def _volumes(spec: ftspec.FineTuneJobSpec, *, ident: names.JobIdentity, shape: PodShape) -> list[Manifest]:
    volumes: list[Manifest] = [
        {"name": "config", "configMap": {"name": names.config_map_name(ident.name)}},
        # Ray's object store: memory-backed, sized from the same shape as --object-store-memory.
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shape.shm_size}},
        {"name": "ray-tmp", "emptyDir": {}},
        {"name": "scratch", "emptyDir": {}},
    ]
    claim = _pvc_claim(spec)
    if claim:
        volumes.append({"name": "model-pvc", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
    return volumes


def _mounts(spec: ftspec.FineTuneJobSpec) -> list[Manifest]:
    mounts: list[Manifest] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "ray-tmp", "mountPath": RAY_TMP_DIR},
        {"name": "scratch", "mountPath": SCRATCH_DIR},
    ]
    claim = _pvc_claim(spec)
    if claim:
        mounts.append({"name": "model-pvc", "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": True})
    return mounts


def _tolerations(spec: ftspec.FineTuneJobSpec, *, gpus: int) -> list[Manifest]:
    tolerations = [dict(t) for t in spec.resources.tolerations]
    if gpus > 0 and not any(t.get("key") == GPU_RESOURCE for t in tolerations):
        # GPU nodes are commonly tainted nvidia.com/gpu:NoSchedule; a GPU job must tolerate that by itself.
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    return tolerations


def _container_security() -> Manifest:
    """Restricted Pod Security Standard, plus a read-only root filesystem (writable paths are emptyDirs)."""
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


@dataclasses.dataclass(frozen=True)
class PodTemplate:
    """What differs between the head and a worker pod; everything else is common to both."""

    name: str
    labels: dict[str, str]
    command: str
    shape: PodShape
    ports: tuple[Manifest, ...]
    probe_port: int
    env: tuple[Manifest, ...] = ()
    grace_seconds: int | None = None  # terminationGracePeriodSeconds (None: Kubernetes' default, 30 s)


def _resources(shape: PodShape) -> Manifest:
    amounts: dict[str, str] = {"cpu": shape.cpu, "memory": shape.memory}
    if shape.gpus > 0:
        amounts[GPU_RESOURCE] = str(shape.gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _pod(
    spec: ftspec.FineTuneJobSpec, *, settings: Settings, ident: names.JobIdentity, template: PodTemplate
) -> Manifest:
    pod_spec: Manifest = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [
            {
                "name": "ray",
                "image": spec.image or settings.trainer_image,
                "imagePullPolicy": settings.image_pull_policy,
                "command": ["/bin/sh", "-c", template.command],
                "env": [*_env(spec, ident), *template.env],
                "ports": list(template.ports),
                "resources": _resources(template.shape),
                "volumeMounts": _mounts(spec),
                "readinessProbe": {
                    "tcpSocket": {"port": template.probe_port},
                    "periodSeconds": 5,
                    "failureThreshold": 3,
                },
                "securityContext": _container_security(),
                "terminationMessagePath": contract.TERMINATION_MESSAGE_PATH,
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }
        ],
        "volumes": _volumes(spec, ident=ident, shape=template.shape),
    }
    if template.grace_seconds is not None:
        pod_spec["terminationGracePeriodSeconds"] = template.grace_seconds
    if spec.resources.node_selector:
        pod_spec["nodeSelector"] = dict(spec.resources.node_selector)
    tolerations = _tolerations(spec, gpus=template.shape.gpus)
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if spec.resources.affinity:
        pod_spec["affinity"] = dict(spec.resources.affinity)
    if spec.resources.priority_class_name:
        pod_spec["priorityClassName"] = spec.resources.priority_class_name
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _metadata(template.name, ident=ident, labels=template.labels),
        "spec": pod_spec,
    }


HEAD_SCRIPT = """\
ray start --head --block --port={gcs} --num-cpus={cpus} --node-ip-address=$POD_IP \\
  --dashboard-host=0.0.0.0 --dashboard-port={dashboard} --object-store-memory={store} \\
  --temp-dir={tmp} --disable-usage-stats &
ray_pid=$!
i=0
until python -c "import os, socket; socket.create_connection((os.environ['POD_IP'], {gcs}), 1)" 2>/dev/null; do
  if ! kill -0 $ray_pid 2>/dev/null; then wait $ray_pid; exit $?; fi
  i=$((i + 1)); if [ $i -ge 300 ]; then echo "Ray head did not start within 300 s" >&2; exit 1; fi
  sleep 1
done
RAY_ADDRESS=$POD_IP:{gcs} finetune train --config {config} --run-name {run} --attempt {attempt} \\
  --metrics-port {metrics} &
train_pid=$!
trap 'kill -TERM $train_pid 2>/dev/null' TERM INT
wait $train_pid; rc=$?
while kill -0 $train_pid 2>/dev/null; do wait $train_pid; rc=$?; done
kill -TERM $ray_pid 2>/dev/null; wait $ray_pid 2>/dev/null
exit $rc
"""


def head_command(spec: ftspec.FineTuneJobSpec, ident: names.JobIdentity) -> str:
    """Start the Ray head (no CPUs: training runs on the workers), then the trainer; the trainer's exit ends the pod.

    Why a small supervisor script rather than `ray start && exec train`: `ray start --head` without --block
    daemonizes GCS/raylet/dashboard, which nothing stops when the trainer exits (a leak wherever pods share a PID
    namespace, and no clean Ray shutdown anywhere). With --block in the background, stopping that one process
    stops its daemons (Ray's reaper). SIGTERM (suspend, deletion) is forwarded to the trainer so it can stop
    cleanly, and the pod's exit code is the trainer's. The driver connects to this pod's own GCS by address
    (RAY_ADDRESS), never "auto" (which scans processes and can find another cluster). No --ray-client-server-port:
    the driver runs here and the trainer image need not carry ray[client].
    """
    shape = head_shape(spec.resources)
    return HEAD_SCRIPT.format(
        gcs=RAY_GCS_PORT,
        cpus=shape.ray_cpus,
        dashboard=RAY_DASHBOARD_PORT,
        store=shape.object_store_bytes,
        tmp=RAY_TMP_DIR,
        config=f"{CONFIG_DIR}/{CONFIG_FILE}",
        run=ident.run_name,
        attempt=ident.attempt,
        metrics=METRICS_PORT,
    )


def worker_command(spec: ftspec.FineTuneJobSpec, ident: names.JobIdentity) -> str:
    """Join the head of this attempt and block, advertising exactly the shape the trainer driver asks for."""
    shape = worker_shape(spec.resources)
    return (
        f"exec ray start --address={names.head_address(ident)}:{RAY_GCS_PORT} --num-cpus={shape.ray_cpus} "
        f"--num-gpus={shape.gpus} --node-ip-address=$POD_IP --object-store-memory={shape.object_store_bytes} "
        f"--node-manager-port={RAY_NODE_MANAGER_PORT} --temp-dir={RAY_TMP_DIR} --disable-usage-stats --block"
    )


def build_head_pod(spec: ftspec.FineTuneJobSpec, *, settings: Settings, ident: names.JobIdentity) -> Manifest:
    env, grace = _head_stop(settings)
    template = PodTemplate(
        name=names.head_name(ident.name, ident.attempt),
        labels=names.pod_labels(ident, role=names.ROLE_HEAD),
        command=head_command(spec, ident),
        shape=head_shape(spec.resources),
        ports=(
            {"name": "gcs", "containerPort": RAY_GCS_PORT, "protocol": "TCP"},
            {"name": "client", "containerPort": RAY_CLIENT_PORT, "protocol": "TCP"},
            {"name": "dashboard", "containerPort": RAY_DASHBOARD_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ),
        probe_port=RAY_GCS_PORT,
        env=env,
        grace_seconds=grace,
    )
    return _pod(spec, settings=settings, ident=ident, template=template)


def _head_stop(settings: Settings) -> tuple[tuple[Manifest, ...], int | None]:
    """How the head stops on request: the trainer's drain budget (contract.STOP_DRAIN_ENV) and a grace period that
    covers it plus the log upload and Ray's shutdown. Without a drain, Kubernetes' default grace period."""
    drain = settings.stop_drain_seconds
    if drain <= 0:
        return (), None
    return ({"name": contract.STOP_DRAIN_ENV, "value": str(drain)},), drain + contract.STOP_DRAIN_MARGIN_SECONDS


def build_worker_pod(
    spec: ftspec.FineTuneJobSpec, *, settings: Settings, ident: names.JobIdentity, index: int
) -> Manifest:
    template = PodTemplate(
        name=names.worker_name(ident.name, ident.attempt, index),
        labels=names.pod_labels(ident, role=names.ROLE_WORKER, index=index),
        command=worker_command(spec, ident),
        shape=worker_shape(spec.resources),
        ports=({"name": "raylet", "containerPort": RAY_NODE_MANAGER_PORT, "protocol": "TCP"},),
        probe_port=RAY_NODE_MANAGER_PORT,
    )
    return _pod(spec, settings=settings, ident=ident, template=template)


def build_children(spec: ftspec.FineTuneJobSpec, *, settings: Settings, ident: names.JobIdentity) -> Rendered:
    """Every child of the job's current attempt. `spec` must already be resolved (see resolve_spec)."""
    return Rendered(
        config_map=build_config_map(spec, ident=ident),
        network_policy=build_network_policy(ident, settings=settings),
        service=build_service(ident),
        head=build_head_pod(spec, settings=settings, ident=ident),
        workers=tuple(
            build_worker_pod(spec, settings=settings, ident=ident, index=i) for i in range(spec.resources.workers)
        ),
    )


def artifact_uris(spec: ftspec.FineTuneJobSpec, *, ident: names.JobIdentity) -> dict[str, str]:
    """Where the trainer's artifacts are, per contract.py's layout under the resolved output URI."""
    base = (spec.output.uri or "").rstrip("/")
    artifacts = {
        "model": f"{base}/{contract.MODEL_DIR}/",
        "checkpoint": f"{base}/{contract.CHECKPOINTS_DIR}/{ident.run_name}/",
        "metrics": f"{base}/{contract.METRICS_FILE}",
        "report": f"{base}/{contract.REPORT_FILE}",
        "manifest": f"{base}/{contract.MANIFEST}",
        "logs": f"{base}/{contract.LOGS_DIR}/",
    }
    if spec.method.strategy is ftspec.Strategy.LORA:
        artifacts["adapter"] = f"{base}/{contract.ADAPTER_DIR}/"
    return artifacts
