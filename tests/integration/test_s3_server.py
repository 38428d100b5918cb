"""The real S3 server fixture works end to end with both clients the project uses (pyarrow and boto3)."""

from __future__ import annotations

import uuid
from typing import Any

import boto3
import pyarrow.fs
import pytest
from botocore.exceptions import ClientError

from tests.servers.s3 import S3Server

pytestmark = pytest.mark.s3


@pytest.fixture
def bucket(s3_server: S3Server) -> str:
    """A fresh bucket per test, so tests cannot see each other's objects."""
    return s3_server.make_bucket(f"t-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def s3_client(s3_server: S3Server) -> Any:
    return boto3.client("s3", **s3_server.boto3_kwargs())


def test_server_is_alive_and_reports_settings(s3_server: S3Server) -> None:
    assert s3_server.running()
    assert s3_server.endpoint == f"http://127.0.0.1:{s3_server.port}"
    assert s3_server.endpoint_for("10.200.0.1") == f"http://10.200.0.1:{s3_server.port}"
    env = s3_server.env(host="10.200.0.1")
    assert env == {
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "AWS_REGION": s3_server.region,
        "AWS_ENDPOINT_URL_S3": f"http://10.200.0.1:{s3_server.port}",
    }


def test_make_bucket_is_listed_and_idempotent(s3_server: S3Server, s3_client: Any) -> None:
    name = s3_server.make_bucket(f"t-{uuid.uuid4().hex[:12]}")
    assert s3_server.make_bucket(name) == name  # second call is a no-op, not an error
    names = {b["Name"] for b in s3_client.list_buckets()["Buckets"]}
    assert name in names


def test_pyarrow_put_get_list_overwrite_delete(s3_server: S3Server, bucket: str) -> None:
    fs = s3_server.filesystem()
    with fs.open_output_stream(f"{bucket}/runs/a/model.bin") as out:
        out.write(b"\x00\x01weights")
    with fs.open_output_stream(f"{bucket}/runs/a/manifest.json") as out:
        out.write(b'{"complete": true}')

    with fs.open_input_stream(f"{bucket}/runs/a/model.bin") as src:
        assert src.read() == b"\x00\x01weights"
    listed = fs.get_file_info(pyarrow.fs.FileSelector(f"{bucket}/runs", recursive=True))
    files = sorted(info.path for info in listed if info.type == pyarrow.fs.FileType.File)
    assert files == [f"{bucket}/runs/a/manifest.json", f"{bucket}/runs/a/model.bin"]

    with fs.open_output_stream(f"{bucket}/runs/a/model.bin") as out:
        out.write(b"v2")
    with fs.open_input_stream(f"{bucket}/runs/a/model.bin") as src:
        assert src.read() == b"v2"

    fs.delete_file(f"{bucket}/runs/a/model.bin")
    assert fs.get_file_info(f"{bucket}/runs/a/model.bin").type == pyarrow.fs.FileType.NotFound
    assert fs.get_file_info(f"{bucket}/runs/a/manifest.json").type == pyarrow.fs.FileType.File


def test_pyarrow_missing_key_read_fails(s3_server: S3Server, bucket: str) -> None:
    fs = s3_server.filesystem()
    with pytest.raises(FileNotFoundError):
        fs.open_input_stream(f"{bucket}/does/not/exist")


def test_boto3_put_get_list_overwrite_delete(s3_client: Any, bucket: str) -> None:
    s3_client.put_object(Bucket=bucket, Key="data/train.tsv", Body=b"sentence\tlabel\nok\t1\n")
    s3_client.put_object(Bucket=bucket, Key="data/dev.tsv", Body=b"sentence\tlabel\n")
    got = s3_client.get_object(Bucket=bucket, Key="data/train.tsv")["Body"].read()
    assert got == b"sentence\tlabel\nok\t1\n"
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket, Prefix="data/")["Contents"]]
    assert keys == ["data/dev.tsv", "data/train.tsv"]

    s3_client.put_object(Bucket=bucket, Key="data/train.tsv", Body=b"replaced")
    assert s3_client.get_object(Bucket=bucket, Key="data/train.tsv")["Body"].read() == b"replaced"

    s3_client.delete_object(Bucket=bucket, Key="data/train.tsv")
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket, Prefix="data/")["Contents"]]
    assert keys == ["data/dev.tsv"]


def test_boto3_missing_key_read_fails(s3_client: Any, bucket: str) -> None:
    with pytest.raises(ClientError) as info:
        s3_client.get_object(Bucket=bucket, Key="nope")
    assert info.value.response["Error"]["Code"] == "NoSuchKey"


def test_wrong_credentials_are_rejected(s3_server: S3Server, bucket: str) -> None:
    """The server really authenticates: a wrong secret must not read the bucket (MinIO only; moto accepts all)."""
    if s3_server.kind != "minio":
        pytest.skip("moto's server does not verify signatures")
    kwargs = {**s3_server.boto3_kwargs(), "aws_secret_access_key": "wrong-secret-123"}
    client = boto3.client("s3", **kwargs)
    with pytest.raises(ClientError) as info:
        client.list_objects_v2(Bucket=bucket)
    assert info.value.response["Error"]["Code"] == "SignatureDoesNotMatch"


def test_objects_written_by_one_client_are_read_by_the_other(s3_server: S3Server, s3_client: Any, bucket: str) -> None:
    s3_client.put_object(Bucket=bucket, Key="x/from-boto3", Body=b"hello")
    fs = s3_server.filesystem()
    with fs.open_input_stream(f"{bucket}/x/from-boto3") as src:
        assert src.read() == b"hello"
    with fs.open_output_stream(f"{bucket}/x/from-pyarrow") as out:
        out.write(b"world")
    assert s3_client.get_object(Bucket=bucket, Key="x/from-pyarrow")["Body"].read() == b"world"
