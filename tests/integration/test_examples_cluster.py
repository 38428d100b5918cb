"""Every file in examples/ is applied to the real API server (server-side dry run) so none can rot.

Why server-side: only the API server runs the CRD's structural schema and CEL rules, Kubernetes' own validation
of Secrets/Deployments/Services, and defaulting. A dry run changes nothing, so the shared cluster stays clean.
Files without a namespace are applied with `-n <test namespace>` (how users apply them); files whose objects
name their own namespace (the kind MinIO) get that namespace created first, as `kubectl apply` of the whole file
would do for real.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from devcluster import DevCluster
from devcluster.testing import wait_crd_established
from tests.fixtures.helm import CHART_CRD_DIR, CRD_FILE

pytestmark = pytest.mark.cluster

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FILES = sorted(EXAMPLES.rglob("*.yaml"))
CRD_NAME = "finetunejobs.finetune.dev"


@pytest.fixture(scope="module")
def crd_installed(cluster: DevCluster) -> None:
    """The FineTuneJob CRD (the generated one, as shipped in the chart), applied idempotently."""
    cluster.kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=examples-test",
        "-f",
        str(CHART_CRD_DIR / CRD_FILE),
    )
    with cluster.api() as api:  # not `kubectl wait`: it can fail with "accessor error: <nil>" this early
        wait_crd_established(api, CRD_NAME)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_example_is_accepted_by_the_api_server(
    cluster: DevCluster, namespace: str, crd_installed: None, path: Path
) -> None:
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
    own = {d["metadata"]["namespace"] for d in documents if d["metadata"].get("namespace")}
    created = []
    for ns in sorted(own):
        if cluster.kubectl("get", "namespace", ns, check=False).returncode != 0:
            cluster.kubectl("create", "namespace", ns)
            created.append(ns)
    try:
        scope = [] if own else ["--namespace", namespace]
        out = cluster.kubectl(
            "apply", "--server-side", "--dry-run=server", "--field-manager=examples-test", *scope, "-f", str(path)
        ).stdout
        applied = [line for line in out.splitlines() if "(server dry run)" in line]
        assert len(applied) == len(documents), out
    finally:
        for ns in created:
            cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
