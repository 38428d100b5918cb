"""STAND-IN for the real image builder (owned by the images engineer; replaced at merge).

It implements exactly the agreed interface -- `Image`, `ensure_images(names)`, `load_into_containerd(images,
address=...)` -- for the three images the real node and its tests need before the real module lands:

- `pause`: the pod sandbox, a static C program (gcc -static) that reaps zombies and exits on SIGTERM/SIGINT;
- `coredns`: the CoreDNS binary built by hack/build-binaries.sh (static, CGO off);
- `base`: a Debian bookworm root filesystem from `debootstrap --variant=minbase --include=python3`.

Each is built with buildah (from scratch, private vfs storage under $FT_CACHE/images-standin so the real
builder's cache and concurrent builds of other sessions are not disturbed), pushed to an OCI archive keyed by
a hash of its inputs, and imported with containerd's `ctr`. A changed input means a new tag; an unchanged one
is never rebuilt.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from devcluster.binaries import cache_dir, locate

REGISTRY = "localhost/finetune"
PAUSE_C = r"""
#include <signal.h>
#include <unistd.h>
#include <sys/wait.h>
/* The pod sandbox's PID 1: holds the pod's namespaces, reaps orphans, exits on SIGINT/SIGTERM. */
static void down(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, 0, WNOHANG) > 0) {} }
int main(void) {
  struct sigaction d = {.sa_handler = down}, r = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP};
  sigaction(SIGINT, &d, 0);
  sigaction(SIGTERM, &d, 0);
  sigaction(SIGCHLD, &r, 0);
  for (;;) pause();
}
"""
BASE_SUITE = "bookworm"
BASE_MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = "python3"


@dataclass(frozen=True)
class Image:
    """A locally built image: its short name and the full reference pods use."""

    name: str
    ref: str


def _run(*argv: str, log: Callable[[str], None]) -> str:
    res = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if res.returncode != 0:
        log(res.stdout[-2000:])
        raise RuntimeError(f"{' '.join(argv[:4])} ... failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
    return res.stdout.strip()


def _buildah(*args: str, log: Callable[[str], None]) -> str:
    store = cache_dir() / "images-standin" / "buildah"
    return _run(
        "buildah",
        f"--root={store / 'root'}",
        f"--runroot={store / 'run'}",
        "--storage-driver=vfs",
        *args,
        log=log,
    )


def pause_binary(out: Path) -> Path:
    """Compile the sandbox program statically (glibc's libc.a from libc6-dev)."""
    src = out.with_suffix(".c")
    src.write_text(PAUSE_C)
    subprocess.run(["gcc", "-static", "-Os", "-s", "-o", str(out), str(src)], check=True)
    return out


def _recipe(name: str) -> str:
    """Everything that determines an image's content (its tag is a hash of this)."""
    if name == "pause":
        return "pause:v1\n" + PAUSE_C
    if name == "coredns":
        binary = locate().node.coredns
        return "coredns:v1\n" + hashlib.sha256(binary.read_bytes()).hexdigest()
    if name == "base":
        return f"base:v1 debootstrap --variant=minbase --include={BASE_PACKAGES} {BASE_SUITE} {BASE_MIRROR}"
    raise ValueError(f"the images stand-in builds only pause, coredns and base, not {name!r}")


def _archive(image: Image) -> Path:
    return cache_dir() / "images-standin" / image.name / f"{image.ref.rsplit(':', 1)[1]}.oci.tar"


def _commit(ctr: str, image: Image, *, config: Sequence[str], log: Callable[[str], None]) -> None:
    _buildah("config", *config, ctr, log=log)
    _buildah("commit", "--quiet", ctr, image.ref, log=log)
    dest = _archive(image)
    tmp = dest.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    _buildah("push", "--quiet", image.ref, f"oci-archive:{tmp}:{image.ref}", log=log)
    tmp.rename(dest)
    _buildah("rm", ctr, log=log)
    _buildah("rmi", image.ref, log=log)


def _build(image: Image, *, log: Callable[[str], None]) -> None:
    _archive(image).parent.mkdir(parents=True, exist_ok=True)
    ctr = _buildah("from", "--quiet", "scratch", log=log)
    with tempfile.TemporaryDirectory(prefix=f"ft-image-{image.name}-") as tmp:
        if image.name == "pause":
            _buildah("copy", ctr, str(pause_binary(Path(tmp) / "pause")), "/pause", log=log)
            config = ["--entrypoint", '["/pause"]', "--env", "PATH=/"]
        elif image.name == "coredns":
            _buildah("copy", ctr, str(locate().node.coredns), "/coredns", log=log)
            config = ["--entrypoint", '["/coredns"]', "--env", "PATH=/", "--port", "53/udp", "--port", "53/tcp"]
        else:
            rootfs = Path(tmp) / "rootfs"
            _run(
                "debootstrap",
                "--variant=minbase",
                f"--include={BASE_PACKAGES}",
                BASE_SUITE,
                str(rootfs),
                BASE_MIRROR,
                log=log,
            )
            shutil.rmtree(rootfs / "var" / "cache" / "apt" / "archives", ignore_errors=True)
            mnt = Path(_buildah("mount", ctr, log=log))
            _run("cp", "-a", f"{rootfs}/.", f"{mnt}/", log=log)
            config = [
                "--env",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--cmd",
                '["/bin/sh"]',
            ]
        _commit(ctr, image, config=[*config, "--os", "linux", "--arch", "amd64"], log=log)


def ensure_images(names: Sequence[str], *, log: Callable[[str], None] = print) -> dict[str, Image]:
    """Build whichever of `names` changed (cached by input hash); return them by name."""
    out = {}
    for name in names:
        tag = hashlib.sha256(_recipe(name).encode()).hexdigest()[:12]
        image = Image(name=name, ref=f"{REGISTRY}/{name}:{tag}")
        if not _archive(image).exists():
            log(f"building image {image.ref} (images stand-in) ...")
            _build(image, log=log)
        out[name] = image
    return out


def load_into_containerd(
    images: Iterable[Image], *, address: Path, namespace: str = "k8s.io", log: Callable[[str], None] = print
) -> None:
    """Import each image into the containerd at `address` unless that namespace already has it."""
    ctr = str(locate().node.ctr)
    base = [ctr, f"--address={address}", f"--namespace={namespace}"]
    present = set(_run(*base, "images", "list", "--quiet", log=log).split())
    for image in images:
        if image.ref in present:
            continue
        log(f"importing {image.ref} into {address}")
        _run(*base, "images", "import", str(_archive(image)), log=log)
