"""Pure builders: the manifests of a job's children, table-driven."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest
import yaml
from finetune_operator import builders, names
from finetune_operator.settings import Settings
from finetune_trainer import contract
from finetune_trainer import spec as ftspec
from finetune_trainer.shape import head_shape, worker_shape

IDENT = names.JobIdentity(name="sst2", namespace="team-a", uid="0123abcd-0000-1111-2222-333344445555", attempt=2)
SETTINGS = Settings(
    trainer_image="registry/trainer:1",
    output_base_uri="s3://models/",
    storage_endpoint="http://minio:9000",
    storage_region="eu-west-1",
    storage_credentials_secret="default-creds",
    identity="test",
)
BASE: dict[str, Any] = {"model": {"uri": "hf://org/model"}, "dataset": {"train": "s3://data/train.csv"}}


def _spec(**overrides: Any) -> ftspec.FineTuneJobSpec:
    data = {**BASE, **overrides}
    return builders.resolve_spec(ftspec.parse_spec(data), defaults=builders.operator_defaults(SETTINGS), ident=IDENT)


def _container(pod: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = pod["spec"]["containers"][0]
    return container


def _env(pod: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in _container(pod)["env"]}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    spec: dict[str, Any]
    check: Any  # Callable[[builders.Rendered], None]


def _gpu(r: builders.Rendered) -> None:
    worker = r.workers[0]
    assert _container(worker)["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert _container(worker)["resources"]["requests"] == _container(worker)["resources"]["limits"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in worker["spec"]["tolerations"]
    assert "nvidia.com/gpu" not in _container(r.head)["resources"]["limits"]
    assert "--num-gpus=2" in _container(worker)["command"][-1]


def _cpu(r: builders.Rendered) -> None:
    worker = r.workers[0]
    assert "nvidia.com/gpu" not in _container(worker)["resources"]["limits"]
    assert "tolerations" not in worker["spec"]
    assert _container(worker)["resources"]["limits"] == {"cpu": "500m", "memory": "1Gi"}
    assert "--num-cpus=1" in _container(worker)["command"][-1]  # one worker per pod (finetune_trainer.shape)


def _placement(r: builders.Rendered) -> None:
    for pod in (r.head, *r.workers):
        assert pod["spec"]["nodeSelector"] == {"pool": "gpu"}
        assert pod["spec"]["priorityClassName"] == "high"
        assert pod["spec"]["affinity"] == {"nodeAffinity": {"x": 1}}
        assert {"key": "dedicated", "operator": "Exists"} in pod["spec"]["tolerations"]


def _no_secret(r: builders.Rendered) -> None:
    # Settings supply a default secret, so env comes from secretKeyRef; never a literal value.
    env = _env(r.head)
    assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "mine", "key": "AWS_ACCESS_KEY_ID"}}
    assert all("value" not in e for e in _container(r.head)["env"] if e["name"].startswith("AWS_"))
    assert "AWS_SECRET_ACCESS_KEY" not in r.config_map["data"]["job.yaml"]


def _pvc(r: builders.Rendered) -> None:
    head = r.head
    assert {"name": "model-pvc", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}} in head["spec"][
        "volumes"
    ]
    assert {"name": "model-pvc", "mountPath": "/mnt/pvc/weights", "readOnly": True} in _container(head)["volumeMounts"]


def _workers(r: builders.Rendered) -> None:
    assert [w["metadata"]["name"] for w in r.workers] == [f"sst2-a2-worker-{i}" for i in range(3)]
    assert [w["metadata"]["labels"][names.LABEL_WORKER_INDEX] for w in r.workers] == ["0", "1", "2"]


def _image(r: builders.Rendered) -> None:
    assert _container(r.head)["image"] == "own/image:2"
    assert _container(r.workers[0])["image"] == "own/image:2"


def _default_image(r: builders.Rendered) -> None:
    assert _container(r.head)["image"] == "registry/trainer:1"


CASES = [
    Case("gpu workers", {"resources": {"gpusPerWorker": 2}}, _gpu),
    Case("cpu workers", {"resources": {"cpusPerWorker": "500m", "memoryPerWorker": "1Gi"}}, _cpu),
    Case(
        "placement",
        {
            "resources": {
                "nodeSelector": {"pool": "gpu"},
                "priorityClassName": "high",
                "affinity": {"nodeAffinity": {"x": 1}},
                "tolerations": [{"key": "dedicated", "operator": "Exists"}],
            }
        },
        _placement,
    ),
    Case("secret by reference", {"storage": {"credentialsSecret": "mine"}}, _no_secret),
    Case("pvc model", {"model": {"uri": "pvc://weights/bert"}}, _pvc),
    Case("three workers", {"resources": {"workers": 3}}, _workers),
    Case("job image", {"image": "own/image:2"}, _image),
    Case("default image", {}, _default_image),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_children(case: Case) -> None:
    case.check(builders.build_children(_spec(**case.spec), settings=SETTINGS, ident=IDENT))


def test_common_metadata_on_every_child() -> None:
    rendered = builders.build_children(_spec(), settings=SETTINGS, ident=IDENT)
    for obj in rendered.all():
        meta = obj["metadata"]
        assert meta["namespace"] == "team-a"
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "finetune.dev/v1alpha1",
                "kind": "FineTuneJob",
                "name": "sst2",
                "uid": IDENT.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert meta["labels"][names.LABEL_MANAGED_BY] == "finetune-operator"
        assert meta["labels"][names.LABEL_NAME] == "finetune-job"
        assert meta["labels"][names.LABEL_JOB] == "sst2"
        assert len(meta["name"]) <= 63


def test_pods_are_hardened_and_report_failures() -> None:
    """Restricted pod security plus a read-only root filesystem: every path Ray and the trainer write is an emptyDir."""
    rendered = builders.build_children(_spec(), settings=SETTINGS, ident=IDENT)
    for pod, shape in ((rendered.head, head_shape), *((w, worker_shape) for w in rendered.workers)):
        spec = pod["spec"]
        assert spec["restartPolicy"] == "Never"
        assert spec["automountServiceAccountToken"] is False and spec["enableServiceLinks"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 1000
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        c = _container(pod)
        assert c["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
        assert c["readinessProbe"]["tcpSocket"]["port"] in {6379, 6380}
        volumes = {v["name"]: v for v in spec["volumes"]}
        writable = {m["mountPath"] for m in c["volumeMounts"] if "emptyDir" in volumes[m["name"]]}
        assert writable == {"/dev/shm", "/tmp/ray", "/tmp/scratch"}
        assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": shape(_spec().resources).shm_size}
        env = _env(pod)
        assert env["TMPDIR"] == "/tmp/scratch" and env["HOME"].startswith("/tmp/scratch/")
        assert "--temp-dir=/tmp/ray" in c["command"][-1]


def test_head_runs_ray_then_trainer_and_workers_join_this_attempt() -> None:
    rendered = builders.build_children(_spec(), settings=SETTINGS, ident=IDENT)
    head_cmd = _container(rendered.head)["command"][-1]
    assert head_cmd.startswith("ray start --head --block --port=6379 --num-cpus=0 --node-ip-address=$POD_IP")
    assert "finetune train --config /etc/finetune/job.yaml --run-name sst2-0123abcd --attempt 2" in head_cmd
    assert head_cmd.rstrip().endswith("exit $rc")  # the trainer's exit code decides the attempt
    worker_cmd = _container(rendered.workers[0])["command"][-1]
    assert "--address=sst2-a2-head.team-a.svc.cluster.local:6379" in worker_cmd
    assert worker_cmd.endswith("--block")
    assert rendered.service["spec"]["clusterIP"] == "None"
    assert rendered.service["spec"]["selector"] == {
        names.LABEL_JOB: "sst2",
        names.LABEL_ROLE: "head",
        names.LABEL_ATTEMPT: "2",
    }
    assert {p["port"] for p in rendered.service["spec"]["ports"]} == {6379, 10001, 8265, 8000}


def test_config_map_holds_resolved_spec_with_operator_defaults() -> None:
    rendered = builders.build_children(_spec(), settings=SETTINGS, ident=IDENT)
    job = ftspec.parse_job(yaml.safe_load(rendered.config_map["data"]["job.yaml"]))
    assert job.spec.output.uri == "s3://models/team-a/sst2/"
    assert job.spec.storage.endpoint == "http://minio:9000"
    assert job.spec.storage.region == "eu-west-1"
    assert job.spec.storage.credentials_secret == "default-creds"


def test_job_values_win_over_operator_defaults() -> None:
    spec = _spec(output={"uri": "s3://mine/x/"}, storage={"region": "us-east-2", "endpoint": "http://s3:1"})
    assert spec.output.uri == "s3://mine/x/"
    assert spec.storage.region == "us-east-2" and spec.storage.endpoint == "http://s3:1"


def test_missing_output_without_default_is_invalid_spec() -> None:
    with pytest.raises(ftspec.SpecError) as error:
        builders.resolve_spec(
            ftspec.parse_spec(BASE), defaults=builders.operator_defaults(Settings(identity="x")), ident=IDENT
        )
    assert error.value.errors[0][0] == "spec.output.uri"


def test_ray_environment_avoids_known_pod_pitfalls() -> None:
    rendered = builders.build_children(_spec(), settings=SETTINGS, ident=IDENT)
    for pod in (rendered.head, *rendered.workers):
        env = _env(pod)
        assert env["RAY_AUTH_MODE"] == "disabled" and env["GRPC_DNS_RESOLVER"] == "native"
        assert env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] == "0"  # no idle 30 s drain when a Ray pod stops
    head_cmd = _container(rendered.head)["command"][-1]
    assert "--ray-client-server-port" not in head_cmd and "ray stop" not in head_cmd
    assert "RAY_ADDRESS=$POD_IP:6379 finetune train" in head_cmd


DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


@dataclasses.dataclass(frozen=True)
class NameCase:
    name: str
    job: str
    base: str | None = None  # expected child base when it is the name itself


NAME_CASES = [
    NameCase("short name is kept", "sst2", "sst2"),
    NameCase("45 characters are kept", "a" * 45, "a" * 45),
    NameCase("46 characters are hashed", "a" * 46),
    NameCase("115 characters", "sst2-minilm-lr2e-5-bs32-seed42-" + "x" * 84),
    NameCase("253 characters with dots", ("x" * 62 + ".") * 3 + "y" * 61),
    NameCase("dots", "sst2.minilm"),
    NameCase("starts with a digit", "9job"),
]


@pytest.mark.parametrize("case", NAME_CASES, ids=[c.name for c in NAME_CASES])
def test_every_valid_job_name_gives_valid_child_names(case: NameCase) -> None:
    base = names.child_base(case.job)
    if case.base is not None:
        assert base == case.base
    assert DNS_LABEL.match(base) and len(base) <= names.MAX_BASE
    assert base == names.child_base(case.job)  # stable
    ident = names.JobIdentity(name=case.job, namespace="ns", uid="0123abcd-0000", attempt=names.MAX_ATTEMPT)
    spec = _spec(resources={"workers": 3})
    rendered = builders.build_children(spec, settings=SETTINGS, ident=ident)
    for obj in rendered.all():
        assert DNS_LABEL.match(obj["metadata"]["name"]) and len(obj["metadata"]["name"]) <= 63, obj["metadata"]
        for value in obj["metadata"]["labels"].values():
            assert LABEL_VALUE.match(value) and len(value) <= 63, value
        assert obj["metadata"]["ownerReferences"][0]["name"] == case.job
    assert len(names.worker_name(case.job, names.MAX_ATTEMPT, names.MAX_WORKER_INDEX)) <= 63
    job = ftspec.parse_job(yaml.safe_load(rendered.config_map["data"]["job.yaml"]))
    assert job.metadata.name == case.job  # the trainer reads the full name


def test_long_names_sharing_a_prefix_get_different_children() -> None:
    prefix = "sst2-minilm-lr2e-5-bs32-seed42-" + "x" * 40
    assert names.child_base(prefix + "-a") != names.child_base(prefix + "-b")
    assert names.child_base(prefix + "-a").startswith("sst2-minilm-lr2e-5")


def test_artifacts_follow_the_contract_layout() -> None:
    uris = builders.artifact_uris(_spec(), ident=IDENT)
    assert uris["model"] == "s3://models/team-a/sst2/model/"
    assert uris["adapter"] == "s3://models/team-a/sst2/adapter/"
    assert uris["checkpoint"] == "s3://models/team-a/sst2/checkpoints/sst2-0123abcd/"
    assert uris["logs"] == "s3://models/team-a/sst2/logs/"
    assert "adapter" not in builders.artifact_uris(_spec(method={"strategy": "full"}), ident=IDENT)


@pytest.mark.parametrize("uri", ["file:///data/out/", "./runs/x", "/mnt/out"])
def test_cluster_jobs_refuse_local_output_but_finetune_run_accepts_it(uri: str) -> None:
    """Issue 11 item 7: a cluster job writing to file:// failed only after the whole run."""
    with pytest.raises(ftspec.SpecError) as error:
        _spec(output={"uri": uri})
    assert error.value.errors[0][0] == "spec.output.uri" and "s3://" in error.value.errors[0][1]
    assert ftspec.parse_spec({**BASE, "output": {"uri": uri}}).output.uri == uri  # `finetune run` reads it as is


@pytest.mark.parametrize(
    ("drain", "env", "grace"),
    [(90, "90", 90 + contract.STOP_DRAIN_MARGIN_SECONDS), (0, None, None)],
    ids=["drain", "no-drain"],
)
def test_the_head_gets_the_drain_budget_and_a_grace_period_that_covers_it(
    drain: int, env: str | None, grace: int | None
) -> None:
    settings = SETTINGS.model_copy(update={"stop_drain_seconds": drain})
    rendered = builders.build_children(_spec(), settings=settings, ident=IDENT)
    assert _env(rendered.head).get(contract.STOP_DRAIN_ENV) == env
    assert rendered.head["spec"].get("terminationGracePeriodSeconds") == grace
    for worker in rendered.workers:  # deleted only once the head stopped: Kubernetes' default is enough
        assert contract.STOP_DRAIN_ENV not in _env(worker)
        assert "terminationGracePeriodSeconds" not in worker["spec"]
