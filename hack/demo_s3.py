"""Object-storage steps of the kind demo: upload the SST-2 subset, list a job's artifacts.

Why a script: `hack/kind-demo.sh` runs these steps through a port-forward to MinIO, on kind and on the dev
cluster's real node (tests/e2e/test_quickstart_real_node.py runs the script itself), and the tests that check
`verify` call the same functions, so the steps live here once. Only boto3 is needed (a dev dependency).

    python hack/demo_s3.py upload --endpoint http://127.0.0.1:19000 --rows 2000
    python hack/demo_s3.py list --endpoint http://127.0.0.1:19000 --uri s3://models/sst2-quickstart/
    python hack/demo_s3.py verify --endpoint http://127.0.0.1:19000 --uri s3://models/sst2-quickstart/

`verify` lists the artifacts, then checks every file manifest.json names against its recorded size and sha256
(exit 1 on any problem): what a user should do before trusting a model they download.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SST2 = REPO_ROOT / "examples" / "data" / "sst2"  # shipped in the repo (4,000 train rows, full dev)
# The demo credentials of examples/s3-credentials.yaml and examples/minio-kind.yaml.
DEMO_ACCESS_KEY = "finetune-demo"
DEMO_SECRET_KEY = "finetune-demo-secret-change-me"
DATA_BUCKET = "datasets"
MODELS_BUCKET = "models"


def client(endpoint: str, *, access_key: str, secret_key: str, region: str = "us-east-1") -> Any:
    """A boto3 S3 client with path-style addressing (MinIO does not serve virtual-host buckets by default)."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 5}),
    )


def subset(path: Path, rows: int | None) -> bytes:
    """The header plus the first `rows` data rows of a TSV (all rows when None): a quick-start-sized data set."""
    lines = path.read_bytes().splitlines(keepends=True)
    return b"".join(lines if rows is None else lines[: rows + 1])


def ensure_bucket(s3: Any, bucket: str) -> None:
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=bucket)


def upload(s3: Any, *, sst2_dir: Path, rows: int | None, prefix: str = "sst2") -> list[str]:
    """Create the data and models buckets, upload train (subset) and dev; return the s3:// URIs written."""
    for name in ("train.tsv", "dev.tsv"):
        if not (sst2_dir / name).is_file():
            raise FileNotFoundError(f"{sst2_dir / name} is missing; pass --sst2-dir DIR holding train.tsv and dev.tsv")
    ensure_bucket(s3, DATA_BUCKET)
    ensure_bucket(s3, MODELS_BUCKET)
    written = []
    for name, n in (("train.tsv", rows), ("dev.tsv", None)):
        body = subset(sst2_dir / name, n)
        key = f"{prefix}/{name}"
        s3.put_object(Bucket=DATA_BUCKET, Key=key, Body=body)
        rows_written = body.count(b"\n") - 1
        written.append(f"s3://{DATA_BUCKET}/{key} ({rows_written} rows)")
    return written


def list_artifacts(s3: Any, uri: str) -> list[tuple[str, int]]:
    """Every (key, size) under an s3://bucket/prefix/ URI."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    out: list[tuple[str, int]] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [(item["Key"], int(item["Size"])) for item in page.get("Contents", [])]
    return out


MANIFEST = "manifest.json"


def verify_manifest(s3: Any, uri: str) -> tuple[dict[str, Any] | None, list[str]]:
    """The manifest under an s3:// prefix and the problems found checking it (none: every listed file is there
    with its size and sha256). No manifest is a problem: the output is incomplete (the manifest is written last)."""
    bucket = uri.removeprefix("s3://").partition("/")[0]
    keys = [key for key, _ in list_artifacts(s3, uri) if key.rsplit("/", 1)[-1] == MANIFEST]
    if not keys:
        return None, [f"{uri} has no {MANIFEST}: the output is incomplete"]
    key = min(keys, key=lambda k: k.count("/"))  # the prefix's own manifest, not one inside a nested run
    base = key.removesuffix(MANIFEST)
    manifest: dict[str, Any] = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    problems = []
    for item in manifest.get("files", []):
        digest = hashlib.sha256()
        try:
            body = s3.get_object(Bucket=bucket, Key=base + item["path"])["Body"]
        except s3.exceptions.NoSuchKey:
            problems.append(f"{item['path']}: listed in the manifest but missing")
            continue
        size = 0
        for chunk in body.iter_chunks(1 << 20):
            digest.update(chunk)
            size += len(chunk)
        if size != item["size"]:
            problems.append(f"{item['path']}: {size} bytes, the manifest says {item['size']}")
        elif digest.hexdigest() != item["sha256"]:
            problems.append(f"{item['path']}: sha256 differs from the manifest")
    return manifest, problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["upload", "list", "verify"])
    parser.add_argument("--endpoint", required=True, help="S3 endpoint, e.g. http://127.0.0.1:19000")
    parser.add_argument("--access-key", default=os.environ.get("AWS_ACCESS_KEY_ID", DEMO_ACCESS_KEY))
    parser.add_argument("--secret-key", default=os.environ.get("AWS_SECRET_ACCESS_KEY", DEMO_SECRET_KEY))
    parser.add_argument("--sst2-dir", type=Path, default=DEFAULT_SST2, help="directory with train.tsv and dev.tsv")
    parser.add_argument("--rows", type=int, default=2000, help="training rows to upload (0 = all)")
    parser.add_argument("--uri", default="s3://models/sst2-quickstart/", help="artifact prefix to list")
    args = parser.parse_args(argv)
    s3 = client(args.endpoint, access_key=args.access_key, secret_key=args.secret_key)
    if args.command == "upload":
        for line in upload(s3, sst2_dir=args.sst2_dir, rows=args.rows or None):
            print(f"uploaded {line}")
        return 0
    items = list_artifacts(s3, args.uri)
    if not items:
        print(f"no objects under {args.uri}", file=sys.stderr)
        return 1
    for key, size in items:
        print(f"{size:>12,d}  s3://{args.uri.removeprefix('s3://').partition('/')[0]}/{key}")
    manifest, problems = verify_manifest(s3, args.uri)
    if manifest is not None:
        print(json.dumps(manifest, indent=2))
    if args.command == "list":
        return 0
    for problem in problems:
        print(f"verify: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"verified: {len(manifest['files']) if manifest else 0} files match the manifest's sizes and sha256")
    return 0


if __name__ == "__main__":
    sys.exit(main())
