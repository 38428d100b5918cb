"""Images reach containerd's k8s.io namespace (where the kubelet looks) and run there under runc.

A private containerd (Debian's package, its own root, state and socket under a temp dir) stands in for the node's:
load_into_containerd imports the images, a second load finds them present and moves nothing, and `ctr run`
starts containers from them as their image's non-root user.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from devcluster.images import Image, ctr_binary, load_into_containerd

pytestmark = [pytest.mark.images]


def _ctr(socket: Path, *args: str) -> str:
    argv = [str(ctr_binary()), "--address", str(socket), "--namespace", "k8s.io", *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"ctr {' '.join(args)}: {proc.stderr}"
    return proc.stdout


def test_images_load_into_containerd_once_and_run_there(
    built: Callable[[str], Image], private_containerd: Path
) -> None:
    images = [built("pause"), built("operator")]
    messages: list[str] = []
    load_into_containerd(images, address=private_containerd, log=messages.append)
    assert sum("imported" in m for m in messages) == 2, messages
    assert {i.ref for i in images} <= set(_ctr(private_containerd, "images", "ls", "-q").split())

    messages.clear()
    load_into_containerd(images, address=private_containerd, log=messages.append)
    assert messages == [f"images: {i.name} already in containerd ({i.ref})" for i in images]

    run = ["run", "--rm", "--runtime", "io.containerd.runc.v2", "--read-only"]
    version = _ctr(private_containerd, *run, images[0].ref, "pause-version", "/pause", "-v")
    assert version.strip() == "finetune-pause 1.0"
    uid = _ctr(private_containerd, *run, images[1].ref, "op-uid", "python", "-c", "import os; print(os.getuid())")
    assert uid.strip() == "65532"
