"""`hack/demo_s3.py verify`: the quick start's last step checks each file manifest.json lists against its size and
sha256 on the real S3 server, and names what is wrong; before it only printed the manifest, so a truncated or
altered model passed the demo."""

from __future__ import annotations

import hashlib
import json
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from tests.servers.s3 import S3Server

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "hack"))
import demo_s3

FILES = {"model/model.safetensors": b"weights" * 100, "model/config.json": b'{"a": 1}'}


def _store_output(s3: Any, bucket: str) -> None:
    for key, body in FILES.items():
        s3.put_object(Bucket=bucket, Key=f"job/{key}", Body=body)
    files = [{"path": k, "size": len(b), "sha256": hashlib.sha256(b).hexdigest()} for k, b in FILES.items()]
    s3.put_object(Bucket=bucket, Key="job/manifest.json", Body=json.dumps({"files": files}).encode())


def _replace(key: str, body: bytes) -> Callable[[Any, str], None]:
    return lambda s3, bucket: s3.put_object(Bucket=bucket, Key=f"job/{key}", Body=body)


def _delete(key: str) -> Callable[[Any, str], None]:
    return lambda s3, bucket: s3.delete_object(Bucket=bucket, Key=f"job/{key}")


@dataclass(frozen=True)
class Case:
    name: str
    damage: Callable[[Any, str], None] | None
    expected: list[str]


CASES = [
    Case("intact", None, []),
    Case(
        "same size, other bytes",
        _replace("model/model.safetensors", b"WEIGHTS" * 100),
        ["model/model.safetensors: sha256 differs from the manifest"],
    ),
    Case("truncated", _replace("model/config.json", b"{}"), ["model/config.json: 2 bytes, the manifest says 8"]),
    Case("missing", _delete("model/config.json"), ["model/config.json: listed in the manifest but missing"]),
    Case(
        "no manifest", _delete("manifest.json"), ["s3://{bucket}/job/ has no manifest.json: the output is incomplete"]
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_verify_checks_every_listed_file(s3_server: S3Server, case: Case) -> None:
    s3 = boto3.client("s3", config=Config(s3={"addressing_style": "path"}), **s3_server.boto3_kwargs())
    bucket = s3_server.make_bucket(f"verify-{secrets.token_hex(4)}")
    _store_output(s3, bucket)
    if case.damage is not None:
        case.damage(s3, bucket)
    _, problems = demo_s3.verify_manifest(s3, f"s3://{bucket}/job/")
    assert problems == [p.format(bucket=bucket) for p in case.expected]
