"""A real Prometheus server (Debian package ``prometheus``) for tests, with scrape targets set at run time.

Why real: the operator and trainer promise metrics that Prometheus can scrape; only a real scrape proves the
exposition format, the address and the labels. Why file_sd: tests add and remove targets while the server
runs (a trainer pod appears, the operator restarts) without rewriting the config or reloading it.

The server always runs on its own free port with its own config and data dir, so a Prometheus service the
Debian package may have started on :9090 neither helps nor disturbs the tests.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.servers._process import ManagedProcess, ServerStartError, scrub_env, start_with_port_retry

DEFAULT_BINARY = Path("/usr/bin/prometheus")
_INSTALL_HINT = "install it with `apt-get install -y prometheus` (Debian/Ubuntu; CI's .ci/run does this)"


@dataclass(frozen=True)
class Sample:
    """One element of an instant-query result: the series' labels and its value at ``timestamp``."""

    metric: dict[str, str]
    value: float
    timestamp: float


@dataclass(frozen=True)
class Target:
    """One active scrape target as Prometheus sees it (``health`` is "up", "down" or "unknown")."""

    job: str
    instance: str
    scrape_url: str
    health: str
    last_error: str
    labels: dict[str, str]


class PrometheusError(RuntimeError):
    """The HTTP API answered with an error (bad PromQL, server not ready...)."""


def find_binary() -> Path:
    """The prometheus executable: $FT_PROMETHEUS_BIN, else /usr/bin/prometheus, else PATH; fail with a hint."""
    override = os.environ.get("FT_PROMETHEUS_BIN")
    candidates = [Path(override)] if override else [DEFAULT_BINARY]
    if not override and (on_path := shutil.which("prometheus")):
        candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise ServerStartError(f"prometheus binary not found at {candidates[0]}: {_INSTALL_HINT}")


class PrometheusServer:
    """A running Prometheus scraping every second whatever :meth:`set_targets` lists."""

    def __init__(self, *, process: ManagedProcess, port: int, workdir: Path, version: str) -> None:
        self.port = port
        self.workdir = workdir
        self.version = version
        self._process = process

    @property
    def sd_dir(self) -> Path:
        """Directory of file_sd target files, one ``<job>.json`` per job."""
        return self.workdir / "targets"

    @classmethod
    def start(
        cls,
        *,
        workdir: Path,
        binary: Path | None = None,
        scrape_interval: str = "1s",
        timeout: float = 60.0,
    ) -> PrometheusServer:
        """Write a config under ``workdir``, start Prometheus on a free loopback port, wait for /-/ready."""
        exe = binary or find_binary()
        workdir.mkdir(parents=True, exist_ok=True)
        sd_dir = workdir / "targets"
        sd_dir.mkdir(exist_ok=True)
        config_path = workdir / "prometheus.yml"
        config_path.write_text(_render_config(sd_dir=sd_dir, scrape_interval=scrape_interval))
        log_path = workdir / "prometheus.log"
        env = scrub_env({"HOME": str(workdir)})

        def start_once(port: int) -> ManagedProcess:
            argv = [
                str(exe),
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--web.enable-lifecycle",
                "--storage.tsdb.retention.time=1d",
                "--log.level=info",
            ]
            return ManagedProcess.spawn(name="prometheus", argv=argv, log_path=log_path, env=env, cwd=workdir)

        def ready(proc: ManagedProcess, port: int) -> None:
            proc.wait_http_ok(f"http://127.0.0.1:{port}/-/ready", timeout=timeout)

        process, port = start_with_port_retry(start_once, ready=ready, host="127.0.0.1")
        server = cls(process=process, port=port, workdir=workdir, version="unknown")
        try:
            server.version = str(server._api("/api/v1/status/buildinfo").get("version", "unknown"))
        except BaseException:
            server.stop()
            raise
        return server

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- scrape targets ------------------------------------------------------------------------------

    def set_targets(
        self,
        job: str,
        targets: Sequence[str],
        labels: Mapping[str, str] | None = None,
        *,
        metrics_path: str = "/metrics",
    ) -> None:
        """Make Prometheus scrape ``targets`` ("host:port") under ``job``; an empty list removes the job.

        The file is replaced atomically (write + rename), as file_sd requires, so Prometheus never reads a
        half-written list. Prometheus picks the change up within about a second (inotify, 1 s refresh).
        """
        if not job or "/" in job or job.startswith("."):
            raise ValueError(f"job must be a plain name usable as a file name, got {job!r}")
        path = self.sd_dir / f"{job}.json"
        if not targets:
            path.unlink(missing_ok=True)
            return
        group_labels = {**(labels or {}), "job": job, "__metrics_path__": metrics_path}
        tmp = self.sd_dir / f".{job}.json.tmp"
        tmp.write_text(json.dumps([{"targets": list(targets), "labels": group_labels}], indent=2))
        tmp.replace(path)

    def remove_targets(self, job: str) -> None:
        """Stop scraping ``job``."""
        self.set_targets(job, [])

    def targets(self) -> list[Target]:
        """Active scrape targets with their health, as reported by /api/v1/targets."""
        data = self._api("/api/v1/targets", {"state": "active"})
        result: list[Target] = []
        for raw in data.get("activeTargets", []):
            labels = {str(k): str(v) for k, v in raw.get("labels", {}).items()}
            result.append(
                Target(
                    job=labels.get("job", str(raw.get("scrapePool", ""))),
                    instance=labels.get("instance", ""),
                    scrape_url=str(raw.get("scrapeUrl", "")),
                    health=str(raw.get("health", "unknown")),
                    last_error=str(raw.get("lastError", "")),
                    labels=labels,
                )
            )
        return result

    def wait_for_targets(self, job: str, *, health: str = "up", count: int = 1, timeout: float = 30.0) -> list[Target]:
        """Wait until ``count`` targets of ``job`` report ``health``; the error lists what was seen instead."""
        deadline = time.monotonic() + timeout
        while True:
            seen = [t for t in self.targets() if t.job == job]
            if len([t for t in seen if t.health == health]) >= count:
                return seen
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job!r}: wanted {count} target(s) {health} within {timeout:.0f}s, saw {seen}")
            time.sleep(0.25)

    # --- queries -------------------------------------------------------------------------------------

    def query(self, expr: str) -> list[Sample]:
        """Instant query via /api/v1/query; a scalar result comes back as one sample with no labels."""
        data = self._api("/api/v1/query", {"query": expr})
        kind = data.get("resultType")
        result = data.get("result")
        if kind == "vector" and isinstance(result, list):
            return [
                Sample(
                    metric={str(k): str(v) for k, v in item["metric"].items()},
                    timestamp=float(item["value"][0]),
                    value=float(item["value"][1]),
                )
                for item in result
            ]
        if kind == "scalar" and isinstance(result, list):
            return [Sample(metric={}, timestamp=float(result[0]), value=float(result[1]))]
        raise PrometheusError(f"query {expr!r}: unsupported result type {kind!r} (use an instant vector)")

    def wait_for(
        self,
        expr: str,
        predicate: Callable[[list[Sample]], bool],
        *,
        timeout: float = 30.0,
        interval: float = 0.5,
    ) -> list[Sample]:
        """Re-run ``expr`` until ``predicate(samples)`` holds; return those samples or raise TimeoutError.

        The error shows the last result and the targets' health, which is usually the reason a metric is
        missing (target down, wrong port, wrong metrics path).
        """
        deadline = time.monotonic() + timeout
        while True:
            samples = self.query(expr)
            if predicate(samples):
                return samples
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{expr!r} did not satisfy the predicate within {timeout:.0f}s; last result {samples}; "
                    f"targets {self.targets()}"
                )
            time.sleep(interval)

    def reload(self) -> None:
        """Ask Prometheus to re-read its config (POST /-/reload; enabled by --web.enable-lifecycle)."""
        req = urllib.request.Request(f"{self.url}/-/reload", method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            if resp.status != 200:
                raise PrometheusError(f"reload failed with HTTP {resp.status}")

    def _api(self, path: str, params: Mapping[str, str] | None = None) -> dict[str, Any]:
        url = f"{self.url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as err:
            # Bad PromQL answers 400 with a JSON body naming the problem; surface it instead of "400".
            try:
                body = json.load(err)
            except ValueError:
                raise PrometheusError(f"GET {url}: HTTP {err.code}") from err
        if body.get("status") != "success":
            raise PrometheusError(f"GET {url}: {body.get('errorType')}: {body.get('error')}")
        data: dict[str, Any] = body["data"]
        return data

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
        self._process.stop()

    def __enter__(self) -> PrometheusServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _render_config(*, sd_dir: Path, scrape_interval: str) -> str:
    """One scrape config fed by file_sd; each target file sets its own ``job`` label (see set_targets).

    JSON is valid YAML, so the config is written with json.dumps and needs no YAML library.
    """
    config = {
        "global": {
            "scrape_interval": scrape_interval,
            "scrape_timeout": scrape_interval,
            "evaluation_interval": scrape_interval,
        },
        "scrape_configs": [
            {
                "job_name": "file_sd",
                "file_sd_configs": [{"files": [str(sd_dir / "*.json")], "refresh_interval": "1s"}],
            }
        ],
    }
    return json.dumps(config, indent=2) + "\n"
