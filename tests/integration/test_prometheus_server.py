"""The real Prometheus fixture scrapes a target added at run time and sees its value change."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from tests.servers._process import free_port
from tests.servers.prometheus import PrometheusError, PrometheusServer, Sample

pytestmark = pytest.mark.prometheus


class Exporter:
    """An in-process /metrics endpoint with one gauge, standing in for the trainer or operator."""

    def __init__(self) -> None:
        # Own registry: the default one carries process metrics and would clash across tests.
        self.registry = CollectorRegistry()
        self.gauge = Gauge("ft_test_progress_percent", "Progress reported by the fake trainer", registry=self.registry)
        self.port = free_port("127.0.0.1")
        self.httpd, self.thread = start_http_server(self.port, addr="127.0.0.1", registry=self.registry)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def exporter() -> Iterator[Exporter]:
    exp = Exporter()
    try:
        yield exp
    finally:
        exp.close()


@pytest.fixture
def job(prometheus_server: PrometheusServer) -> Iterator[str]:
    """A job name of this test's own, removed afterwards so later tests start with no stale targets."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    try:
        yield name
    finally:
        prometheus_server.remove_targets(name)


def _values(samples: list[Sample]) -> list[float]:
    return [s.value for s in samples]


def test_scrapes_a_target_added_at_run_time(prometheus_server: PrometheusServer, exporter: Exporter, job: str) -> None:
    exporter.gauge.set(42.5)
    prometheus_server.set_targets(job, [exporter.address], {"component": "trainer"})

    targets = prometheus_server.wait_for_targets(job, health="up", timeout=30)
    assert [t.scrape_url for t in targets] == [f"http://{exporter.address}/metrics"]
    assert targets[0].labels["component"] == "trainer"
    assert targets[0].last_error == ""

    expr = f'ft_test_progress_percent{{job="{job}"}}'
    samples = prometheus_server.wait_for(expr, lambda s: _values(s) == [42.5], timeout=30)
    assert samples[0].metric["instance"] == exporter.address
    assert samples[0].metric["component"] == "trainer"

    exporter.gauge.set(77.0)
    prometheus_server.wait_for(expr, lambda s: _values(s) == [77.0], timeout=30)
    up = prometheus_server.query(f'up{{job="{job}"}}')
    assert _values(up) == [1.0]


def test_removed_target_is_no_longer_scraped(prometheus_server: PrometheusServer, exporter: Exporter, job: str) -> None:
    prometheus_server.set_targets(job, [exporter.address], {})
    prometheus_server.wait_for_targets(job, timeout=30)

    prometheus_server.remove_targets(job)
    deadline = time.monotonic() + 30
    while [t for t in prometheus_server.targets() if t.job == job]:
        if time.monotonic() > deadline:
            pytest.fail(f"job {job} still has active targets 30 s after its target file was removed")
        time.sleep(0.25)


def test_unreachable_target_is_reported_down(prometheus_server: PrometheusServer, job: str) -> None:
    dead = f"127.0.0.1:{free_port('127.0.0.1')}"  # nothing listens here
    prometheus_server.set_targets(job, [dead], {})
    targets = prometheus_server.wait_for_targets(job, health="down", timeout=30)
    assert targets[0].last_error  # e.g. "connection refused"
    prometheus_server.wait_for(f'up{{job="{job}"}}', lambda s: _values(s) == [0.0], timeout=30)


def test_bad_promql_raises_with_the_servers_reason(prometheus_server: PrometheusServer) -> None:
    with pytest.raises(PrometheusError, match="bad_data"):
        prometheus_server.query("sum(")
