"""Where bytes live: one `Location` type over pyarrow filesystems for s3:// and local paths.

Why pyarrow: Ray Train persists checkpoints through a pyarrow filesystem, so using the same abstraction for data,
model downloads and artifacts means one set of S3 settings (explicit endpoint, region, credentials from the
environment) for everything a job touches. Credentials are never passed as arguments or stored: each process reads
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from its own environment (the operator sets them from the job's Secret),
so a pickled filesystem (Ray ships the checkpoint filesystem to its workers) carries no secret.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

from finetune_trainer.errors import StorageError

if TYPE_CHECKING:
    from finetune_trainer.spec import StorageSpec

log = logging.getLogger(__name__)
T = TypeVar("T")
ENDPOINT_ENV = "AWS_ENDPOINT_URL_S3"
PVC_ROOT_ENV = "FINETUNE_PVC_ROOT"
DEFAULT_PVC_ROOT = "/mnt/pvc"
_CHUNK = 8 << 20


@dataclass(frozen=True)
class Location:
    """A file or directory on some filesystem; `path` is in the filesystem's own form (bucket/key or /abs/path)."""

    fs: pafs.FileSystem
    path: str
    uri: str

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    def child(self, name: str) -> Location:
        """The location of `name` below this one (a relative path with / separators)."""
        name = name.strip("/")
        sep = "" if self.uri.endswith("/") else "/"
        return Location(fs=self.fs, path=f"{self.path.rstrip('/')}/{name}", uri=f"{self.uri}{sep}{name}")


def s3_endpoint(storage: StorageSpec | None) -> str | None:
    """The S3 endpoint URL: spec.storage.endpoint, else AWS_ENDPOINT_URL_S3, else None (AWS itself)."""
    if storage is not None and storage.endpoint:
        return storage.endpoint
    return os.environ.get(ENDPOINT_ENV) or None


def s3_filesystem(storage: StorageSpec | None) -> pafs.S3FileSystem:
    """An S3 filesystem for the job's storage settings; credentials come from this process's environment."""
    endpoint = s3_endpoint(storage)
    region = storage.region if storage is not None else os.environ.get("AWS_REGION", "us-east-1")
    kwargs: dict[str, object] = {"region": region}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        kwargs["scheme"] = parsed.scheme or "https"
    try:
        # No access_key/secret_key here on purpose: the AWS SDK reads them from the environment of whichever
        # process uses the filesystem, so pickling it (Ray does) never copies a secret.
        return pafs.S3FileSystem(**kwargs, connect_timeout=10, request_timeout=60)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for bad settings
        raise StorageError(f"cannot configure S3 for endpoint {endpoint!r}: {e}") from e


def pvc_root() -> Path:
    """Where PersistentVolumeClaims are mounted: pvc://claim/path is <root>/claim/path (env FINETUNE_PVC_ROOT)."""
    return Path(os.environ.get(PVC_ROOT_ENV) or DEFAULT_PVC_ROOT)


def local_path(uri: str, *, base_dir: Path | None = None) -> Path:
    """A file://, pvc:// or plain path as an absolute local path; relative paths resolve against base_dir/cwd."""
    if uri.startswith("file://"):
        return Path(urlparse(uri).path or "/").resolve()
    if uri.startswith("pvc://"):
        claim_and_path = uri.removeprefix("pvc://").strip("/")
        return (pvc_root() / claim_and_path).resolve()
    path = Path(uri).expanduser()
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / path
    return path.resolve()


def resolve(uri: str, *, storage: StorageSpec | None, base_dir: Path | None = None) -> Location:
    """Turn a URI from the spec into a Location (s3:// -> S3 filesystem, anything else -> local)."""
    if uri.startswith("s3://"):
        bucket_and_key = uri.removeprefix("s3://")
        if not bucket_and_key.strip("/"):
            raise StorageError(f"{uri!r} names no bucket")
        return Location(fs=s3_filesystem(storage), path=bucket_and_key.rstrip("/") or bucket_and_key, uri=uri)
    path = local_path(uri, base_dir=base_dir)
    return Location(fs=pafs.LocalFileSystem(), path=str(path), uri=str(path))


def _describe(loc: Location, action: str, error: Exception) -> str:
    hint = " (check the endpoint, bucket and AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)" if loc.is_s3 else ""
    return f"cannot {action} {loc.uri}: {error}{hint}"


@dataclass(frozen=True)
class RetryPolicy:
    """Back-off for transient storage errors, on top of the AWS SDK's own quick retries (3 attempts)."""

    attempts: int = 5
    first_delay: float = 1.0
    max_delay: float = 8.0

    def delay(self, attempt: int) -> float:
        return float(min(self.max_delay, self.first_delay * 2 ** (attempt - 1)))


RETRY = RetryPolicy()
# What the AWS SDK (inside pyarrow) reports for a blip: 5xx and 429 responses, throttling, dropped or refused
# connections, timeouts. Access denied, missing buckets and bad signatures are not in here: retrying cannot fix them.
_TRANSIENT = re.compile(
    r"HTTP status (5\d\d|429)|NETWORK_CONNECTION|SLOW_DOWN|SERVICE_UNAVAILABLE|INTERNAL_FAILURE|REQUEST_TIMEOUT"
    r"|THROTTL|curlCode: (6|7|28|52|55|56)\b|[Tt]imed? ?out|Connection (reset|refused)"
)


def is_transient(error: BaseException) -> bool:
    """Whether a storage error is a blip worth retrying (5xx/429/network), not a permanent refusal."""
    if isinstance(error, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError):
        return False
    return bool(_TRANSIENT.search(str(error)))


def _retrying(loc: Location, action: str, operation: Callable[[], T], *, policy: RetryPolicy = RETRY) -> T:
    """Run a storage operation; transient errors are retried with back-off, then raised as StorageError (the
    retryable reason) saying so; permanent errors become StorageError at once. FileNotFoundError passes through."""
    started = time.monotonic()
    for attempt in range(1, policy.attempts + 1):
        try:
            return operation()
        except FileNotFoundError:
            raise
        except OSError as e:
            if not is_transient(e):
                raise StorageError(_describe(loc, action, e)) from e
            if attempt == policy.attempts:
                waited = time.monotonic() - started
                raise StorageError(
                    f"{_describe(loc, action, e)}; still failing after {attempt} attempts over {waited:.0f}s "
                    "(a transient storage error: a retry of the job may succeed)"
                ) from e
            log.warning(
                "%s %s: transient storage error (attempt %d/%d), retrying in %.0fs: %s",
                action, loc.uri, attempt, policy.attempts, policy.delay(attempt), e,
            )  # fmt: skip
            time.sleep(policy.delay(attempt))
    raise AssertionError("unreachable")


def exists(loc: Location) -> bool:
    """Whether a file or directory exists at loc; raises StorageError when storage cannot be asked."""
    return bool(_retrying(loc, "read", lambda: loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound))


def is_file(loc: Location) -> bool:
    return bool(_retrying(loc, "read", lambda: loc.fs.get_file_info(loc.path).type == pafs.FileType.File))


def read_bytes(loc: Location) -> bytes:
    """The whole file; FileNotFoundError when missing (callers know which domain error that is)."""
    if not is_file(loc):
        raise FileNotFoundError(loc.uri)

    def read() -> bytes:
        with loc.fs.open_input_stream(loc.path) as stream:
            return bytes(stream.read())

    return _retrying(loc, "read", read)


def write_bytes(loc: Location, data: bytes) -> None:
    def write() -> None:
        parent = loc.path.rsplit("/", 1)[0]
        if parent and not loc.is_s3:
            loc.fs.create_dir(parent, recursive=True)
        with loc.fs.open_output_stream(loc.path) as stream:
            stream.write(data)

    _retrying(loc, "write", write)


def delete_file(loc: Location) -> None:
    """Remove one file (a missing file is not an error)."""
    try:
        _retrying(loc, "delete", lambda: loc.fs.delete_file(loc.path))
    except FileNotFoundError:
        return


def list_files(loc: Location) -> dict[str, int]:
    """Every file below a directory location: relative path -> size in bytes (empty when it does not exist)."""
    selector = pafs.FileSelector(loc.path, recursive=True, allow_not_found=True)
    infos = _retrying(loc, "list", lambda: loc.fs.get_file_info(selector))
    prefix = loc.path.rstrip("/") + "/"
    return {
        info.path.removeprefix(prefix): int(info.size)
        for info in infos
        if info.type == pafs.FileType.File and info.path.startswith(prefix)
    }


def upload_dir(local_dir: Path, loc: Location) -> None:
    """Copy a local directory tree to loc (files are overwritten, nothing is deleted)."""
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        upload_file(path, loc.child(path.relative_to(local_dir).as_posix()))


def upload_file(path: Path, loc: Location) -> None:
    def upload() -> None:
        parent = loc.path.rsplit("/", 1)[0]
        if not loc.is_s3:
            loc.fs.create_dir(parent, recursive=True)
        with path.open("rb") as src, loc.fs.open_output_stream(loc.path) as dst:
            while chunk := src.read(_CHUNK):
                dst.write(chunk)

    _retrying(loc, "write", upload)


def download_dir(loc: Location, local_dir: Path) -> list[str]:
    """Copy every file below loc into local_dir; returns the relative paths copied."""
    files = list_files(loc)
    for rel in files:
        target = local_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        src = loc.child(rel)

        def download(src: Location = src, target: Path = target) -> None:
            with src.fs.open_input_stream(src.path) as stream, target.open("wb") as out:
                while chunk := stream.read(_CHUNK):
                    out.write(chunk)

        _retrying(src, "read", download)
    return list(files)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_location(loc: Location) -> str:
    """sha256 of a stored file, streamed (used to verify a manifest)."""

    def digest() -> str:
        hasher = hashlib.sha256()
        with loc.fs.open_input_stream(loc.path) as stream:
            while chunk := stream.read(_CHUNK):
                hasher.update(chunk)
        return hasher.hexdigest()

    return _retrying(loc, "read", digest)
