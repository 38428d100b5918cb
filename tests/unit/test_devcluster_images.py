"""The pure parts of devcluster.images and devcluster.registry: what a build reads, its hash, its command, pruning.

Why they matter: the image tag is a hash of what the build reads. If `copy_sources` missed a file the Dockerfile
copies, a change to it would leave a stale image in use; if the hash moved with irrelevant input, every run
would rebuild.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devcluster import images, registry

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Case:
    name: str
    given: Any
    expected: Any = None
    error: str | None = None


COPY_CASES = [
    Case("plain", "FROM x\nCOPY a.txt /a.txt\n", ["a.txt"]),
    Case("several sources", "COPY pyproject.toml requirements.lock ./\n", ["pyproject.toml", "requirements.lock"]),
    Case("dot slash", "COPY ./src/ /opt/src/\n", ["src/"]),
    Case("flags", "COPY --chown=1:1 --chmod=644 conf.yml /etc/c.yml\n", ["conf.yml"]),
    Case("from another stage", "COPY --from=build /opt/venv /opt/venv\n", []),
    Case("json form", 'COPY ["a b.txt", "/x/"]\n', ["a b.txt"]),
    Case("add", "ADD rootfs.tar /\n", ["rootfs.tar"]),
    Case("lower case", "copy x /x\n", ["x"]),
    Case("continued", "COPY a \\\n  b \\\n  /dst/\n", ["a", "b"]),
    Case("comment inside a continuation", "COPY a \\\n# note\n  /dst/\n", ["a"]),
    Case("not a copy", "RUN cp a b\nENV COPY=1\n", []),
    Case("missing destination", "COPY onlyone\n", error="needs a source and a destination"),
]


@pytest.mark.parametrize("case", COPY_CASES, ids=lambda c: c.name)
def test_copy_sources(case: Case) -> None:
    if case.error:
        with pytest.raises(ValueError, match=case.error):
            images.copy_sources(case.given)
    else:
        assert images.copy_sources(case.given) == case.expected


IGNORE = "# caches\n.venv\n**/__pycache__\n**/*.pyc\n.cache/\n"
IGNORE_CASES = [
    Case("root dir", ".venv/bin/python", True),
    Case("same name deeper is kept", "docs/.venv", False),
    Case("pycache anywhere", "operator/finetune_operator/__pycache__/x.cpython-311.pyc", True),
    Case("pycache at the root", "__pycache__/x", True),
    Case("pyc at the root", "setup.pyc", True),
    Case("trailing slash pattern", ".cache/hf/blob", True),
    Case("source file", "trainer/finetune_trainer/spec.py", False),
    Case("prefix is not a match", ".venvx/file", False),
]


@pytest.mark.parametrize("case", IGNORE_CASES, ids=lambda c: c.name)
def test_dockerignore_matching(case: Case) -> None:
    assert images.is_ignored(case.given, images.ignore_patterns(IGNORE)) is case.expected


def test_dockerignore_exceptions_are_refused() -> None:
    with pytest.raises(ValueError, match="not supported"):
        images.ignore_patterns("*.md\n!README.md\n")


BASE = images.Recipe(name="operator", dockerfile="operator/Dockerfile", context=".", network=True)
DIGEST_ARGS: dict[str, Any] = {"dockerfile": "FROM x\n", "files": {"a": "-1"}, "build_args": {"BASE_IMAGE": "b:1"}}
DIGEST_CASES = [
    Case("dockerfile text", {"dockerfile": "FROM y\n"}),
    Case("a file's content", {"files": {"a": "-2"}}),
    Case("a file's mode", {"files": {"a": "x1"}}),
    Case("a new file", {"files": {"a": "-1", "b": "-1"}}),
    Case("the base image", {"build_args": {"BASE_IMAGE": "b:2"}}),
    Case("a build argument", {"build_args": {"BASE_IMAGE": "b:1", "TORCH_INDEX_URL": "u"}}),
    Case("the target", {"recipe": dataclasses.replace(BASE, target="cpu")}),
    Case("a pinned version", {"recipe": dataclasses.replace(BASE, pins=(("MINIO_VERSION", "v2"),))}),
]


@pytest.mark.parametrize("case", DIGEST_CASES, ids=lambda c: c.name)
def test_input_digest_changes_with_every_input(case: Case) -> None:
    before = images.input_digest(BASE, **DIGEST_ARGS)
    changed = {**DIGEST_ARGS, **case.given}
    recipe = changed.pop("recipe", BASE)
    assert images.input_digest(recipe, **changed) != before


def test_input_digest_ignores_mapping_order() -> None:
    a = images.input_digest(BASE, dockerfile="x", files={"a": "1", "b": "2"}, build_args={"K": "1", "L": "2"})
    b = images.input_digest(BASE, dockerfile="x", files={"b": "2", "a": "1"}, build_args={"L": "2", "K": "1"})
    assert a == b


TABLE = images.recipes({"COREDNS_VERSION": "v1", "MINIO_VERSION": "v2"}, gcc_version="12")
ORDER_CASES = [
    Case("product image pulls in the base", ["operator"], ["base", "operator"]),
    Case("order is fixed", ["trainer", "operator"], ["base", "operator", "trainer"]),
    Case("scratch images need no base", ["pause"], ["pause"]),
    Case("base alone", ["base"], ["base"]),
    Case("infrastructure on the base", ["coredns", "pause"], ["base", "pause", "coredns"]),
    Case("unknown", ["operator", "kafka"], error="unknown image"),
]


@pytest.mark.parametrize("case", ORDER_CASES, ids=lambda c: c.name)
def test_build_order(case: Case) -> None:
    if case.error:
        with pytest.raises(ValueError, match=case.error):
            images.build_order(case.given, TABLE)
    else:
        assert images.build_order(case.given, TABLE) == case.expected


def _argv(recipe: images.Recipe) -> list[str]:
    return images.build_argv(
        recipe,
        ref="localhost/finetune/x:abc",
        digest="abc",
        dockerfile=Path("/r/Dockerfile"),
        context=Path("/r"),
        build_args={**dict(recipe.build_args), "BASE_IMAGE": "localhost/finetune/base:1"},
        host_ca=Path("/etc/ca.crt"),
        uv_cache=Path("/root/.cache/uv"),
    )


def test_build_argv_shares_ca_and_uv_cache_only_with_downloading_builds() -> None:
    trainer = _argv(TABLE["trainer"])
    assert trainer[:3] == ["buildah", "bud", "--isolation"] and trainer[-1] == "/r"
    assert "--layers" in trainer and "--pull=never" in trainer
    assert trainer[trainer.index("--target") : trainer.index("--target") + 2] == ["--target", "cpu"]
    assert "/root/.cache/uv:/mnt" in trainer and "UV_CACHE_DIR=/mnt" in trainer
    assert "/etc/ca.crt:/etc/ssl/certs/ca-certificates.crt:ro" in trainer
    assert "TORCH_INDEX_URL=https://pypi.org/simple" in trainer
    prometheus = _argv(TABLE["prometheus"])
    assert "--volume" not in prometheus and "--target" not in prometheus


def test_every_recipe_file_exists_and_copies_what_exists() -> None:
    for recipe in TABLE.values():
        dockerfile = (ROOT / recipe.dockerfile).read_text()
        if recipe.context is not None:
            for source in images.copy_sources(dockerfile):
                assert (ROOT / recipe.context / source).exists(), f"{recipe.dockerfile} copies missing {source}"


@pytest.mark.parametrize("name", ["operator", "trainer"])
def test_dependency_layer_depends_on_the_dependency_list_and_lock_only(name: str) -> None:
    """The caching promise: neither a code change nor a tool setting in pyproject.toml rebuilds the dependency layer
    (GBs for the trainer): before it, the image stage copies only the lock and the extracted dependency list."""
    lines = images.logical_lines((ROOT / name / "Dockerfile").read_text())
    stage = max(i for i, line in enumerate(lines) if line.startswith("FROM ${BASE_IMAGE}"))
    deps = next(i for i, line in enumerate(lines) if "-r requirements.in" in line)
    copies = [line for line in lines[stage:deps] if line.startswith("COPY")]
    assert copies == ["COPY --from=requirements /src/requirements.in ./", "COPY requirements.lock ./"]
    assert any(line.startswith("COPY operator/") for line in lines[deps:])
    extract = next(line for line in lines if "tomllib" in line)
    assert f'["optional-dependencies"]["{name}"]' in extract


RELEASE_CASES = [
    Case("3.16.0", "v0.316.0", "3.16.0"),
    Case("patch", "v0.305.2", "3.5.2"),
    Case("2.x module version", "v0.54.1", error="not a 3.x module version"),
    Case("a release tag", "v3.16.0", error="not a 3.x module version"),
]


@pytest.mark.parametrize("case", RELEASE_CASES, ids=lambda c: c.name)
def test_prometheus_release_of_its_module_version(case: Case) -> None:
    if case.error:
        with pytest.raises(ValueError, match=case.error):
            images.prometheus_release(case.given)
    else:
        assert images.prometheus_release(case.given) == case.expected


def _entry(ref: str, digest: str) -> dict[str, Any]:
    return {"digest": digest, "annotations": {registry.REF_NAME: ref}}


LAYOUT = [
    _entry("localhost/finetune/operator:a", "1"),
    _entry("localhost/finetune/trainer:a", "2"),
    _entry("localhost/finetune/operator:b", "3"),
    _entry("localhost/finetune/operator:c", "4"),
]
KEEP_CASES = [
    Case("newest two per repository", {"per_repository": 2}, ["2", "3", "4"]),
    Case("newest one", {"per_repository": 1}, ["2", "4"]),
    Case("an older one asked for", {"per_repository": 1, "keep": {"localhost/finetune/operator:a"}}, ["1", "2", "4"]),
]


@pytest.mark.parametrize("case", KEEP_CASES, ids=lambda c: c.name)
def test_layout_keeps_the_newest_entries(case: Case) -> None:
    kept = registry.keep_newest(LAYOUT, **case.given)
    assert [e["digest"] for e in kept] == case.expected
