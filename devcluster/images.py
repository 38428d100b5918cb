"""Container images without Docker or a registry: built with buildah from this repository's Dockerfiles, cached by a
hash of their inputs, and imported into containerd.

Why: the dev cluster's node runs real containers, so the operator and trainer images must be the real product
images (their Dockerfiles' own steps, not a virtualenv copied in), built on a machine that reaches no container
registry. The base image comes from Debian's packages (images/base), the product Dockerfiles take it as
BASE_IMAGE, and the node's infrastructure images (pause, coredns, minio, prometheus) are built the same way.

Caching: an image's tag is 12 hex digits of a SHA-256 over everything its build reads: the Dockerfile, target and
build arguments (BASE_IMAGE is the base's own tag, so a new base rebuilds what sits on it), every file the
Dockerfile COPYs or ADDs from the repository (less .dockerignore's caches), the recipe's own files under images/,
and the pinned versions of what is built outside (CoreDNS, MinIO, gcc for pause). An existing tag means nothing
to do. Otherwise `buildah bud --layers` reuses each step whose inputs are unchanged: the Dockerfiles install
dependencies before copying the sources, so a code change rebuilds only the small layers above that.

Importing: images go into one OCI layout (`podman save --uncompressed`, which writes only missing blobs) and
containerd pulls them from devcluster.registry, fetching only the blobs it lacks.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from devcluster import registry
from devcluster.binaries import REPO_ROOT, cache_dir, versions

NAMES = ("base", "operator", "trainer", "pause", "coredns", "minio", "prometheus")
REF_PREFIX = "localhost/finetune/"
KEEP_TAGS = 3  # per image, in buildah's storage and in the OCI layout; older ones are pruned after a build / load
HEARTBEAT_SECONDS = 30.0

Log = Callable[[str], None]


class ImageBuildError(RuntimeError):
    """An image could not be built or imported; the message says which, why, and where the full log is."""


@dataclass(frozen=True)
class Image:
    name: str  # "base" | "operator" | "trainer" | "pause" | "coredns" | "minio" | "prometheus"
    ref: str  # e.g. "localhost/finetune/operator:<content-hash12>": what pod specs and sandbox_image use


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """How one image is built: a Dockerfile, its context and what else its content depends on."""

    name: str
    dockerfile: str  # repository-relative
    context: str | None  # repository-relative build context; None: a directory staged by `stage`
    target: str | None = None
    build_args: tuple[tuple[str, str], ...] = ()
    on_base: bool = True  # built FROM our base image (--build-arg BASE_IMAGE=<base ref>)
    network: bool = False  # RUN steps download packages: share the host's CA bundle and uv cache
    stage: str | None = None  # host-side step that fills the staged context (STAGES)
    pins: tuple[tuple[str, str], ...] = field(default=())  # versions of what staging brings in (hashed)


def recipes(versions: Mapping[str, str], *, gcc_version: str = "") -> dict[str, Recipe]:
    """Every image's recipe; `versions` is hack/versions.env."""
    return {
        "base": Recipe(name="base", dockerfile="images/base/Dockerfile", context=None, on_base=False, stage="rootfs"),
        "operator": Recipe(name="operator", dockerfile="operator/Dockerfile", context=".", network=True),
        "trainer": Recipe(
            name="trainer",
            dockerfile="trainer/Dockerfile",
            context=".",
            target="cpu",
            # PyTorch's CPU index (the Dockerfile's default) is unreachable here: PyPI's torch is a CUDA build.
            build_args=(("TORCH_INDEX_URL", "https://pypi.org/simple"),),
            network=True,
        ),
        "pause": Recipe(
            name="pause",
            dockerfile="images/pause/Dockerfile",
            context=None,
            on_base=False,
            stage="pause",
            pins=(("gcc", gcc_version),),
        ),
        "coredns": Recipe(
            name="coredns",
            dockerfile="images/coredns/Dockerfile",
            context=None,
            stage="coredns",
            pins=(("COREDNS_VERSION", versions.get("COREDNS_VERSION", "")),),
        ),
        "minio": Recipe(
            name="minio",
            dockerfile="images/minio/Dockerfile",
            context=None,
            stage="minio",
            pins=(("MINIO_VERSION", versions.get("MINIO_VERSION", "")),),
        ),
        "prometheus": Recipe(
            name="prometheus",
            dockerfile="images/prometheus/Dockerfile",
            context=None,
            stage="prometheus",
            pins=(("PROMETHEUS_VERSION", versions.get("PROMETHEUS_VERSION", "")),),
        ),
    }


# --- pure: what a build reads ---------------------------------------------------------------------------------


def logical_lines(dockerfile: str) -> list[str]:
    """Dockerfile instructions with continuation lines joined and comment lines dropped."""
    out: list[str] = []
    current = ""
    for raw in dockerfile.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        out.append((current + stripped).strip())
        current = ""
    if current.strip():
        out.append(current.strip())
    return out


def copy_sources(dockerfile: str) -> list[str]:
    """Context paths that COPY and ADD instructions read (not those copying from another stage or image)."""
    sources: list[str] = []
    for line in logical_lines(dockerfile):
        keyword, _, rest = line.partition(" ")
        if keyword.upper() not in ("COPY", "ADD"):
            continue
        rest = rest.strip()
        args = [str(a) for a in json.loads(rest)] if rest.startswith("[") else shlex.split(rest)
        flags = [a for a in args if a.startswith("--")]
        paths = [a for a in args if not a.startswith("--")]
        if any(f.startswith("--from") for f in flags):
            continue
        if len(paths) < 2:
            raise ValueError(f"{line!r}: COPY/ADD needs a source and a destination")
        sources.extend(p.removeprefix("./") or "." for p in paths[:-1])
    return sources


def ignore_patterns(dockerignore: str) -> list[re.Pattern[str]]:
    """.dockerignore patterns as regexes over context-relative paths (`**` any directories, `*` within one)."""
    patterns: list[re.Pattern[str]] = []
    for raw in dockerignore.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("!"):
            raise ValueError(f".dockerignore exception {line!r} is not supported by devcluster.images")
        parts = re.split(r"(\*\*/|\*\*|\*|\?)", line.strip("/"))
        wild = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
        patterns.append(re.compile("".join(wild.get(p, re.escape(p)) for p in parts) + r"\Z"))
    return patterns


def is_ignored(relpath: str, patterns: Sequence[re.Pattern[str]]) -> bool:
    """True when the path or one of its parent directories matches a pattern (Docker's rule)."""
    parts = relpath.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(p.match(prefix) for p in patterns for prefix in prefixes)


def input_digest(recipe: Recipe, *, dockerfile: str, files: Mapping[str, str], build_args: Mapping[str, str]) -> str:
    """The SHA-256 over everything the build reads; `files` maps context-relative paths to their digests."""
    document = {
        "name": recipe.name,
        "dockerfile": hashlib.sha256(dockerfile.encode()).hexdigest(),
        "target": recipe.target,
        "build_args": sorted(build_args.items()),
        "files": sorted(files.items()),
        "pins": sorted(recipe.pins),
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def build_order(names: Iterable[str], table: Mapping[str, Recipe]) -> list[str]:
    """The requested images plus the base when one of them needs it, base first, in NAMES order."""
    wanted = set(names)
    unknown = wanted - set(table)
    if unknown:
        raise ValueError(f"unknown image(s) {sorted(unknown)}; known: {', '.join(NAMES)}")
    if any(table[n].on_base for n in wanted):
        wanted.add("base")
    return [n for n in NAMES if n in wanted]


def build_argv(
    recipe: Recipe,
    *,
    ref: str,
    digest: str,
    dockerfile: Path,
    context: Path,
    build_args: Mapping[str, str],
    host_ca: Path | None,
    uv_cache: Path | None,
) -> list[str]:
    """The buildah command for one image.

    chroot isolation: podman's default runtime here (crun 1.8) rejects this machine's hybrid cgroups, and the build
    steps need no cgroups. The host's CA bundle goes over the image's own bundle path (no mount point is left in a
    layer) so pip and uv trust this machine's TLS proxy; the host's uv cache goes on /mnt (an empty directory in
    Debian images) so torch is not downloaded a second time.
    """
    argv = ["buildah", "bud", "--isolation", "chroot", "--layers", "--force-rm", "--pull=never", "--format", "oci"]
    argv += ["--file", str(dockerfile), "--tag", ref, "--label", f"dev.finetune.inputs={digest}"]
    if recipe.target:
        argv += ["--target", recipe.target]
    args = dict(build_args)
    if recipe.network and uv_cache is not None:
        argv += ["--volume", f"{uv_cache}:/mnt"]
        args["UV_CACHE_DIR"] = "/mnt"
    if recipe.network and host_ca is not None:
        argv += ["--volume", f"{host_ca}:/etc/ssl/certs/ca-certificates.crt:ro"]
    for key, value in sorted(args.items()):
        argv += ["--build-arg", f"{key}={value}"]
    return [*argv, str(context)]


# --- reading the repository -----------------------------------------------------------------------------------


def _file_digests(root: Path, paths: Iterable[str], *, ignore: Sequence[re.Pattern[str]]) -> dict[str, str]:
    digests: dict[str, str] = {}
    for rel in paths:
        top = root / rel
        if not top.exists():
            raise ImageBuildError(f"{top} is copied by a Dockerfile but does not exist")
        for path in sorted([top] if top.is_file() else top.rglob("*")):
            name = path.relative_to(root).as_posix()
            if path.is_file() and not is_ignored(name, ignore):
                mode = "x" if os.access(path, os.X_OK) else "-"
                digests[name] = mode + hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def _inputs(recipe: Recipe) -> tuple[str, dict[str, str]]:
    """The recipe's Dockerfile text and the digests of the files its build reads."""
    text = (REPO_ROOT / recipe.dockerfile).read_text()
    if recipe.context is None:  # staged: everything in the recipe's own directory, plus its pins
        recipe_dir = (REPO_ROOT / recipe.dockerfile).parent
        return text, _file_digests(recipe_dir, ["."], ignore=())
    context = REPO_ROOT / recipe.context
    ignore_file = context / ".dockerignore"
    ignore = ignore_patterns(ignore_file.read_text()) if ignore_file.is_file() else []
    return text, _file_digests(context, copy_sources(text), ignore=ignore)


def _gcc_version() -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        return "missing"
    return subprocess.run([gcc, "-dumpfullversion"], capture_output=True, text=True, check=False).stdout.strip()


def plan(names: Sequence[str]) -> list[tuple[Recipe, Image, dict[str, str]]]:
    """Recipe, image (with its content-hash tag) and build arguments of each image to ensure, base first."""
    table = recipes(versions(), gcc_version=_gcc_version() if "pause" in names else "")
    out: list[tuple[Recipe, Image, dict[str, str]]] = []
    base_ref = ""
    for name in build_order(names, table):
        recipe = table[name]
        args = dict(recipe.build_args)
        if recipe.on_base:
            args["BASE_IMAGE"] = base_ref
        text, files = _inputs(recipe)
        digest = input_digest(recipe, dockerfile=text, files=files, build_args=args)
        image = Image(name, f"{REF_PREFIX}{name}:{digest[:12]}")
        base_ref = image.ref if name == "base" else base_ref
        out.append((recipe, image, args))
    return out


# --- building -------------------------------------------------------------------------------------------------


def ensure_images(names: Sequence[str], *, log: Log = print) -> dict[str, Image]:
    """Build what changed among `names` (and the base they need); returns every ensured image by name."""
    started = time.monotonic()
    result: dict[str, Image] = {}
    present = _local_refs()
    for recipe, image, args in plan(names):
        result[image.name] = image
        if image.ref in present:
            log(f"images: {image.name} up to date ({image.ref})")
            continue
        with _lock(f"image-{image.name}"):
            if image.ref in _local_refs():  # a concurrent session built it while we waited
                log(f"images: {image.name} built by another session ({image.ref})")
                continue
            _build(recipe, image, args, log=log)
        _prune_tags(image.name, keep=KEEP_TAGS, log=log)
    log(f"images: {len(result)} image(s) ready in {time.monotonic() - started:.1f}s")
    return result


def _build(recipe: Recipe, image: Image, args: Mapping[str, str], *, log: Log) -> None:
    started = time.monotonic()
    digest = image.ref.rsplit(":", 1)[1]
    logs = cache_dir() / "images" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{image.name}-{digest}.log"
    log(f"images: building {image.name} -> {image.ref} (log: {log_path})")
    with _context(recipe, log=log, log_path=log_path) as context:
        argv = build_argv(
            recipe,
            ref=image.ref,
            digest=digest,
            dockerfile=REPO_ROOT / recipe.dockerfile,
            context=context,
            build_args=args,
            host_ca=_host_ca(),
            uv_cache=_uv_cache() if recipe.network else None,
        )
        _run_logged(["nice", "-n", "10", *argv], what=f"building {image.name}", log=log, log_path=log_path)
    size = _image_size(image.ref)
    log(f"images: built {image.name} in {time.monotonic() - started:.1f}s ({size / 1e6:.0f} MB) -> {image.ref}")


@contextlib.contextmanager
def _context(recipe: Recipe, *, log: Log, log_path: Path) -> Iterator[Path]:
    """The build context: a repository directory, or a staged one holding the recipe's files and artifacts."""
    if recipe.context is not None:
        yield REPO_ROOT / recipe.context
        return
    work = cache_dir() / "images" / "work"
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work, prefix=f"{recipe.name}-") as tmp:
        staged = Path(tmp)
        shutil.copytree((REPO_ROOT / recipe.dockerfile).parent, staged, dirs_exist_ok=True)
        STAGES[recipe.stage or ""](staged, log=log, log_path=log_path)
        yield staged


def _stage_rootfs(staged: Path, *, log: Log, log_path: Path) -> None:
    log("images: base: debootstrap bookworm + python3.11 (a cold run takes 2-4 minutes)")
    script = REPO_ROOT / "images" / "base" / "mkrootfs.sh"
    _run_logged(
        ["nice", "-n", "10", "bash", str(script), str(staged / "rootfs.tar")],
        what="debootstrap",
        log=log,
        log_path=log_path,
    )


def _stage_pause(staged: Path, *, log: Log, log_path: Path) -> None:
    out = staged / "pause"
    cmd = ["gcc", "-Os", "-static", "-Wall", "-Wextra", "-Werror", "-o", str(out), str(staged / "pause.c")]
    _run_logged(cmd, what="compiling pause.c", log=log, log_path=log_path)
    _run_logged(["strip", str(out)], what="stripping pause", log=log, log_path=log_path)


def _stage_coredns(staged: Path, *, log: Log, log_path: Path) -> None:
    binary = ensure_go_tool(GO_TOOLS["coredns"], log=log)
    shutil.copy2(binary, staged / "coredns")
    # No file capability: a binary with one cannot even be exec'd in a pod that drops ALL capabilities (EPERM).
    # Binding :53 as non-root works because containerd sets ip_unprivileged_port_start=0 in every pod.


def _stage_minio(staged: Path, *, log: Log, log_path: Path) -> None:
    version = versions()["MINIO_VERSION"]
    binary = cache_dir() / "minio" / version / "bin" / "minio"
    if not os.access(binary, os.X_OK):
        _run_logged(
            ["bash", str(REPO_ROOT / "hack" / "build-minio.sh")], what="building minio", log=log, log_path=log_path
        )
    shutil.copy2(binary, staged / "minio")


def _stage_prometheus(staged: Path, *, log: Log, log_path: Path) -> None:
    shutil.copy2(ensure_go_tool(GO_TOOLS["prometheus"], log=log), staged / "prometheus")


STAGES: dict[str, Callable[..., None]] = {
    "rootfs": _stage_rootfs,
    "pause": _stage_pause,
    "coredns": _stage_coredns,
    "minio": _stage_minio,
    "prometheus": _stage_prometheus,
}


@dataclass(frozen=True, kw_only=True)
class GoTool:
    """A binary built from its Go module the way its release is: static, trimmed, with the release's ldflags."""

    name: str  # output: $FT_CACHE/<name>/<version>/bin/<name>
    package: str  # module path of the main package, installed as package@version
    version_key: str  # hack/versions.env key of the module version
    ldflags: Callable[[str, str], str]  # (version, commit) -> -X flags
    tags: str = ""


GO_TOOLS = {
    # The same output path, lock and ldflags as hack/build-binaries.sh: whichever runs first builds it once.
    "coredns": GoTool(
        name="coredns",
        package="github.com/coredns/coredns",
        version_key="COREDNS_VERSION",
        ldflags=lambda _version, commit: f"-X github.com/coredns/coredns/coremain.GitCommit={commit[:7]}",
    ),
    # Module v0.3XX.Y is Prometheus 3.XX.Y. Only Kubernetes service discovery: the rest would triple the build.
    "prometheus": GoTool(
        name="prometheus",
        package="github.com/prometheus/prometheus/cmd/prometheus",
        version_key="PROMETHEUS_VERSION",
        ldflags=lambda version, commit: " ".join(
            f"-X github.com/prometheus/common/version.{key}={value}"
            for key, value in (("Version", prometheus_release(version)), ("Revision", commit), ("Branch", "HEAD"))
        ),
        tags="remove_all_sd enable_kubernetes_sd",
    ),
}


def prometheus_release(module_version: str) -> str:
    """Prometheus' release for its Go module version: v0.316.0 -> 3.16.0 (3.x releases are tagged v0.3XX.Y)."""
    match = re.fullmatch(r"v0\.3(\d{2})\.(\d+)", module_version)
    if not match:
        raise ValueError(f"PROMETHEUS_VERSION {module_version!r} is not a 3.x module version (v0.3XX.Y)")
    return f"3.{int(match[1])}.{match[2]}"


def ensure_go_tool(tool: GoTool, *, log: Log = print) -> Path:
    """$FT_CACHE/<name>/<version>/bin/<name>, built with `go install` unless it exists."""
    version = versions()[tool.version_key]
    out = cache_dir() / tool.name / version / "bin" / tool.name
    with _lock(tool.name, directory=cache_dir() / ".locks"):
        if os.access(out, os.X_OK):
            return out
        started = time.monotonic()
        log(f"images: building {tool.name} {version} from its Go module (cold: several minutes)")
        module = tool.package.split("/cmd/")[0]
        env = {**os.environ, "GOFLAGS": "", "CGO_ENABLED": "0", "GOTOOLCHAIN": "local"}
        download = ["go", "mod", "download", "-json", f"{module}@{version}"]
        info = subprocess.run(download, env=env, capture_output=True, text=True, check=True)
        commit = str(json.loads(info.stdout).get("Origin", {}).get("Hash", ""))
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent.parent) as gobin:
            ldflags = f"-s -w {tool.ldflags(version, commit)}"
            cmd = ["go", "install", "-trimpath", "-tags", tool.tags, "-ldflags", ldflags, f"{tool.package}@{version}"]
            subprocess.run(["nice", "-n", "10", *cmd], env={**env, "GOBIN": gobin}, check=True)
            shutil.move(Path(gobin) / tool.name, out)
        log(f"images: built {tool.name} {version} in {time.monotonic() - started:.0f}s")
    return out


def _run_logged(argv: Sequence[str], *, what: str, log: Log, log_path: Path) -> None:
    """Run a long command: output to log_path, STEP lines and a heartbeat to `log`, the tail on failure."""
    started = time.monotonic()
    done = threading.Event()

    def heartbeat() -> None:
        while not done.wait(HEARTBEAT_SECONDS):
            log(f"images:   ... {what}: {time.monotonic() - started:.0f}s")

    ticker = threading.Thread(target=heartbeat, daemon=True)
    ticker.start()
    tail: list[str] = []
    try:
        with log_path.open("a") as out:
            out.write(f"$ {shlex.join(argv)}\n")
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                tail = [*tail[-39:], line.rstrip()]
                if re.match(r"^(\[\d+/\d+\] )?STEP \d+/\d+", line):
                    log(f"images:   {line.rstrip()[:150]}")
            code = proc.wait()
    finally:
        done.set()
    if code != 0:
        raise ImageBuildError(f"{what} failed (exit {code}); full log {log_path}; last lines:\n" + "\n".join(tail))


def _local_refs() -> set[str]:
    """Every name:tag in buildah's storage."""
    proc = subprocess.run(["buildah", "images", "--json"], capture_output=True, text=True, check=True)
    return {name for entry in json.loads(proc.stdout or "[]") for name in entry.get("names") or []}


def _image_size(ref: str) -> int:
    """Bytes of the image's layers, uncompressed."""
    cmd = ["podman", "image", "inspect", "--format", "{{.Size}}", ref]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return int(proc.stdout.strip()) if proc.returncode == 0 and proc.stdout.strip().isdigit() else 0


def _prune_tags(name: str, *, keep: int, log: Log) -> None:
    """Untag all but the newest `keep` tags of an image; their layers go unless a kept image shares them."""
    proc = subprocess.run(["buildah", "images", "--json"], capture_output=True, text=True, check=True)
    tagged = [
        (int(entry.get("created") or 0), ref)
        for entry in json.loads(proc.stdout or "[]")
        for ref in entry.get("names") or []
        if ref.startswith(f"{REF_PREFIX}{name}:")
    ]
    for _, ref in sorted(tagged, reverse=True)[keep:]:
        rmi = subprocess.run(["buildah", "rmi", ref], capture_output=True, text=True, check=False)
        log(f"images: pruned {ref}" if rmi.returncode == 0 else f"images: kept {ref} (in use: {rmi.stderr.strip()})")


def prune(names: Sequence[str], *, log: Log = print) -> None:
    """Drop old tags of these images from buildah's storage and the OCI layout (the newest KEEP_TAGS stay)."""
    for name in names:
        _prune_tags(name, keep=KEEP_TAGS, log=log)
    layout = registry.Layout(cache_dir() / "images" / "oci")
    with layout.locked(exclusive=True):
        freed = registry.prune(layout, per_repository=KEEP_TAGS)
    log(f"images: freed {freed / 1e6:.0f} MB in {layout.root}")


def _host_ca() -> Path | None:
    path = Path(os.environ.get("SSL_CERT_FILE") or "/etc/ssl/certs/ca-certificates.crt")
    return path if path.is_file() else None


def _uv_cache() -> Path | None:
    uv = shutil.which("uv")
    if uv is None:
        return None
    proc = subprocess.run([uv, "cache", "dir"], capture_output=True, text=True, check=False)
    path = Path(proc.stdout.strip())
    return path if proc.returncode == 0 and path.is_dir() else None


@contextlib.contextmanager
def _lock(name: str, *, directory: Path | None = None) -> Iterator[None]:
    """An exclusive lock shared by every session on this machine (they share $FT_CACHE and buildah's storage)."""
    locks = directory or cache_dir() / "images" / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with (locks / f"{name}.lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


# --- importing into containerd --------------------------------------------------------------------------------


def load_into_containerd(
    images: Iterable[Image],
    *,
    address: Path,
    namespace: str = "k8s.io",
    registry_host: str = "127.0.0.1",
    log: Log = print,
) -> None:
    """Import images into the containerd listening on `address`; images already present there are skipped.

    containerd pulls from a registry served for the duration on `registry_host`, which must be reachable from
    containerd's network namespace (a real node's containerd has its own: pass the cluster bridge's gateway).
    """
    ctr = [str(ctr_binary()), "--address", str(address), "--namespace", namespace]
    listed = subprocess.run([*ctr, "images", "ls", "-q"], capture_output=True, text=True, check=False)
    if listed.returncode != 0:
        raise ImageBuildError(f"containerd at {address} does not answer: {listed.stderr.strip()}")
    present = set(listed.stdout.split())
    todo = []
    for image in images:
        if image.ref in present:
            log(f"images: {image.name} already in containerd ({image.ref})")
        else:
            todo.append(image)
    if not todo:
        return
    layout = registry.Layout(cache_dir() / "images" / "oci")
    with layout.locked(exclusive=True) as lock:
        _save_to_layout(todo, layout, log=log)
        lock.share()
        with registry.serve(layout, host=registry_host) as address_port, tempfile.TemporaryDirectory() as hosts:
            hosts_dir = _hosts_dir(Path(hosts), registry=address_port)
            for image in todo:
                _pull(ctr, image, hosts_dir=hosts_dir, log=log)


def _save_to_layout(images: Sequence[Image], layout: registry.Layout, *, log: Log) -> None:
    names = layout.names()
    for image in images:
        if image.ref in names:
            continue
        started = time.monotonic()
        cmd = ["podman", "save", "--format", "oci-dir", "--uncompressed", "--output", str(layout.root), image.ref]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise ImageBuildError(f"podman save {image.ref} failed: {proc.stderr.strip()[-2000:]}")
        log(f"images: exported {image.name} to the OCI layout in {time.monotonic() - started:.1f}s")
    freed = registry.prune(layout, per_repository=KEEP_TAGS, keep={i.ref for i in images})
    if freed:
        log(f"images: pruned {freed / 1e6:.0f} MB of old layers from {layout.root}")


def _hosts_dir(root: Path, *, registry: str) -> Path:
    """containerd's hosts.toml: registry "localhost" (our image names' host) is the loopback layout server."""
    (root / "localhost").mkdir(parents=True)
    (root / "localhost" / "hosts.toml").write_text(
        f'server = "http://{registry}"\n\n[host."http://{registry}"]\n  capabilities = ["pull", "resolve"]\n'
    )
    return root


def _pull(ctr: Sequence[str], image: Image, *, hosts_dir: Path, log: Log) -> None:
    started = time.monotonic()
    cmd = [*ctr, "images", "pull", "--hosts-dir", str(hosts_dir), image.ref]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ImageBuildError(f"ctr images pull {image.ref} failed: {(proc.stderr or proc.stdout).strip()[-2000:]}")
    log(f"images: imported {image.name} into containerd in {time.monotonic() - started:.1f}s ({image.ref})")


def ctr_binary() -> Path:
    """ctr: $FT_CTR, else the one built with the node's containerd (hack/versions.env), else PATH's."""
    return _containerd_tool("ctr", os.environ.get("FT_CTR"))


def containerd_binary() -> Path:
    """The containerd daemon that pairs with ctr_binary(): the same build, so ctr's transfer service exists."""
    ctr = ctr_binary()
    paired = ctr.parent / "containerd"
    if os.access(paired, os.X_OK):
        return paired
    raise ImageBuildError(f"no containerd next to {ctr}: build containerd (make binaries)")


def _containerd_tool(name: str, override: str | None) -> Path:
    built = cache_dir() / "containerd" / versions().get("CONTAINERD_VERSION", "none") / "bin" / name
    on_path = shutil.which(name)
    for candidate in (Path(override) if override else None, built, Path(on_path) if on_path else None):
        if candidate is not None and os.access(candidate, os.X_OK):
            return candidate
    raise ImageBuildError(f"{name} not found: build containerd (make binaries) or apt-get install containerd")


# --- command line ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devcluster.images", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the images whose inputs changed (default: all)")
    build.add_argument("names", nargs="*", metavar="NAME", help=" | ".join(NAMES))
    refs = sub.add_parser("refs", help="print name=ref of each image without building")
    refs.add_argument("names", nargs="*", metavar="NAME")
    load = sub.add_parser("load", help="build, then import into a containerd")
    load.add_argument("--address", type=Path, required=True, help="containerd's socket")
    load.add_argument("--namespace", default="k8s.io")
    load.add_argument("names", nargs="*", metavar="NAME")
    prune_cmd = sub.add_parser("prune", help=f"keep the newest {KEEP_TAGS} tags of each image, drop the rest")
    prune_cmd.add_argument("names", nargs="*", metavar="NAME")
    args = parser.parse_args(argv)
    names = list(args.names) or list(NAMES)

    def log(message: str) -> None:
        print(message, flush=True)

    try:
        if args.command == "refs":
            for _, image, _ in plan(names):
                print(f"{image.name}={image.ref}")
        elif args.command == "build":
            ensure_images(names, log=log)
        elif args.command == "prune":
            prune(names, log=log)
        else:
            built = ensure_images(names, log=log)
            wanted = [built[name] for name in names]  # not the base, unless asked for
            load_into_containerd(wanted, address=args.address, namespace=args.namespace, log=log)
    except (ImageBuildError, ValueError, subprocess.CalledProcessError) as e:
        print(f"images: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
