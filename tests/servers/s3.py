"""A real S3 server for tests: MinIO built from its Go module (hack/build-minio.sh), or moto's server.

Why a real server: the trainer and operator talk S3 through pyarrow and boto3; an in-process mock would not
catch signing, endpoint, path-style or network-namespace mistakes. MinIO is the default because it is what a
cluster would run; moto (``kind="moto"``, or ``FT_S3_SERVER=moto`` for the fixture) is the documented fallback
for machines that cannot build MinIO.

The server listens on 0.0.0.0 so that pods in their own network namespaces can reach it through a bridge
gateway address (``endpoint_for(gateway_ip)``); the test process itself uses ``endpoint`` (loopback).
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal

from tests.servers._process import ManagedProcess, ServerStartError, scrub_env, start_with_port_retry

if TYPE_CHECKING:
    import pyarrow.fs

S3Kind = Literal["minio", "moto"]

REPO_ROOT = Path(__file__).resolve().parents[2]
_READY_PATH = {"minio": "/minio/health/ready", "moto": "/moto-api/"}


def pinned_minio_version() -> str:
    """MINIO_VERSION from hack/versions.env: the single place the version is pinned."""
    versions = REPO_ROOT / "hack" / "versions.env"
    for line in versions.read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "MINIO_VERSION" and value.strip():
            return value.strip()
    raise RuntimeError(f"MINIO_VERSION is not set in {versions}")


def minio_binary_path() -> Path:
    """Where hack/build-minio.sh puts the binary: $FT_CACHE/minio/<version>/bin/minio."""
    cache = Path(os.environ.get("FT_CACHE") or REPO_ROOT / ".cache")
    return cache / "minio" / pinned_minio_version() / "bin" / "minio"


def _format_host(host: str) -> str:
    if not host:
        raise ValueError("host must be a hostname or IP address, got an empty string")
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class S3Server:
    """A running S3 server with generated root credentials; stop it with :meth:`stop` or a ``with`` block."""

    def __init__(
        self,
        *,
        kind: S3Kind,
        version: str,
        process: ManagedProcess,
        port: int,
        access_key: str,
        secret_key: str,
        region: str,
        workdir: Path,
    ) -> None:
        self.kind: S3Kind = kind
        self.version = version
        self.port = port
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.workdir = workdir
        self._process = process

    @classmethod
    def start(
        cls,
        *,
        workdir: Path,
        kind: S3Kind = "minio",
        binary: Path | None = None,
        region: str = "us-east-1",
        timeout: float = 60.0,
    ) -> S3Server:
        """Start a server whose data, certs dir and log live under ``workdir``; return once it is ready.

        Raises :class:`ServerStartError` (with the server log) if it exits or is not ready within ``timeout``.
        """
        workdir.mkdir(parents=True, exist_ok=True)
        access_key = "ft-" + secrets.token_hex(8)
        secret_key = secrets.token_urlsafe(30)
        log_path = workdir / f"{kind}.log"

        if kind == "minio":
            exe = binary or minio_binary_path()
            if not exe.is_file():
                raise ServerStartError(
                    f"MinIO binary not found at {exe}. Build it with `bash hack/build-minio.sh` (or "
                    "`make binaries`), or set FT_S3_SERVER=moto to use moto's S3 server instead."
                )
            version = pinned_minio_version() if binary is None else str(exe)
            data_dir = workdir / "data"
            data_dir.mkdir(exist_ok=True)
            env = scrub_env(
                {
                    "MINIO_ROOT_USER": access_key,
                    "MINIO_ROOT_PASSWORD": secret_key,
                    "MINIO_SITE_REGION": region,
                    # No web console, no update checks, no phoning home: a quiet, offline test server.
                    "MINIO_BROWSER": "off",
                    "MINIO_UPDATE": "off",
                    "MINIO_CALLHOME_ENABLE": "off",
                    # Lets Prometheus scrape the server without a bearer token, should a test want to.
                    "MINIO_PROMETHEUS_AUTH_TYPE": "public",
                    "HOME": str(workdir),
                }
            )

            def start_once(port: int) -> ManagedProcess:
                argv = [
                    str(exe),
                    "server",
                    "--address",
                    f"0.0.0.0:{port}",
                    "--certs-dir",
                    str(workdir / "certs"),
                    str(data_dir),
                ]
                return ManagedProcess.spawn(name="minio", argv=argv, log_path=log_path, env=env, cwd=workdir)

        else:
            # Prefer the moto_server of the interpreter running the tests (the venv is often not on PATH).
            venv_moto = Path(sys.executable).with_name("moto_server")
            moto = str(venv_moto) if venv_moto.is_file() else (shutil.which("moto_server") or "")
            if not moto:
                raise ServerStartError("moto_server not found: install the dev extra (`make venv`)")
            version = "moto " + metadata.version("moto")
            # moto accepts any credentials; generated ones keep the client code path identical to MinIO's.
            env = scrub_env({"HOME": str(workdir)})

            def start_once(port: int) -> ManagedProcess:
                argv = [moto, "-H", "0.0.0.0", "-p", str(port)]
                return ManagedProcess.spawn(name="moto_server", argv=argv, log_path=log_path, env=env, cwd=workdir)

        def ready(proc: ManagedProcess, port: int) -> None:
            proc.wait_http_ok(f"http://127.0.0.1:{port}{_READY_PATH[kind]}", timeout=timeout)

        process, port = start_with_port_retry(start_once, ready=ready)
        return cls(
            kind=kind,
            version=version,
            process=process,
            port=port,
            access_key=access_key,
            secret_key=secret_key,
            region=region,
            workdir=workdir,
        )

    # --- addresses and credentials -------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """Endpoint for clients in the test process itself."""
        return f"http://127.0.0.1:{self.port}"

    def endpoint_for(self, host: str) -> str:
        """Endpoint as reached through ``host`` — e.g. the bridge gateway IP seen from a pod's namespace."""
        return f"http://{_format_host(host)}:{self.port}"

    def env(self, *, host: str | None = None) -> dict[str, str]:
        """Environment for a client process (AWS SDKs, pyarrow, the trainer) pointed at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": self.endpoint if host is None else self.endpoint_for(host),
        }

    def boto3_kwargs(self) -> dict[str, str]:
        """Keyword arguments for ``boto3.client("s3", **kwargs)``; boto3 itself stays out of this module."""
        return {
            "endpoint_url": self.endpoint,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": self.region,
        }

    def filesystem(self) -> pyarrow.fs.S3FileSystem:
        """A pyarrow S3 filesystem on this server (paths are ``bucket/key``); may create and delete buckets."""
        import pyarrow.fs  # noqa: PLC0415 - heavy import, only paid by tests that read or write S3

        return pyarrow.fs.S3FileSystem(
            access_key=self.access_key,
            secret_key=self.secret_key,
            region=self.region,
            endpoint_override=f"127.0.0.1:{self.port}",
            scheme="http",
            allow_bucket_creation=True,
            allow_bucket_deletion=True,
            connect_timeout=5,
            request_timeout=30,
        )

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (no error if it already exists) and return the name."""
        self.filesystem().create_dir(name)
        return name

    # --- life cycle ----------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def log_path(self) -> Path:
        return self._process.log_path

    def log_tail(self, *, lines: int = 60) -> str:
        return self._process.log_tail(lines=lines)

    def running(self) -> bool:
        return self._process.returncode is None

    def stop(self) -> None:
        """Stop the server; data stays in ``workdir`` for post-mortems until the caller deletes it."""
        self._process.stop()

    def __enter__(self) -> S3Server:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
