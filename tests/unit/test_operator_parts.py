"""Smaller pure parts: settings, trainer metrics parsing, merge patches, preflight, RBAC, render, metrics."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_operator import commands, preflight, rbac
from finetune_operator.metrics import OperatorMetrics
from finetune_operator.services.reconcile import merge_patch
from finetune_operator.settings import LogFormat, MetricsSource, SettingsError, load_settings
from finetune_operator.settings import markdown_table as settings_table
from finetune_operator.status_model import Phase, Progress, Status
from finetune_operator.trainer_metrics import MetricsParseError, parse_trainer_metrics
from finetune_trainer import contract
from finetune_trainer import spec as ftspec

REPO = Path(__file__).resolve().parents[2]


# ---- settings ----
def test_settings_from_env_and_flags() -> None:
    env = {
        "FINETUNE_NAMESPACES": "team-a, team-b",
        "FINETUNE_METRICS_PORT": "9090",
        "FINETUNE_KEEP_CLUSTER_ON_FINISH": "true",
        "FINETUNE_LOG_FORMAT": "text",
        "POD_NAME": "op-0",
        "POD_NAMESPACE": "finetune-system",
    }
    s = load_settings(["--metrics-port", "9191", "--no-leader-election"], env)
    assert s.namespaces == ("team-a", "team-b") and not s.clusterwide
    assert s.metrics_port == 9191  # flags win
    assert s.keep_cluster_on_finish is True and s.leader_election is False
    assert s.identity == "op-0" and s.lease_namespace == "finetune-system"
    assert s.log_format is LogFormat.TEXT
    assert s.metrics_source is MetricsSource.HTTP


def test_settings_defaults() -> None:
    s = load_settings([], {})
    assert (s.metrics_port, s.health_port, s.clusterwide, s.leader_election) == (8080, 8081, True, True)
    assert s.identity  # host name + pid when POD_NAME is unset


def test_bad_setting_names_the_variable() -> None:
    with pytest.raises(SettingsError, match="FINETUNE_MAX_CONCURRENCY"):
        load_settings([], {"FINETUNE_MAX_CONCURRENCY": "0"})


# ---- trainer metrics ----
METRICS_TEXT = f"""# HELP {contract.Metric.STEP} steps
# TYPE {contract.Metric.STEP} gauge
{contract.Metric.STEP} 120.0
{contract.Metric.TOTAL_STEPS} 400.0
{contract.Metric.EPOCH} 0.9
{contract.Metric.LOSS} 0.31
{contract.Metric.EVAL_METRIC}{{metric="eval_accuracy"}} 0.87
{contract.Metric.SAMPLES_PER_SECOND} 55.5
{contract.Metric.RESUMED_FROM_STEP} 100
{contract.Metric.PHASE}{{phase="Loading"}} 0
{contract.Metric.PHASE}{{phase="Training"}} 1
"""


def test_parse_trainer_metrics() -> None:
    sample = parse_trainer_metrics(METRICS_TEXT)
    assert (sample.step, sample.total_steps, sample.resumed_from_step) == (120, 400, 100)
    assert sample.eval_metrics == {"eval_accuracy": pytest.approx(0.87)}
    assert sample.watched("eval_accuracy") == ("eval_accuracy", pytest.approx(0.87))
    assert sample.trainer_phase is contract.TrainerPhase.TRAINING
    assert parse_trainer_metrics("").step is None


@pytest.mark.parametrize("phase", ["Initializing", "Loading"])
def test_metrics_before_the_first_report_are_not_progress(phase: str) -> None:
    """A relaunched driver exposes its gauges at 0 until a worker reports: that is not step 0 (it may resume)."""
    text = f"""{contract.Metric.STEP} 0.0
{contract.Metric.TOTAL_STEPS} 0.0
{contract.Metric.RESUMED_FROM_STEP} 0.0
{contract.Metric.LAST_CHECKPOINT_STEP} 0.0
{contract.Metric.PHASE}{{phase="{phase}"}} 1
{contract.Metric.PHASE}{{phase="Training"}} 0
"""
    sample = parse_trainer_metrics(text)
    assert sample.trainer_phase is contract.TrainerPhase(phase)
    assert (sample.step, sample.total_steps, sample.resumed_from_step, sample.last_checkpoint_step) == (None,) * 4


def test_parse_garbage_raises() -> None:
    with pytest.raises(MetricsParseError):
        parse_trainer_metrics("this is { not prometheus")


# ---- merge patch ----
@dataclasses.dataclass(frozen=True)
class PatchCase:
    name: str
    old: dict[str, Any]
    new: dict[str, Any]
    patch: dict[str, Any]


PATCHES = [
    PatchCase("unchanged", {"a": 1}, {"a": 1}, {}),
    PatchCase("removed key becomes null", {"a": 1, "b": 2}, {"a": 1}, {"b": None}),
    PatchCase("nested", {"p": {"x": 1, "y": 2}}, {"p": {"x": 1, "y": 3}}, {"p": {"y": 3}}),
    PatchCase("nested removal", {"p": {"x": 1, "y": 2}}, {"p": {"x": 1}}, {"p": {"y": None}}),
    PatchCase("lists replace", {"c": [1, 2]}, {"c": [1]}, {"c": [1]}),
]


@pytest.mark.parametrize("case", PATCHES, ids=[c.name for c in PATCHES])
def test_merge_patch(case: PatchCase) -> None:
    assert merge_patch(case.old, case.new) == case.patch


# ---- preflight ----
def _node(name: str, *, gpus: int = 0, cpu: str = "8", memory: str = "32Gi", **extra: Any) -> dict[str, Any]:
    alloc = {"cpu": cpu, "memory": memory}
    if gpus:
        alloc["nvidia.com/gpu"] = str(gpus)
    return {
        "kind": "Node",
        "metadata": {"name": name, "labels": extra.get("labels", {})},
        "spec": {"taints": extra.get("taints", [])},
        "status": {"allocatable": alloc},
    }


BASE = {"model": {"uri": "hf://o/m"}, "dataset": {"train": "s3://d/t.csv"}}


@dataclasses.dataclass(frozen=True)
class FlightCase:
    name: str
    resources: dict[str, Any]
    nodes: list[dict[str, Any]]
    field: str | None


FLIGHTS = [
    FlightCase("fits", {"gpusPerWorker": 1}, [_node("a"), _node("g", gpus=4)], None),
    FlightCase("too many gpus", {"gpusPerWorker": 8}, [_node("a"), _node("g", gpus=4)], "spec.resources.gpusPerWorker"),
    FlightCase("too much cpu", {"cpusPerWorker": "16"}, [_node("a")], "spec.resources.cpusPerWorker"),
    FlightCase("too much memory", {"memoryPerWorker": "64Gi"}, [_node("a")], "spec.resources.memoryPerWorker"),
    FlightCase(
        "selector matches nothing", {"nodeSelector": {"pool": "gpu"}}, [_node("a")], "spec.resources.nodeSelector"
    ),
    FlightCase("big head", {"head": {"cpu": "32", "memory": "1Gi"}}, [_node("a")], "spec.resources.head"),
    FlightCase("no node list: nothing to check", {"gpusPerWorker": 64}, [], None),
    FlightCase(
        "gpu taint is tolerated automatically",
        {"gpusPerWorker": 1},
        [_node("cpu"), _node("g", gpus=1, taints=[{"key": "nvidia.com/gpu", "effect": "NoSchedule"}])],
        None,
    ),
    FlightCase(
        "the head does not tolerate the gpu taint",
        {"gpusPerWorker": 1},
        [_node("g", gpus=1, taints=[{"key": "nvidia.com/gpu", "effect": "NoSchedule"}])],
        "spec.resources.head",
    ),
]


@pytest.mark.parametrize("case", FLIGHTS, ids=[c.name for c in FLIGHTS])
def test_preflight(case: FlightCase) -> None:
    problems = preflight.preflight(ftspec.parse_spec({**BASE, "resources": case.resources}), case.nodes)
    if case.field is None:
        assert problems == []
    else:
        assert {p[0] for p in problems} == {case.field}
        assert all("no node can run" in p[1] for p in problems)


# ---- RBAC ----
def test_deploy_rbac_matches_generator() -> None:
    committed = list(yaml.safe_load_all((REPO / "deploy" / "rbac.yaml").read_text(encoding="utf-8")))
    assert committed == rbac.manifests("finetune-system"), "deploy/rbac.yaml drifted: python -m finetune_operator.rbac"
    kueue = list(yaml.safe_load_all((REPO / "deploy" / "rbac-kueue.yaml").read_text(encoding="utf-8")))
    assert kueue == rbac.kueue_manifests("finetune-system"), "deploy/rbac-kueue.yaml drifted: make crds"


def test_rbac_has_no_wildcards_and_no_secrets() -> None:
    for rule in (*rbac.JOB_RULES, *rbac.LEASE_RULES):
        assert "*" not in rule.verbs and "*" not in rule.resources and rule.api_group != "*"
        assert "secrets" not in rule.resources
        assert rule.why


def test_rbac_doc_lists_every_rule() -> None:
    doc = (REPO / "docs" / "rbac.md").read_text(encoding="utf-8")
    assert rbac.markdown_table() in doc, "docs/rbac.md drifted from finetune_operator/rbac.py"


# ---- render ----
JOB = """
apiVersion: finetune.dev/v1alpha1
kind: FineTuneJob
metadata: {name: demo, namespace: team-a}
spec:
  model: {uri: hf://o/m}
  dataset: {train: s3://d/t.csv}
  output: {uri: s3://out/demo/}
  resources: {workers: 2, gpusPerWorker: 2}
"""


def test_render_prints_every_child(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(JOB, encoding="utf-8")
    assert commands.render_main([str(job)]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [
        ("ConfigMap", "demo-config"),
        ("NetworkPolicy", "demo-ray"),
        ("Service", "demo-a1-head"),
        ("Pod", "demo-a1-head"),
        ("Pod", "demo-a1-worker-0"),
        ("Pod", "demo-a1-worker-1"),
    ]


def test_render_preflight_refuses_with_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(JOB, encoding="utf-8")
    nodes = tmp_path / "nodes.yaml"
    nodes.write_text(yaml.safe_dump({"kind": "List", "items": [_node("a", gpus=1)]}), encoding="utf-8")
    assert commands.render_main([str(job), "--nodes", str(nodes)]) == 3
    err = capsys.readouterr().err
    assert "spec.resources.gpusPerWorker: no node can run a worker pod (a: 1 GPUs)" in err


def test_render_invalid_spec_names_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(JOB.replace("resources: {workers: 2, gpusPerWorker: 2}", "method: {strategy: full, lora: {r: 4}}"))
    assert commands.render_main([str(job)]) == 2
    assert "spec.method" in capsys.readouterr().err


# ---- operator metrics ----
def test_per_job_series_are_removed_when_the_job_is_deleted() -> None:
    m = OperatorMetrics()
    m.observe_status(namespace="ns", name="a", status=Status(phase=Phase.RUNNING, progress=Progress(step=3, loss=0.5)))
    text = m.exposition().decode()
    assert 'finetune_job_step{name="a",namespace="ns"} 3.0' in text
    assert 'finetune_jobs{phase="Running"} 1.0' in text
    m.forget(namespace="ns", name="a")
    text = m.exposition().decode()
    assert 'name="a"' not in text and 'finetune_jobs{phase="Running"} 0.0' in text


def test_settings_reference_is_documented() -> None:
    doc = (REPO / "docs" / "operator.md").read_text(encoding="utf-8")
    assert settings_table() in doc, "docs/operator.md drifted from Settings: regenerate its settings table"


def test_pod_events_find_their_job_by_owner_reference_not_by_label() -> None:
    from finetune_operator.handlers import owning_job  # noqa: PLC0415  (kopf import only here)

    long_name = "sst2-minilm-lr2e-5-bs32-seed42-" + "x" * 84
    ref = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "name": long_name, "controller": True}
    assert owning_job({"labels": {"finetune.dev/job": "shortened"}, "ownerReferences": [ref]}) == long_name
    assert owning_job({"ownerReferences": [{**ref, "kind": "ReplicaSet"}]}) is None
    assert owning_job({}) is None


def test_the_pod_watch_is_filtered_by_the_api_server() -> None:
    import kopf  # noqa: PLC0415
    from finetune_operator.handlers import kopf_settings  # noqa: PLC0415

    settings = kopf_settings(max_workers=4)
    pods = kopf.Resource(group="", version="v1", plural="pods", kind="Pod", namespaced=True)
    jobs = kopf.Resource(group="finetune.dev", version="v1alpha1", plural="finetunejobs", namespaced=True)
    selector = settings.watching.label_selectors.collect(pods)
    assert selector == ["app.kubernetes.io/managed-by=finetune-operator,app.kubernetes.io/name=finetune-job"]
    assert settings.watching.label_selectors.collect(jobs) == []
