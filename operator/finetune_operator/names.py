"""Names and labels of every object the operator creates for a FineTuneJob.

Why a module: names are the operator's idempotency keys. Creating `<job>-a2-worker-0` twice is a harmless 409, and
an operator restarted at any moment finds its children again by name and label, so nothing important lives only in
memory. Pods and the head Service carry the attempt number, so a new attempt never collides with the terminating
pods of the previous one.

Job names may be any valid custom-resource name (a DNS subdomain of up to 253 characters, dots allowed), but a
Service name is a DNS label (63 characters, a letter first, no dots) and so is a label value. Every child name
therefore starts with `child_base(job)`: the job name itself when it is a short DNS label, else a readable prefix
plus a hash of the whole name (stable and unique), at most MAX_BASE characters, so that the longest suffix
("-a9999-worker-1023") still fits in 63.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

from finetune_trainer import spec as ftspec

GROUP = ftspec.API_GROUP
VERSION = ftspec.API_VERSION  # "v1alpha1"
GROUP_VERSION = f"{GROUP}/{VERSION}"  # an object's apiVersion: "finetune.dev/v1alpha1"
KIND = ftspec.KIND
PLURAL = ftspec.PLURAL

MAX_ATTEMPT = 9999
MAX_WORKER_INDEX = 1023  # spec.resources.workers <= 1024
MAX_BASE = 63 - len(f"-a{MAX_ATTEMPT}-worker-{MAX_WORKER_INDEX}")  # 45
HASH_LENGTH = 10
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

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

        The uid suffix keeps a re-created job of the same name from resuming someone else's checkpoints; the
        base keeps it a short path component whatever the job's name.
        """
        return f"{child_base(self.name)}-{self.uid.replace('-', '')[:8]}"


def child_base(job: str) -> str:
    """The job's name where it fits a DNS label of MAX_BASE characters, else `<readable prefix>-<hash>`.

    The hash covers the whole name, so two long names sharing a prefix still get different children.
    """
    if len(job) <= MAX_BASE and _DNS_LABEL.match(job):
        return job
    digest = hashlib.sha256(job.encode()).hexdigest()[:HASH_LENGTH]
    readable = re.sub(r"[^a-z0-9-]", "-", job.lower())
    if not readable[:1].isalpha():
        readable = "j-" + readable
    stem = readable[: MAX_BASE - HASH_LENGTH - 1].rstrip("-")
    return f"{stem}-{digest}"


def config_map_name(job: str) -> str:
    return f"{child_base(job)}-config"


def network_policy_name(job: str) -> str:
    return f"{child_base(job)}-ray"


def head_name(job: str, attempt: int) -> str:
    """The head pod and its headless Service share this name (the Service's DNS name is the head's address)."""
    return f"{child_base(job)}-a{attempt}-head"


def worker_name(job: str, attempt: int, index: int) -> str:
    return f"{child_base(job)}-a{attempt}-worker-{index}"


def head_address(ident: JobIdentity) -> str:
    return f"{head_name(ident.name, ident.attempt)}.{ident.namespace}.svc.cluster.local"


def job_label(job: str) -> str:
    """The value of the job labels (a label value is at most 63 characters): the child base."""
    return child_base(job)


def job_labels(job: str) -> dict[str, str]:
    value = job_label(job)
    return {LABEL_NAME: APP_NAME, LABEL_MANAGED_BY: MANAGER, LABEL_INSTANCE: value, LABEL_JOB: value}


def pod_labels(ident: JobIdentity, *, role: str, index: int | None = None) -> dict[str, str]:
    labels = job_labels(ident.name) | {LABEL_ROLE: role, LABEL_ATTEMPT: str(ident.attempt)}
    if index is not None:
        labels[LABEL_WORKER_INDEX] = str(index)
    return labels


def job_selector(job: str) -> str:
    """Label selector string for every child of a job."""
    return f"{LABEL_MANAGED_BY}={MANAGER},{LABEL_JOB}={job_label(job)}"
