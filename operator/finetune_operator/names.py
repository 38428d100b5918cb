"""Names and labels of every object the operator creates for a FineTuneJob.

Why a module: names are the operator's idempotency keys. Creating `<job>-a2-worker-0` twice is a harmless 409, and
an operator restarted at any moment finds its children again by name and label, so nothing important lives only in
memory. Pods and the head Service carry the attempt number, so a new attempt never collides with the terminating
pods of the previous one. Every name stays within the 63-character DNS label limit: the CRD caps job names at
MAX_JOB_NAME characters and MAX_ATTEMPT / MAX_WORKERS bound the suffixes.
"""

from __future__ import annotations

import dataclasses

from finetune_trainer import spec as ftspec

GROUP = ftspec.API_GROUP
API_VERSION = f"{ftspec.API_GROUP}/{ftspec.API_VERSION}"
KIND = ftspec.KIND
PLURAL = ftspec.PLURAL

MAX_JOB_NAME = 45  # 45 + len("-a9999-worker-1023") = 63
MAX_ATTEMPT = 9999

LABEL_NAME = "app.kubernetes.io/name"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_JOB = f"{GROUP}/job"
LABEL_ROLE = f"{GROUP}/role"
LABEL_ATTEMPT = f"{GROUP}/attempt"
LABEL_WORKER_INDEX = f"{GROUP}/worker-index"
ANNOTATION_RUN_NAME = f"{GROUP}/run-name"

APP_NAME = "finetune-job"
MANAGER = "finetune-operator"
ROLE_HEAD = "head"
ROLE_WORKER = "worker"

# Selects every pod the operator manages (used by the pod watch and the NetworkPolicy).
MANAGED_SELECTOR = {LABEL_MANAGED_BY: MANAGER, LABEL_NAME: APP_NAME}


@dataclasses.dataclass(frozen=True)
class JobIdentity:
    """Which job and which attempt a set of children belongs to."""

    name: str
    namespace: str
    uid: str
    attempt: int = 1

    @property
    def run_name(self) -> str:
        """Ray Train run name: stable across attempts and suspend/resume so checkpoints are found again.

        The uid suffix keeps a re-created job of the same name from resuming someone else's checkpoints.
        """
        return f"{self.name}-{self.uid.replace('-', '')[:8]}"


def config_map_name(job: str) -> str:
    return f"{job}-config"


def network_policy_name(job: str) -> str:
    return f"{job}-ray"


def head_name(job: str, attempt: int) -> str:
    """The head pod and its headless Service share this name (the Service's DNS name is the head's address)."""
    return f"{job}-a{attempt}-head"


def worker_name(job: str, attempt: int, index: int) -> str:
    return f"{job}-a{attempt}-worker-{index}"


def head_address(ident: JobIdentity) -> str:
    return f"{head_name(ident.name, ident.attempt)}.{ident.namespace}.svc.cluster.local"


def job_labels(job: str) -> dict[str, str]:
    return {LABEL_NAME: APP_NAME, LABEL_MANAGED_BY: MANAGER, LABEL_INSTANCE: job, LABEL_JOB: job}


def pod_labels(ident: JobIdentity, *, role: str, index: int | None = None) -> dict[str, str]:
    labels = job_labels(ident.name) | {LABEL_ROLE: role, LABEL_ATTEMPT: str(ident.attempt)}
    if index is not None:
        labels[LABEL_WORKER_INDEX] = str(index)
    return labels


def job_selector(job: str) -> str:
    """Label selector string for every child of a job."""
    return f"{LABEL_MANAGED_BY}={MANAGER},{LABEL_JOB}={job}"
